package store

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weightfs/weightfs/cuda/cudatest"
	"github.com/weightfs/weightfs/store/codec/codectest"
	"github.com/weightfs/weightfs/store/safetensors"
)

// snapStore is a store writing snapshots to dir.
func snapStore(t *testing.T, dir string, keep int) (*Store, *logBuffer) {
	t.Helper()
	sd, err := OpenSnapshotDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var logs logBuffer
	s := New(OpenMemfdArena(), Options{Logger: slog.New(slog.NewTextHandler(&logs, nil)), Snapshots: sd, KeepVersions: keep})
	t.Cleanup(func() { s.Close() })
	return s, &logs
}

// pushSnapshotted pushes a version of model with trained-like BF16 weights
// in two shards, a config and a nested file, and waits for its snapshot.
func pushSnapshotted(t *testing.T, s *Store, model string, seed uint64) *Version {
	t.Helper()
	manifest := []PushTensor{
		{Name: "a", DType: safetensors.BF16, Shape: []int64{64, 256}},
		{Name: "b", DType: safetensors.BF16, Shape: []int64{32, 256}},
		{Name: "n", DType: safetensors.F32, Shape: []int64{256}},
	}
	given := map[string][]byte{"config.json": []byte(`{"seed":` + string(rune('0'+seed%10)) + `}`), "tok/vocab.txt": []byte("a\nb\n")}
	st, err := s.Stage(model, manifest, given, StageOptions{Writer: "pid 1", Layout: PushLayoutOptions{MaxShardSize: 40 << 10}})
	if err != nil {
		t.Fatal(err)
	}
	for i, x := range manifest {
		rows, cols := 1, int(x.Shape[0])
		if len(x.Shape) == 2 {
			rows, cols = int(x.Shape[0]), int(x.Shape[1])
		}
		b, err := codectest.Tensor(codectest.Linear, string(x.DType), rows, cols, seed+uint64(i))
		if err != nil {
			t.Fatal(err)
		}
		if err := st.WriteTensor(x.Name, b); err != nil {
			t.Fatal(err)
		}
	}
	v, err := st.Commit(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := v.WaitSnapshot(ctx); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestSnapshotReload(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "snap")
	s, logs := snapStore(t, dir, 0)
	pushSnapshotted(t, s, "m", 1)
	v2 := pushSnapshotted(t, s, "m", 2)
	want := snapshot(v2)
	if !strings.Contains(logs.String(), "snapshot written") {
		t.Errorf("no \"snapshot written\" log:\n%s", logs)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("snapshot dir: %v, %v", fi, err)
	}
	s.Close()

	s2, logs2 := snapStore(t, dir, 0)
	got := s2.LoadSnapshots(context.Background(), nil)
	if len(got) != 1 {
		t.Fatalf("loaded %d versions, want 1:\n%s", len(got), logs2)
	}
	cur := s2.Model("m").Current()
	if cur.Number() != 2 || cur.Source() != v2.Source() {
		t.Fatalf("current %s from %q, want m@2 from %q", cur.Name(), cur.Source(), v2.Source())
	}
	sameVersion(t, cur, want)
	if d, _ := cur.Root().Lookup("tok"); d == nil {
		t.Error("tok/ not in the tree")
	}
	for _, f := range cur.Files() {
		if _, err := f.WaitChecksum(context.Background()); err != nil {
			t.Errorf("%s: no checksum: %v", f.Path(), err)
		}
	}
	if err := cur.WaitSnapshot(context.Background()); err != nil {
		t.Errorf("the reloaded version's snapshot: %v", err)
	}
	// Numbering continues after the snapshot.
	v3 := pushSnapshotted(t, s2, "m", 3)
	if v3.Number() != 3 {
		t.Errorf("next push is %s, want m@3", v3.Name())
	}
	// A --model given for the name wins: nothing is loaded.
	s2.Close()
	s3, logs3 := snapStore(t, dir, 0)
	if got := s3.LoadSnapshots(context.Background(), map[string]bool{"m": true}); len(got) != 0 || s3.Model("m") != nil {
		t.Errorf("a skipped model was loaded")
	}
	if !strings.Contains(logs3.String(), "snapshot not loaded") {
		t.Errorf("no log of the skipped snapshot:\n%s", logs3)
	}
}

func TestSnapshotCorruptFallsBack(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "snap")
	s, _ := snapStore(t, dir, 0)
	want := snapshot(pushSnapshotted(t, s, "m", 1))
	pushSnapshotted(t, s, "m", 2)
	s.Close()

	// One byte of version 2's first weights stream changes.
	streams, _ := filepath.Glob(filepath.Join(dir, "m", "2", "*.wfsc"))
	if len(streams) == 0 {
		t.Fatal("no codec stream in the snapshot")
	}
	b, err := os.ReadFile(streams[0])
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0x40
	if err := os.WriteFile(streams[0], b, 0o600); err != nil {
		t.Fatal(err)
	}
	s2, logs := snapStore(t, dir, 0)
	s2.LoadSnapshots(context.Background(), nil)
	if cur := s2.Model("m").Current(); cur.Number() != 1 {
		t.Fatalf("current %s, want m@1", cur.Name())
	} else {
		sameVersion(t, cur, want)
	}
	l := logs.String()
	if !strings.Contains(l, "snapshot dropped") || !strings.Contains(l, "m@2") || !strings.Contains(l, filepath.Base(streams[0])) {
		t.Errorf("no clear log of the dropped snapshot:\n%s", l)
	}
	if v := s2.Version("m", 2); v != nil {
		t.Error("the corrupt version is served")
	}
	// Numbers are never reused: the next push is not m@2.
	if n := pushSnapshotted(t, s2, "m", 4).Number(); n != 3 {
		t.Errorf("next push is m@%d, want m@3", n)
	}
}

