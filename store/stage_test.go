package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/weightfs/weightfs/cuda/cudatest"
	"github.com/weightfs/weightfs/store/safetensors"
)

// manifestOf is the manifest of v's weights files, reversed (order must not
// matter for the same layout).
func manifestOf(v *Version) []PushTensor {
	var m []PushTensor
	for _, f := range weightsFiles(v) {
		for _, t := range f.Header().Tensors {
			m = append(m, PushTensor{Name: t.Name, DType: t.DType, Shape: t.Shape})
		}
	}
	slices.Reverse(m)
	return m
}

// pushData makes random bytes for every tensor of st.
func pushData(t *testing.T, st *Staged, seed uint64) map[string][]byte {
	t.Helper()
	ts, err := st.Tensors()
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(seed, 3))
	data := map[string][]byte{}
	for _, x := range ts {
		b := make([]byte, x.Size)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		data[x.Name] = b
	}
	return data
}

func writeAll(t *testing.T, st *Staged, data map[string][]byte) {
	t.Helper()
	for name, b := range data {
		if err := st.WriteTensor(name, b); err != nil {
			t.Fatal(err)
		}
	}
}

// checkPushed reads a committed version back once its host images are
// filled: every weights file parses with the strict parser and holds data's
// bytes for each of its tensors.
func checkPushed(t *testing.T, v *Version, data map[string][]byte) {
	t.Helper()
	seen := 0
	for _, f := range weightsFiles(v) {
		if err := f.WaitReady(context.Background()); err != nil {
			t.Fatal(err)
		}
		h, err := safetensors.Parse(f.Bytes())
		if err != nil {
			t.Fatalf("%s: strict parser: %v", f.Path(), err)
		}
		for _, x := range h.Tensors {
			got := f.Bytes()[h.DataOffset()+x.Begin : h.DataOffset()+x.End]
			if !bytes.Equal(got, data[x.Name]) {
				t.Errorf("%s: tensor %s holds other bytes than were written", f.Path(), x.Name)
			}
			seen++
		}
	}
	if seen != len(data) {
		t.Errorf("%d tensors in the version, %d written", seen, len(data))
	}
}

