package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/store/safetensors"
)

// newTestStore makes a store on memfds, which needs no privileges.
func newTestStore(t *testing.T, budgets Budgets) *Store {
	t.Helper()
	s := New(OpenMemfdArena(), Options{Budgets: budgets})
	t.Cleanup(func() { s.Close() })
	return s
}

// writeFolder writes a one-file model of about size bytes.
func writeFolder(t *testing.T, size int) string {
	t.Helper()
	dir := t.TempDir()
	var b bytes.Buffer
	err := safetensors.Write(&b, []safetensors.Tensor{
		{Name: "w", DType: "U8", Shape: []int64{int64(size)}, Data: bytes.Repeat([]byte{7}, size)},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{"model.safetensors": b.Bytes(), "config.json": []byte("{}")} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func load(t *testing.T, s *Store, name, dir string) *Version {
	t.Helper()
	v, err := s.Load(context.Background(), name, dir, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestUnloadDrainsUntilReleased(t *testing.T) {
	s := newTestStore(t, Budgets{})
	dir := writeFolder(t, 1<<20)
	v1 := load(t, s, "m", dir)
	v2 := load(t, s, "m", dir)
	if !v1.Acquire() {
		t.Fatal("acquire v1")
	}
	gone, err := s.Unload("m", 1)
	if err != nil || len(gone) != 1 || gone[0] != v1 {
		t.Fatalf("unload m@1: %v %v", gone, err)
	}
	if s.Model("m").Current() != v2 || s.Version("m", 1) != nil {
		t.Fatal("m@1 still visible or m@2 not current")
	}
	if d := s.Draining(); len(d) != 1 || d[0] != v1 || v1.State() != StateDraining {
		t.Fatalf("draining %v, state %s", d, v1.State())
	}
	if got := s.Usage().HostBytes; got != v1.HostBytes()+v2.HostBytes() {
		t.Errorf("usage %d while draining, want both versions %d", got, v1.HostBytes()+v2.HostBytes())
	}
	if !bytes.Equal(v1.Files()[1].Bytes()[v1.Files()[1].Header().DataOffset():][:4], []byte{7, 7, 7, 7}) {
		t.Error("draining version's bytes are gone while open")
	}
	v1.Release()
	if d := s.Draining(); len(d) != 0 {
		t.Fatalf("still draining after the last release: %v", d)
	}
	if v1.Acquire() {
		t.Error("a freed version could be acquired")
	}
	if got := s.Usage().HostBytes; got != v2.HostBytes() {
		t.Errorf("usage %d after free, want %d", got, v2.HostBytes())
	}
	if _, err := s.Unload("m", 7); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "no version 7") {
		t.Errorf("unload m@7: %v", err)
	}
	if _, err := s.Unload("nope", 0); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "no such model") {
		t.Errorf("unload nope: %v", err)
	}
	if _, err := s.Unload("m", -1); !errors.Is(err, ErrInvalid) {
		t.Errorf("unload m@-1: %v, want ErrInvalid", err)
	}
	if _, err := s.Unload("", 0); !errors.Is(err, ErrInvalid) {
		t.Errorf("unload of an empty name: %v, want ErrInvalid", err)
	}
	if _, err := s.Unload("m", 0); err != nil || s.Model("m") != nil {
		t.Errorf("unload all of m: %v", err)
	}
}

func TestHostBudget(t *testing.T) {
	small, big := writeFolder(t, 1<<20), writeFolder(t, 3<<20)
	s := newTestStore(t, Budgets{Host: 4 << 20})
	v := load(t, s, "a", small)
	_, err := s.Load(context.Background(), "b", big, LoadOptions{})
	var be *BudgetError
	if !errors.As(err, &be) || !errors.Is(err, ErrNoMemory) || !strings.Contains(err.Error(), "needs 3.0 MiB") {
		t.Fatalf("over-budget load: %v", err)
	}
	want := BudgetError{Model: "b", Source: big, Tier: TierHost, Need: dirCost(t, s, big), Free: 4<<20 - v.HostBytes(), Budget: 4 << 20}
	if *be != want {
		t.Errorf("budget error %+v, want %+v", *be, want)
	}
	if strings.Contains(err.Error(), "--") {
		t.Errorf("the store names a flag: %v", err)
	}
	if s.Model("b") != nil || s.Model("a").Current() != v || s.Usage().HostReserved != 0 {
		t.Fatal("a refused load disturbed the store")
	}
	if _, err := s.Unload("a", 0); err != nil {
		t.Fatal(err)
	}
	load(t, s, "b", big)
}

func TestVerify(t *testing.T) {
	s := newTestStore(t, Budgets{})
	dir := writeFolder(t, 4096)
	load(t, s, "m", dir)
	v, checks, err := s.Verify(context.Background(), "m", 0)
	if err != nil || v.Number() != 1 || len(checks) != 2 || !checks[0].OK || !checks[1].OK {
		t.Fatalf("verify unchanged: %+v %v", checks, err)
	}
	for _, c := range checks {
		if c.SHA256 == "" || c.SHA256 != c.SourceSHA256 || c.Problem != "" {
			t.Errorf("%s unchanged: %+v", c.Path, c)
		}
	}
	f := filepath.Join(dir, "model.safetensors")
	b, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-1] ^= 0xff
	if err := os.WriteFile(f, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, "config.json")); err != nil {
		t.Fatal(err)
	}
	v, checks, err = s.Verify(context.Background(), "m", 1)
	if err != nil || v.Number() != 1 || len(checks) != 2 {
		t.Fatalf("verify changed: %v, %d checks: %+v", err, len(checks), checks)
	}
	wantProblem := map[string]string{"config.json": "no such file", "model.safetensors": "checksums differ"}
	for _, c := range checks {
		want, ok := wantProblem[c.Path]
		if !ok || c.OK || !strings.Contains(c.Problem, want) {
			t.Errorf("%s after its source changed: %+v; want not OK, problem mentioning %q", c.Path, c, want)
		}
		if c.SHA256 == "" || c.SHA256 == c.SourceSHA256 {
			t.Errorf("%s: served %q, source %q; want the served checksum, different from the source's", c.Path, c.SHA256, c.SourceSHA256)
		}
		delete(wantProblem, c.Path)
	}
	if len(wantProblem) != 0 {
		t.Errorf("not checked: %v", wantProblem)
	}
	for _, x := range []struct {
		name   string
		number int
		kind   error
	}{{"m", 9, ErrNotFound}, {"nope", 0, ErrNotFound}, {"m", -1, ErrInvalid}, {".m", 0, ErrInvalid}} {
		if _, _, err := s.Verify(context.Background(), x.name, x.number); !errors.Is(err, x.kind) {
			t.Errorf("verify %s@%d: %v, want %v", x.name, x.number, err, x.kind)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, err := s.Verify(ctx, "m", 0); !errors.Is(err, context.Canceled) {
		t.Errorf("verify with a cancelled context: %v", err)
	}
}

func TestHumanBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 3 << 29: "1.5 GiB"} {
		if got := HumanBytes(n); got != want {
			t.Errorf("HumanBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestThreadGroup(t *testing.T) {
	pid := os.Getpid()
	if got := threadGroup(pid); got != pid {
		t.Errorf("threadGroup(own pid) = %d, want %d", got, pid)
	}
	if got := threadGroup(1 << 30); got != 1<<30 {
		t.Errorf("threadGroup(no such task) = %d", got)
	}
}

// dirSize is the bytes of the regular files in dir.
// dirCost is the host memory the files of dir take in s's arena.
func dirCost(t *testing.T, s *Store, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		info, err := d.Info()
		n += s.Arena().Cost(info.Size())
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func dirSize(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		info, err := d.Info()
		n += info.Size()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// rawHeader is a safetensors file with a header of our own making.
func rawHeader(header string, data []byte) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, uint64(len(header)))
	b.WriteString(header)
	b.Write(data)
	return b.Bytes()
}

func TestLoadErrors(t *testing.T) {
	good := writeFolder(t, 4096)
	modelBytes, err := os.ReadFile(filepath.Join(good, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	folder := func(files map[string][]byte) string {
		dir := t.TempDir()
		files["config.json"] = []byte("{}") // a model folder, but for the fault
		for name, b := range files {
			if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return dir
	}
	index := func(weightMap string) []byte { return []byte(`{"weight_map": ` + weightMap + `}`) }
	for _, x := range []struct {
		what, name, dir string
		kind            error
		want            string // in the message
	}{
		{"empty name", "", good, ErrInvalid, "model name is empty"},
		{"name with @", "m@1", good, ErrInvalid, "must not contain"},
		{"missing folder", "m", filepath.Join(good, "nope"), ErrInvalid, "no such file"},
		{"not a folder", "m", filepath.Join(good, "config.json"), ErrInvalid, "not a directory"},
		{"empty folder", "m", t.TempDir(), ErrInvalid, "no .safetensors file"},
		{"malformed safetensors", "m", folder(map[string][]byte{
			"model.safetensors": rawHeader(`{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,99]}}`, make([]byte, 16)),
		}), ErrInvalid, "model.safetensors"},
		{"index not JSON", "m", folder(map[string][]byte{
			"model.safetensors": modelBytes, "model.safetensors.index.json": []byte("{"),
		}), ErrInvalid, "not valid JSON"},
		{"index without weight_map", "m", folder(map[string][]byte{
			"model.safetensors": modelBytes, "model.safetensors.index.json": []byte("{}"),
		}), ErrInvalid, "no weight_map"},
		{"index names a missing shard", "m", folder(map[string][]byte{
			"model.safetensors": modelBytes, "model.safetensors.index.json": index(`{"w": "other.safetensors"}`),
		}), ErrInvalid, `"other.safetensors"`},
		{"shard holds an unmapped tensor", "m", folder(map[string][]byte{
			"model.safetensors": modelBytes, "model.safetensors.index.json": index(`{"v": "model.safetensors"}`),
		}), ErrInvalid, "does not map"},
		{"index maps a tensor the shard lacks", "m", folder(map[string][]byte{
			"model.safetensors": modelBytes, "model.safetensors.index.json": index(`{"w": "model.safetensors", "v": "model.safetensors"}`),
		}), ErrInvalid, `"v"`},
	} {
		t.Run(x.what, func(t *testing.T) {
			s := newTestStore(t, Budgets{})
			called := false
			_, err := s.Load(context.Background(), x.name, x.dir, LoadOptions{Progress: func(int64, int64) { called = true }})
			if !errors.Is(err, x.kind) || !strings.Contains(err.Error(), x.want) {
				t.Errorf("load: %v; want %v mentioning %q", err, x.kind, x.want)
			}
			if called {
				t.Error("a refused load reported progress")
			}
			if len(s.Models()) != 0 || len(s.Loads()) != 0 || s.Usage().HostReserved != 0 {
				t.Error("a refused load left something behind")
			}
		})
	}

	t.Run("closed store", func(t *testing.T) {
		s := newTestStore(t, Budgets{})
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Load(context.Background(), "m", good, LoadOptions{}); !errors.Is(err, ErrBusy) {
			t.Errorf("load into a closed store: %v, want ErrBusy", err)
		}
		if _, err := s.Unload("m", 0); !errors.Is(err, ErrBusy) {
			t.Errorf("unload from a closed store: %v, want ErrBusy", err)
		}
		if _, _, err := s.Verify(context.Background(), "m", 0); !errors.Is(err, ErrBusy) {
			t.Errorf("verify in a closed store: %v, want ErrBusy", err)
		}
	})

	t.Run("cancelled", func(t *testing.T) {
		s := newTestStore(t, Budgets{})
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		_, err := s.Load(ctx, "m", writeFolder(t, 1<<20), LoadOptions{Readers: 1, ChunkSize: 4096,
			Progress: func(done, total int64) { cancel() }})
		if !errors.Is(err, context.Canceled) || s.Model("m") != nil {
			t.Errorf("cancelled load: %v", err)
		}
	})
}

// A draining version whose last handle holder exited stays listed, counted
// and mapped until the reaper runs: reading the store's state frees nothing.
func TestReadsFreeNothing(t *testing.T) {
	s := newTestStore(t, Budgets{})
	dir := writeFolder(t, 1<<20)
	v1 := load(t, s, "m", dir)
	v2 := load(t, s, "m", dir)
	holder := exec.Command("sleep", "60")
	if err := holder.Start(); err != nil {
		t.Skipf("no process to hold handles: %v", err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	v1.NoteHandleHolder(holder.Process.Pid)
	if _, err := s.Unload("m", 1); err != nil {
		t.Fatal(err)
	}
	if hh := v1.HandleHolders(); len(hh) != 1 || hh[0] != holder.Process.Pid {
		t.Fatalf("handle holders %v, want [%d]", hh, holder.Process.Pid)
	}
	holder.Process.Kill()
	holder.Wait()

	for i := range 3 { // reading twice changes nothing either
		if d := s.Draining(); len(d) != 1 || d[0] != v1 || v1.State() != StateDraining {
			t.Fatalf("read %d: draining %v, state %s; want m@1 draining until the reaper runs", i, d, v1.State())
		}
		if got := s.Usage().HostBytes; got != v1.HostBytes()+v2.HostBytes() {
			t.Fatalf("read %d: usage %d, want both versions %d", i, got, v1.HostBytes()+v2.HostBytes())
		}
		if hh := v1.HandleHolders(); len(hh) != 0 {
			t.Errorf("read %d: handle holders %v after the holder exited", i, hh)
		}
		if v1.Files()[1].Bytes() == nil {
			t.Fatalf("read %d: m@1's host image was unmapped", i)
		}
		expectCollected(t, s, 1, 1, v1.HostBytes()+v2.HostBytes())
		_ = s.Models()
		_ = s.Loads()
		_ = s.Stats()
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx, 5*time.Millisecond); close(done) }()
	deadline := time.Now().Add(10 * time.Second)
	for len(s.Draining()) != 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	<-done
	if d := s.Draining(); len(d) != 0 {
		t.Fatalf("the reaper left %v draining", d)
	}
	if v1.Acquire() || v1.Files()[1].Bytes() != nil {
		t.Error("the reaper did not free m@1")
	}
	if got := s.Usage().HostBytes; got != v2.HostBytes() {
		t.Errorf("usage %d after the reaper, want %d", got, v2.HostBytes())
	}
	expectCollected(t, s, 1, 0, v2.HostBytes())
}

// A draining version's last release frees it and only it.
func TestReleaseFreesOnlyItsVersion(t *testing.T) {
	s := newTestStore(t, Budgets{})
	dir := writeFolder(t, 4096)
	a, b := load(t, s, "a", dir), load(t, s, "b", dir)
	holder := exec.Command("sleep", "60")
	if err := holder.Start(); err != nil {
		t.Skipf("no process to hold handles: %v", err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	b.NoteHandleHolder(holder.Process.Pid)
	if !a.Acquire() {
		t.Fatal("acquire a@1")
	}
	if _, err := s.Unload("a", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Unload("b", 0); err != nil {
		t.Fatal(err)
	}
	holder.Process.Kill()
	holder.Wait()
	a.Release()
	if d := s.Draining(); len(d) != 1 || d[0] != b {
		t.Errorf("after a@1's last release: draining %v, want only b@1 (its holder's exit is the reaper's to notice)", d)
	}
}

// expectCollected checks what the store's collector reports (no budgets, no
// open files).
func expectCollected(t *testing.T, s *Store, ready, draining int, host int64) {
	t.Helper()
	want := fmt.Sprintf(`# HELP weightfs_budget_bytes Memory budget by tier (0: none).
# TYPE weightfs_budget_bytes gauge
weightfs_budget_bytes{tier="gpu"} 0
weightfs_budget_bytes{tier="host"} 0
# HELP weightfs_open_files Files open on the mount.
# TYPE weightfs_open_files gauge
weightfs_open_files 0
# HELP weightfs_resident_bytes Bytes resident, by tier (host, gpu) and GPU UUID; draining versions included.
# TYPE weightfs_resident_bytes gauge
weightfs_resident_bytes{gpu="",tier="host"} %d
# HELP weightfs_versions Model versions, by state (ready, draining).
# TYPE weightfs_versions gauge
weightfs_versions{state="draining"} %d
weightfs_versions{state="ready"} %d
`, host, draining, ready)
	if err := testutil.CollectAndCompare(s.Collector(), strings.NewReader(want)); err != nil {
		t.Error(err)
	}
}

func TestCollector(t *testing.T) {
	s := newTestStore(t, Budgets{Host: 1 << 30, GPU: 1 << 20})
	dir := writeFolder(t, 4096)
	v1 := load(t, s, "m", dir)
	v2 := load(t, s, "m", dir)
	if !v1.Acquire() || !v2.Acquire() || !v2.Acquire() {
		t.Fatal("acquire")
	}
	defer v2.Release()
	defer v2.Release()
	if _, err := s.Unload("m", 1); err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf(`# HELP weightfs_budget_bytes Memory budget by tier (0: none).
# TYPE weightfs_budget_bytes gauge
weightfs_budget_bytes{tier="gpu"} %d
weightfs_budget_bytes{tier="host"} %d
# HELP weightfs_open_files Files open on the mount.
# TYPE weightfs_open_files gauge
weightfs_open_files 3
# HELP weightfs_resident_bytes Bytes resident, by tier (host, gpu) and GPU UUID; draining versions included.
# TYPE weightfs_resident_bytes gauge
weightfs_resident_bytes{gpu="",tier="host"} %d
# HELP weightfs_versions Model versions, by state (ready, draining).
# TYPE weightfs_versions gauge
weightfs_versions{state="draining"} 1
weightfs_versions{state="ready"} 1
`, 1<<20, 1<<30, v1.HostBytes()+v2.HostBytes())
	if err := testutil.CollectAndCompare(s.Collector(), strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	if n, err := testutil.CollectAndLint(s.Collector()); err != nil || len(n) != 0 {
		t.Errorf("lint: %v %v", n, err)
	}
	v1.Release()
	if d := s.Draining(); len(d) != 0 {
		t.Errorf("draining %v after the last release", d)
	}
}

// A load first frees versions that drained since the reaper last looked: a
// budget does not refuse it for memory nothing uses any more.
func TestLoadFreesDrainedFirst(t *testing.T) {
	dir := writeFolder(t, 1<<20)
	s := newTestStore(t, Budgets{Host: 3 << 19})
	v1 := load(t, s, "m", dir)
	holder := exec.Command("sleep", "60")
	if err := holder.Start(); err != nil {
		t.Skipf("no process to hold handles: %v", err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	v1.NoteHandleHolder(holder.Process.Pid)
	if _, err := s.Unload("m", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(context.Background(), "m", dir, LoadOptions{}); !errors.Is(err, ErrNoMemory) {
		t.Fatalf("load while m@1 is held: %v, want ErrNoMemory", err)
	}
	holder.Process.Kill()
	holder.Wait()
	if d := s.Draining(); len(d) != 1 {
		t.Fatalf("draining %v before the load", d)
	}
	if v := load(t, s, "m", dir); v.Number() != 2 || len(s.Draining()) != 0 {
		t.Errorf("loaded %s, draining %v", v.Name(), s.Draining())
	}
}

// A live process that says it closed its mappings (ReleaseHandles, from any
// of its threads) no longer keeps a draining version: it is freed at once.
// Another process's release changes nothing.
func TestReleaseHandles(t *testing.T) {
	s := newTestStore(t, Budgets{})
	dir := writeFolder(t, 1<<20)
	v1 := load(t, s, "m", dir)
	load(t, s, "m", dir)
	holder := exec.Command("sleep", "60")
	if err := holder.Start(); err != nil {
		t.Skipf("no process to hold handles: %v", err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	v1.NoteHandleHolder(holder.Process.Pid)
	v1.NoteHandleHolder(os.Getpid())
	if _, err := s.Unload("m", 1); err != nil {
		t.Fatal(err)
	}
	v1.ReleaseHandles(holder.Process.Pid)
	if freed(v1) || v1.State() != StateDraining {
		t.Fatalf("freed %v, state %s while this process still holds the handles", freed(v1), v1.State())
	}
	v1.ReleaseHandles(unix.Gettid()) // a thread of this process speaks for it
	if !freed(v1) || len(s.Draining()) != 0 {
		t.Errorf("after the last holder released: freed %v, draining %d", freed(v1), len(s.Draining()))
	}
}