func TestSnapshotMalformedManifests(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "snap")
	s, _ := snapStore(t, dir, 0)
	want := snapshot(pushSnapshotted(t, s, "m", 1))
	s.Close()
	bad := map[string]string{
		"6":  "{",
		"7":  `{"format":1,"model":"m","number":7,"files":[{"path":"../x","kind":"plain","data":"0.raw","encoding":"raw","xxh3":"0"}]}`,
		"8":  `{"format":1,"model":"m","number":8,"files":[{"path":"x","kind":"plain","size":-5,"data":"0.raw","encoding":"raw","xxh3":"0"}]}`,
		"9":  `{"format":1,"model":"m","number":9,"files":[{"path":"x","kind":"weights","size":3,"data":"../../etc","encoding":"wfsc","xxh3":"0"}]}`,
		"10": `{"format":1,"model":"other","number":10}`,
	}
	for n, js := range bad {
		if err := os.Mkdir(filepath.Join(dir, "m", n), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "m", n, snapshotManifest), []byte(js), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// A symlinked version folder is refused, not followed.
	if err := os.Symlink(filepath.Join(dir, "m", "1"), filepath.Join(dir, "m", "11")); err != nil {
		t.Fatal(err)
	}
	s2, logs := snapStore(t, dir, 0)
	s2.LoadSnapshots(context.Background(), nil)
	cur := s2.Model("m").Current()
	if cur.Number() != 1 {
		t.Fatalf("current %s, want m@1:\n%s", cur.Name(), logs)
	}
	sameVersion(t, cur, want)
	for _, n := range []string{"m@6", "m@7", "m@8", "m@9", "m@10", "m@11"} {
		if !strings.Contains(logs.String(), "version="+n+" ") {
			t.Errorf("%s not logged as dropped", n)
		}
	}
}