func loadBase(t *testing.T, s *Store, name string) *Version {
	t.Helper()
	v, err := s.Load(context.Background(), name, writeShardedFolder(t, 1), LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestStageSameLayout(t *testing.T) {
	s := newTestStore(t, Budgets{})
	base := loadBase(t, s, "m")
	number, changed := s.Watch("m")
	st, err := s.Stage("m", manifestOf(base), nil, StageOptions{Writer: "pid 1"})
	if err != nil {
		t.Fatal(err)
	}
	if !st.Plan().SameAsBase {
		t.Fatal("same tensors, not the same layout")
	}
	if m := s.Model("m"); len(m.Versions()) != 1 || m.Current() != base {
		t.Fatal("a staged version is visible")
	}
	if p := s.Pushes(); len(p) != 1 || p[0] != st || p[0].Name() != "m" || p[0].Writer() != "pid 1" || p[0].Started().IsZero() {
		t.Fatalf("pushes %v", p)
	}
	data := pushData(t, st, 5)
	writeAll(t, st, data)
	if done, total := st.Progress(); done != total || total != st.Plan().TensorBytes {
		t.Errorf("progress %d of %d", done, total)
	}
	v, err := st.Commit(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	case <-time.After(5 * time.Second):
		t.Fatal("watchers not told of the commit")
	}
	if number != 1 || v.Number() != 2 || s.Model("m").Current() != v {
		t.Fatalf("watched %d, committed %s", number, v.Name())
	}
	if len(s.Pushes()) != 0 {
		t.Error("the push is still listed after commit")
	}
	var basePaths, paths []string
	for _, f := range base.Files() {
		basePaths = append(basePaths, f.Path())
	}
	for _, f := range v.Files() {
		paths = append(paths, f.Path())
		bf := findFile(base, f.Path())
		if bf == nil {
			continue
		}
		if f.Kind() == Weights {
			n := bf.Header().DataOffset()
			if !bytes.Equal(f.Bytes()[:n], bf.Bytes()[:n]) || f.Size() != bf.Size() {
				t.Errorf("%s: header not byte-identical to the base's", f.Path())
			}
		} else if !bytes.Equal(f.Bytes(), bf.Bytes()) {
			t.Errorf("%s: differs from the base's", f.Path())
		}
		uid, gid := f.Owner()
		if buid, bgid := bf.Owner(); uid != buid || gid != bgid || f.Perm() != bf.Perm() {
			t.Errorf("%s: owner %d:%d %v, base %d:%d %v", f.Path(), uid, gid, f.Perm(), buid, bgid, bf.Perm())
		}
	}
	if !slices.Equal(paths, basePaths) {
		t.Errorf("files %v, base %v", paths, basePaths)
	}
	if _, f := v.Root().Lookup("config.json"); f == nil {
		t.Error("config.json not found in the version's root")
	}
	checkPushed(t, v, data)
}

func findFile(v *Version, p string) *File {
	for _, f := range v.Files() {
		if f.Path() == p {
			return f
		}
	}
	return nil
}

func TestStageFirstPushGenerated(t *testing.T) {
	s := newTestStore(t, Budgets{})
	manifest := []PushTensor{
		{Name: "b", DType: safetensors.F32, Shape: []int64{3}},
		{Name: "a", DType: safetensors.BF16, Shape: []int64{2, 5}},
		{Name: "z", DType: safetensors.U8, Shape: []int64{0}},
	}
	given := map[string][]byte{"config.json": []byte(`{"x":1}`), "tok/vocab.txt": []byte("a\nb\n")}
	st, err := s.Stage("fresh", manifest, given, StageOptions{Layout: PushLayoutOptions{MaxShardSize: 16}})
	if err != nil {
		t.Fatal(err)
	}
	if st.Plan().SameAsBase || len(st.Plan().Files) != 2 {
		t.Fatalf("plan: same %v, %d files", st.Plan().SameAsBase, len(st.Plan().Files))
	}
	data := pushData(t, st, 9)
	writeAll(t, st, data)
	v, err := st.Commit(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, f := range v.Files() {
		paths = append(paths, f.Path())
	}
	want := []string{"config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
		ShardIndexFile, "tok/vocab.txt"}
	if !slices.Equal(paths, want) {
		t.Errorf("files %v, want %v", paths, want)
	}
	if !bytes.Equal(findFile(v, ShardIndexFile).Bytes(), st.plan.Index) ||
		!bytes.Equal(findFile(v, "tok/vocab.txt").Bytes(), given["tok/vocab.txt"]) {
		t.Error("index or given file differs")
	}
	if d, _ := v.Root().Lookup("tok"); d == nil || len(d.Files()) != 1 {
		t.Error("tok/ not in the tree")
	}
	if v.Number() != 1 || v.Source() != "a push by an unnamed writer" {
		t.Errorf("version %s from %q", v.Name(), v.Source())
	}
	checkPushed(t, v, data)
}

func TestStageWriteErrors(t *testing.T) {
	s := newTestStore(t, Budgets{})
	base := loadBase(t, s, "m")
	st, err := s.Stage("m", manifestOf(base), nil, StageOptions{})
	if err != nil {
		t.Fatal(err)
	}
	data := pushData(t, st, 1)
	if err := st.WriteTensor("norm", data["norm"]); err != nil {
		t.Fatal(err)
	}
	hb, err := st.HostBytes("mask")
	if err != nil || len(hb) != len(data["mask"]) {
		t.Fatalf("host bytes of mask: %d, %v", len(hb), err)
	}
	copy(hb, data["mask"])
	for _, c := range []struct {
		name string
		do   func() error
		want string
	}{
		{"second write", func() error { return st.WriteTensor("norm", data["norm"]) }, `"norm" was already written`},
		{"mark after write", func() error { return st.MarkWritten("norm", "") }, `"norm" was already written`},
		{"unknown tensor", func() error { return st.WriteTensor("nope", nil) }, `"nope" is not in the manifest`},
		{"unknown mark", func() error { return st.MarkWritten("nope", "") }, `"nope" is not in the manifest`},
		{"wrong size", func() error { return st.WriteTensor("embed", make([]byte, 29)) }, `"embed" is 30 bytes`},
		{"no GPU", func() error { return st.MarkWritten("embed", "GPU-x") }, `no staged slab on GPU "GPU-x"`},
		{"host bytes of unknown", func() error { _, err := st.HostBytes("nope"); return err }, `"nope" is not in the manifest`},
		{"slab without GPUs", func() error { _, err := st.Slab(SingleWeightsFile, "GPU-x"); return err }, "no weights file"},
		{"incomplete", func() error { _, err := st.Commit(context.Background()); return err },
			`5 of 6 tensors not written: "bias", "embed", "empty", "lm_head", "mask"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := c.do()
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("got %v, want ErrInvalid with %q", err, c.want)
			}
		})
	}
	if err := st.MarkWritten("mask", ""); err != nil {
		t.Fatal(err)
	}
	if got := st.Missing(); !slices.Equal(got, []string{"bias", "embed", "empty", "lm_head"}) {
		t.Errorf("missing %v", got)
	}
	for _, n := range []string{"bias", "embed", "empty", "lm_head"} {
		if err := st.WriteTensor(n, data[n]); err != nil {
			t.Fatal(err)
		}
	}
	v, err := st.Commit(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	checkPushed(t, v, data)
	// Committed: every method is ErrBusy.
	for name, do := range map[string]func() error{
		"write":   func() error { return st.WriteTensor("norm", data["norm"]) },
		"mark":    func() error { return st.MarkWritten("norm", "") },
		"host":    func() error { _, err := st.HostBytes("norm"); return err },
		"tensors": func() error { _, err := st.Tensors(); return err },
		"slab":    func() error { _, err := st.Slab("x", "y"); return err },
		"commit":  func() error { _, err := st.Commit(context.Background()); return err },
		"abort":   func() error { return st.Abort("late") },
	} {
		if err := do(); !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "committed") {
			t.Errorf("%s after commit: %v", name, err)
		}
	}
}

func TestStageErrors(t *testing.T) {
	s := newTestStore(t, Budgets{})
	one := []PushTensor{{Name: "w", DType: safetensors.U8, Shape: []int64{4}}}
	for _, c := range []struct {
		name, model string
		manifest    []PushTensor
		given       map[string][]byte
		want        error
	}{
		{"bad name", "a/b", one, nil, ErrInvalid},
		{"empty manifest", "m", nil, nil, ErrInvalid},
		{"given weights", "m", one, map[string][]byte{"x.safetensors": nil}, ErrInvalid},
		{"given in a hidden folder", "m", one, map[string][]byte{".git/x": nil}, ErrInvalid},
	} {
		t.Run(c.name, func(t *testing.T) {
			if _, err := s.Stage(c.model, c.manifest, c.given, StageOptions{}); !errors.Is(err, c.want) {
				t.Errorf("got %v, want %v", err, c.want)
			}
		})
	}
	// A refused push holds no name and no memory.
	if len(s.Pushes()) != 0 || s.Usage().HostReserved != 0 || s.Arena().Allocated() != 0 {
		t.Errorf("left behind: %d pushes, usage %+v", len(s.Pushes()), s.Usage())
	}
}

func TestStageOnePushPerName(t *testing.T) {
	s := newTestStore(t, Budgets{})
	one := []PushTensor{{Name: "w", DType: safetensors.U8, Shape: []int64{4}}}
	st, err := s.Stage("m", one, nil, StageOptions{Writer: "pid 123"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Stage("m", one, nil, StageOptions{Writer: "pid 456"})
	if !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "push in progress by pid 123") &&
		!strings.Contains(err.Error(), "in progress by pid 123") {
		t.Fatalf("second push: %v", err)
	}
	other, err := s.Stage("other", one, nil, StageOptions{})
	if err != nil {
		t.Fatalf("a push of another name: %v", err)
	}
	if err := st.Abort("test"); err != nil {
		t.Fatal(err)
	}
	if err := st.Abort("again"); !errors.Is(err, ErrBusy) || !strings.Contains(err.Error(), "aborted") {
		t.Errorf("second abort: %v", err)
	}
	st2, err := s.Stage("m", one, nil, StageOptions{})
	if err != nil {
		t.Fatalf("push after abort: %v", err)
	}
	if err := st2.WriteTensor("w", []byte{1, 2, 3, 4}); err != nil {
		t.Fatal(err)
	}
	if _, err := st2.Commit(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Stage("m", one, nil, StageOptions{}); err != nil {
		t.Fatalf("push after commit: %v", err)
	}
	_ = other // left open: Close frees it
}

func TestStageBudgetRefusedBeforeAllocation(t *testing.T) {
	for _, c := range []struct {
		name    string
		budgets Budgets
		tier    string
	}{
		{"host", Budgets{Host: 1 << 20}, TierHost},
		{"gpu", Budgets{GPU: 4 << 20}, TierGPU}, // the base's two slabs fill it
	} {
		t.Run(c.name, func(t *testing.T) {
			g := newGPUStore(t, cudatest.Options{}, c.budgets, "0", "1")
			base := loadBase(t, g.Store, "m")
			before, allocs, arena := g.Usage(), len(g.fake.Allocations()), g.Arena().Allocated()
			big := append(manifestOf(base), PushTensor{Name: "big", DType: safetensors.U8, Shape: []int64{2 << 20}})
			if c.tier == TierGPU {
				big = manifestOf(base)
			}
			_, err := g.Stage("m", big, nil, StageOptions{Writer: "pid 7"})
			var be *BudgetError
			if !errors.As(err, &be) || be.Tier != c.tier || !errors.Is(err, ErrNoMemory) || !strings.HasPrefix(err.Error(), "push m by pid 7: needs ") {
				t.Fatalf("got %v, want a %s budget refusal", err, c.tier)
			}
			if len(g.fake.Allocations()) != allocs || g.Arena().Allocated() != arena || len(g.Pushes()) != 0 {
				t.Error("a refused push allocated")
			}
			if after := g.Usage(); after.HostReserved != before.HostReserved || after.GPUs[0].Reserved != before.GPUs[0].Reserved {
				t.Errorf("reservations %+v, before %+v", after, before)
			}
		})
	}
}

func TestStageGPUMemoryRefused(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0", "1")
	g.fake.SetMemoryLimit(1, 2<<20)
	one := []PushTensor{{Name: "w", DType: safetensors.U8, Shape: []int64{3 << 20}}}
	if _, err := g.Stage("m", one, nil, StageOptions{}); !errors.Is(err, ErrNoMemory) || !strings.Contains(err.Error(), "GPU memory") {
		t.Fatalf("got %v", err)
	}
	g.checkNothingOnGPUs(t, nil)
	if g.Arena().Allocated() != 0 || g.Usage().HostReserved != 0 {
		t.Error("a refused push left memory behind")
	}
}

func TestStageAbortFreesEverything(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0", "1")
	base := loadBase(t, g.Store, "m")
	before, allocs, arena := g.Usage(), len(g.fake.Allocations()), g.Arena().Allocated()
	st, err := g.Stage("m", manifestOf(base), nil, StageOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Two weights files, one slab each on two GPUs.
	if got := len(g.fake.Allocations()); got != allocs+4 {
		t.Errorf("%d allocations while staged, want %d", got, allocs+4)
	}
	if g.Arena().Allocated() <= arena || g.Usage().HostReserved == 0 || g.Usage().GPUs[1].Reserved != 4<<20 {
		t.Errorf("staged push not accounted: %+v", g.Usage())
	}
	writeAll(t, st, pushData(t, st, 2))
	if err := st.Abort("test abort"); err != nil {
		t.Fatal(err)
	}
	after := g.Usage()
	if len(g.fake.Allocations()) != allocs || g.Arena().Allocated() != arena || after.HostBytes != before.HostBytes ||
		after.HostReserved != 0 || after.GPUs[0].Reserved != 0 || after.GPUs[0].Bytes != before.GPUs[0].Bytes {
		t.Errorf("after abort: %+v, before %+v", after, before)
	}
	if m := g.Model("m"); len(m.Versions()) != 1 || m.Current() != base {
		t.Error("an aborted push became visible")
	}
	if _, err := g.Unload("m", 0); err != nil {
		t.Fatal(err)
	}
	g.checkNothingOnGPUs(t, nil)
}

// TestStageCommitGPUs writes half of the tensors on the host and the other
// half straight into the first GPU's slab; after commit both GPUs' slabs and
// the host image hold every tensor.
func TestStageCommitGPUs(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0", "1")
	base := loadBase(t, g.Store, "m")
	st, err := g.Stage("m", manifestOf(base), nil, StageOptions{})
	if err != nil {
		t.Fatal(err)
	}
	data := pushData(t, st, 4)
	gpu0 := g.gpus.List()[0].UUID()
	ts, _ := st.Tensors()
	for i, x := range ts {
		if i%2 == 0 {
			if err := st.WriteTensor(x.Name, data[x.Name]); err != nil {
				t.Fatal(err)
			}
			continue
		}
		g.writeOnGPU(t, st, x, gpu0, data[x.Name])
	}
	v, err := st.Commit(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	checkPushed(t, v, data) // the host image, device-written tensors included
	g.checkOnGPUs(t, v)     // every slab equals the host image at the layout offsets
	if len(g.fake.Allocations()) != 8 {
		t.Errorf("%d allocations, want 8: two versions of two files on two GPUs", len(g.fake.Allocations()))
	}
	if _, err := g.Unload("m", 0); err != nil {
		t.Fatal(err)
	}
	g.checkNothingOnGPUs(t, nil)
}

func TestStageCommitCancelledAborts(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0")
	one := []PushTensor{{Name: "w", DType: safetensors.U8, Shape: []int64{4}}}
	st, err := g.Stage("m", one, nil, StageOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.WriteTensor("w", []byte{1, 2, 3, 4}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := st.Commit(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("commit with a cancelled context: %v", err)
	}
	if g.Model("m") != nil || len(g.Pushes()) != 0 || g.Usage().HostReserved != 0 {
		t.Error("a failed commit left something behind")
	}
	if err := st.Abort("late"); !errors.Is(err, ErrBusy) {
		t.Errorf("abort after a failed commit: %v", err)
	}
	g.checkNothingOnGPUs(t, nil)
}

func TestStageHeaderChangedRefused(t *testing.T) {
	s := newTestStore(t, Budgets{})
	one := []PushTensor{{Name: "w", DType: safetensors.U8, Shape: []int64{4}}}
	st, err := s.Stage("m", one, nil, StageOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := st.WriteTensor("w", []byte{1, 2, 3, 4}); err != nil {
		t.Fatal(err)
	}
	st.v.files[0].Bytes()[9] = ' ' // what no writer may do: its header
	if _, err := st.Commit(context.Background()); !errors.Is(err, ErrInvalid) {
		t.Fatalf("commit of a damaged header: %v", err)
	}
	if s.Model("m") != nil || s.Arena().Allocated() != 0 {
		t.Error("a refused commit left something behind")
	}
}

func TestStageStoreCloseAborts(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0")
	one := []PushTensor{{Name: "w", DType: safetensors.U8, Shape: []int64{4}}}
	st, err := g.Stage("m", one, nil, StageOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if err := st.WriteTensor("w", []byte{1, 2, 3, 4}); !errors.Is(err, ErrBusy) {
		t.Errorf("write after close: %v", err)
	}
	if _, err := g.Stage("m", one, nil, StageOptions{}); !errors.Is(err, ErrBusy) {
		t.Errorf("stage on a closed store: %v", err)
	}
	g.checkNothingOnGPUs(t, nil)
}

func TestStageConcurrentWrites(t *testing.T) {
	s := newTestStore(t, Budgets{})
	var manifest []PushTensor
	for i := range 40 {
		manifest = append(manifest, PushTensor{Name: fmt.Sprintf("t%02d", i), DType: safetensors.F32, Shape: []int64{int64(i + 1)}})
	}
	st, err := s.Stage("m", manifest, nil, StageOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Commit(context.Background()); err == nil || !strings.Contains(err.Error(), `"t09" and 30 more`) {
		t.Errorf("commit of nothing: %v", err)
	}
	data := pushData(t, st, 6)
	var wg sync.WaitGroup
	for name, b := range data {
		wg.Go(func() {
			if err := st.WriteTensor(name, b); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	v, err := st.Commit(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	checkPushed(t, v, data)
}

// A version that drained but was not freed yet (its last holder exited)
// counts as free for a push's admission, yet a push that fits without it
// does not wait for its free (seconds for tens of GB): Store.Run frees it.
func TestStageFreesDrainedOnlyWhenNeeded(t *testing.T) {
	for _, tc := range []struct {
		name        string
		tight       bool // a host budget that fits the push only without the drained version
		wantDrained bool // the drained version freed by the push's admission
	}{
		{"fits", false, false},
		{"needs the drained version's memory", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			probe := newTestStore(t, Budgets{})
			size := loadBase(t, probe, "m").HostBytes()
			budgets := Budgets{}
			if tc.tight {
				budgets.Host = 2*size + size/2
			}
			s := newTestStore(t, budgets)
			v1 := loadBase(t, s, "m")
			v2 := loadBase(t, s, "m")
			holder := exec.Command("sleep", "60")
			if err := holder.Start(); err != nil {
				t.Skipf("no process to hold handles: %v", err)
			}
			v1.NoteHandleHolder(holder.Process.Pid)
			if _, err := s.Unload("m", v1.Number()); err != nil {
				t.Fatal(err)
			}
			holder.Process.Kill()
			holder.Wait()
			st, err := s.Stage("m", manifestOf(v2), nil, StageOptions{Writer: "test"})
			if err != nil {
				t.Fatalf("stage: %v", err)
			}
			defer st.Abort("test over")
			if freed(v1) != tc.wantDrained {
				t.Errorf("the drained version freed by the admission: %v, want %v", freed(v1), tc.wantDrained)
			}
		})
	}
}