func TestSnapshotTornWriteIgnored(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "snap")
	s, _ := snapStore(t, dir, 0)
	want := snapshot(pushSnapshotted(t, s, "m", 1))
	s.Close()
	torn := filepath.Join(dir, "m", ".tmp-2-12345")
	if err := os.MkdirAll(torn, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(torn, "0.wfsc"), []byte("WFSC half"), 0o600); err != nil {
		t.Fatal(err)
	}
	s2, logs := snapStore(t, dir, 0)
	s2.LoadSnapshots(context.Background(), nil)
	cur := s2.Model("m").Current()
	if cur.Number() != 1 {
		t.Fatalf("current %s, want m@1", cur.Name())
	}
	sameVersion(t, cur, want)
	if _, err := os.Stat(torn); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the torn snapshot is still there: %v", err)
	}
	if !strings.Contains(logs.String(), "deleted an unfinished snapshot") {
		t.Errorf("no log of the deleted torn snapshot:\n%s", logs)
	}
}

func TestSnapshotRetention(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "snap")
	s, logs := snapStore(t, dir, 2)
	for i := range 4 {
		pushSnapshotted(t, s, "m", uint64(i))
	}
	entries, err := os.ReadDir(filepath.Join(dir, "m"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, []string{"3", "4"}) {
		t.Errorf("snapshots %v, want [3 4]", names)
	}
	if !strings.Contains(logs.String(), "snapshot deleted") {
		t.Errorf("no log of the deleted snapshots:\n%s", logs)
	}
	want := `# HELP weightfs_snapshots_total Snapshots of pushed versions to --snapshot-dir, by result (written, failed); only with --snapshot-dir.
# TYPE weightfs_snapshots_total counter
weightfs_snapshots_total{result="failed"} 0
weightfs_snapshots_total{result="written"} 4
`
	if err := testutil.CollectAndCompare(s.Collector(), strings.NewReader(want), "weightfs_snapshots_total"); err != nil {
		t.Error(err)
	}
	if n, err := testutil.CollectAndLint(s.Collector()); err != nil || len(n) != 0 {
		t.Errorf("lint: %v %v", n, err)
	}
}

func TestSnapshotDirRefused(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenSnapshotDir(dir); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "--snapshot-dir") {
		t.Errorf("a folder others can write: %v", err)
	}
	link := filepath.Join(t.TempDir(), "link")
	os.Symlink(t.TempDir(), link)
	if _, err := OpenSnapshotDir(link); !errors.Is(err, ErrInvalid) {
		t.Errorf("a symlink: %v", err)
	}
	ok := filepath.Join(t.TempDir(), "s")
	sd, err := OpenSnapshotDir(ok)
	if err != nil {
		t.Fatal(err)
	}
	defer sd.close()
	if _, err := OpenSnapshotDir(ok); !errors.Is(err, ErrBusy) {
		t.Errorf("a second daemon: %v", err)
	}
}

// TestSnapshotGPU: a push written on a GPU is snapshotted once its host
// image is filled from the slabs; a store on other GPUs loads it back onto
// them, every slab equal to the host image, every byte equal.
func TestSnapshotGPU(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "snap")
	sd, err := OpenSnapshotDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	g := newGPUStoreWith(t, cudatest.Options{}, Options{Logger: quiet, Snapshots: sd}, "0", "1")
	base := loadBase(t, g.Store, "m") // a load: not snapshotted
	if err := base.WaitSnapshot(context.Background()); err == nil {
		t.Error("a loaded version has a snapshot")
	}
	v, _ := g.pushOnGPU(t, "m", manifestOf(base), 5)
	if err := v.WaitSnapshot(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := snapshot(v)
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}

	sd2, err := OpenSnapshotDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	g2 := newGPUStoreWith(t, cudatest.Options{}, Options{Logger: quiet, Snapshots: sd2}, "0")
	if got := g2.LoadSnapshots(context.Background(), nil); len(got) != 1 || got[0].Number() != v.Number() {
		t.Fatalf("loaded %v, want %s", got, v.Name())
	}
	cur := g2.Model("m").Current()
	sameVersion(t, cur, want)
	if cur.GPUError() != nil {
		t.Fatal(cur.GPUError())
	}
	g2.checkOnGPUs(t, cur)
}
