package store

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/zeebo/xxh3"
	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/cuda"
	"github.com/weightfs/weightfs/cuda/cudatest"
	"github.com/weightfs/weightfs/store/safetensors"
)

// pushOnGPU stages a push of the base's layout, writes every tensor straight
// into its slab on the first GPU and commits it. The host image of its
// tensors is then filled in the background.
func (g *gpuStore) pushOnGPU(t *testing.T, name string, manifest []PushTensor, seed uint64) (*Version, map[string][]byte) {
	t.Helper()
	st, err := g.Stage(name, manifest, nil, StageOptions{Writer: "test"})
	if err != nil {
		t.Fatal(err)
	}
	data := pushData(t, st, seed)
	gpu0 := g.gpus.List()[0].UUID()
	ts, err := st.Tensors()
	if err != nil {
		t.Fatal(err)
	}
	for _, x := range ts {
		g.writeOnGPU(t, st, x, gpu0, data[x.Name])
	}
	v, err := st.Commit(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return v, data
}

// writeOnGPU writes tensor x's bytes into its staged slab on the GPU of
// that UUID, as a writer copying device to device does, and marks it
// written there.
func (g *gpuStore) writeOnGPU(t *testing.T, st *Staged, x StagedTensor, gpu string, data []byte) {
	t.Helper()
	slab, err := st.Slab(x.File, gpu)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) > 0 {
		if err := g.fake.Write(slab.Ptr+cuda.DevicePtr(x.SlabOffset), data); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.MarkWritten(x.Name, gpu); err != nil {
		t.Fatal(err)
	}
}

// tensorBytesZero says whether every tensor byte of f's host image is 0.
func tensorBytesZero(f *File) bool {
	h := f.Header()
	return !bytes.ContainsFunc(f.Bytes()[h.DataOffset():], func(r rune) bool { return r != 0 })
}

// TestCommitDoesNotWaitForHostFill holds every device-to-host copy: the
// commit still returns, with every slab complete and the host image
// untouched; the files are ready, and checksummed, once the copies run.
func TestCommitDoesNotWaitForHostFill(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0", "1")
	base := loadBase(t, g.Store, "m")
	gate := g.fake.Hold("cuMemcpyDtoH_v2")
	defer gate.Release()
	v, data := g.pushOnGPU(t, "m", manifestOf(base), 7)

	if g.Model("m").Current() != v {
		t.Fatal("the push is not current after its commit")
	}
	for _, f := range weightsFiles(v) {
		if g.fake.IsPinned(f.Bytes()) {
			t.Errorf("%s: a push written on a GPU pinned its host image on the commit path", f.Path())
		}
		if done, _ := f.Ready(); done {
			t.Errorf("%s is ready while its fill is held", f.Path())
		}
		if _, ok := f.Checksum(); ok {
			t.Errorf("%s has a checksum before its host image is filled", f.Path())
		}
		if !tensorBytesZero(f) {
			t.Errorf("%s: the commit wrote tensor bytes of the host image", f.Path())
		}
		// The second GPU got every tensor device to device.
		offsets, _ := SlabLayout(f.Header())
		r := f.replicas[1]
		for i, x := range f.Header().Tensors {
			got, err := g.fake.Read(r.slab.Ptr+cuda.DevicePtr(offsets[i]), uint64(x.Size()))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data[x.Name]) {
				t.Errorf("%s: tensor %s not on the second GPU at commit", f.Path(), x.Name)
			}
		}
	}
	for _, f := range v.Files() {
		if f.Kind() != Weights {
			if err := f.WaitReady(context.Background()); err != nil {
				t.Errorf("%s (nothing to fill): %v", f.Path(), err)
			}
		}
	}

	gate.Release()
	checkPushed(t, v, data)
	for _, f := range weightsFiles(v) {
		if g.fake.IsPinned(f.Bytes()) {
			t.Errorf("%s: the fill pinned the host image (it holds the driver for seconds)", f.Path())
		}
	}
	g.checkOnGPUs(t, v)
	checkChecksums(t, v)
}

// checkChecksums waits for every file's checksum and compares it with
// xxh3.Hash of its bytes.
func checkChecksums(t *testing.T, v *Version) {
	t.Helper()
	for _, f := range v.Files() {
		sum, err := f.WaitChecksum(context.Background())
		if err != nil {
			t.Fatalf("%s: %v", f.Path(), err)
		}
		if want := xxh3.Hash(f.Bytes()); sum != want {
			t.Errorf("%s: checksum %016x, want %016x", f.Path(), sum, want)
		}
		if got, ok := f.Checksum(); !ok || got != sum {
			t.Errorf("%s: Checksum() = %x, %v after WaitChecksum %x", f.Path(), got, ok, sum)
		}
	}
}

func TestChecksumsOfLoadsAndHostPushes(t *testing.T) {
	for _, tc := range []struct {
		name string
		gpus []string
	}{
		{"host only", nil},
		{"two GPUs", []string{"0", "1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var s *Store
			if tc.gpus == nil {
				s = newTestStore(t, Budgets{})
			} else {
				s = newGPUStore(t, cudatest.Options{}, Budgets{}, tc.gpus...).Store
			}
			base := loadBase(t, s, "m")
			checkChecksums(t, base)
			st, err := s.Stage("m", manifestOf(base), nil, StageOptions{})
			if err != nil {
				t.Fatal(err)
			}
			writeAll(t, st, pushData(t, st, 3))
			v, err := st.Commit(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			checkChecksums(t, v)
		})
	}
}

func TestWaitReadyCancelled(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0")
	base := loadBase(t, g.Store, "m")
	gate := g.fake.Hold("cuMemcpyDtoH_v2")
	defer gate.Release()
	v, _ := g.pushOnGPU(t, "m", manifestOf(base), 8)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	f := weightsFiles(v)[0]
	if err := f.WaitReady(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("WaitReady with a cancelled context: %v", err)
	}
	if _, err := f.WaitChecksum(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("WaitChecksum with a cancelled context: %v", err)
	}
	gate.Release()
	if err := f.WaitReady(context.Background()); err != nil {
		t.Errorf("WaitReady after the fill: %v", err)
	}
}

func TestFillFailure(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0")
	base := loadBase(t, g.Store, "m")
	g.fake.Inject(cudatest.Fault{Call: "cuMemcpyDtoH_v2", Code: cudatest.CodeIllegalAddress})
	v, _ := g.pushOnGPU(t, "m", manifestOf(base), 9)
	for _, f := range v.Files() {
		err := f.WaitReady(context.Background())
		if f.Kind() != Weights {
			if err != nil {
				t.Errorf("%s (nothing to fill): %v", f.Path(), err)
			}
			continue
		}
		if !errors.Is(err, ErrFillFailed) {
			t.Errorf("%s: WaitReady = %v, want ErrFillFailed", f.Path(), err)
		}
		if done, err := f.Ready(); !done || !errors.Is(err, ErrFillFailed) {
			t.Errorf("%s: Ready = %v, %v", f.Path(), done, err)
		}
		if _, err := f.WaitChecksum(context.Background()); !errors.Is(err, ErrFillFailed) {
			t.Errorf("%s: WaitChecksum = %v, want ErrFillFailed", f.Path(), err)
		}
	}
	_, checks, err := g.Verify(context.Background(), "m", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range checks {
		isWeights := c.Path != "config.json" && c.Path != "model.safetensors.index.json"
		if c.OK == isWeights {
			t.Errorf("verify %s: OK %v, problem %q", c.Path, c.OK, c.Problem)
		}
	}
	g.fake.ClearFaults()
}

// TestUnloadDuringFill frees a version whose fill is in flight: the unload
// waits for the goroutine, which stops, and nothing is left behind.
func TestUnloadDuringFill(t *testing.T) {
	for _, how := range []string{"unload", "close"} {
		t.Run(how, func(t *testing.T) {
			g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0", "1")
			base := loadBase(t, g.Store, "m")
			gate := g.fake.Hold("cuMemcpyDtoH_v2")
			defer gate.Release()
			v, _ := g.pushOnGPU(t, "m", manifestOf(base), 10)
			<-gate.Arrived()
			done := make(chan error, 1)
			go func() {
				if how == "close" {
					done <- g.Close()
					return
				}
				_, err := g.Unload("m", 0)
				done <- err
			}()
			gate.Release()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			for _, f := range weightsFiles(v) {
				// Filled before the cancel was seen, or stopped by it.
				if err := f.WaitReady(context.Background()); err != nil && !errors.Is(err, context.Canceled) {
					t.Errorf("%s: %v", f.Path(), err)
				}
			}
			g.checkNothingOnGPUs(t, nil)
		})
	}
}

// TestVerifyPushed flips one byte of a pushed version, in its host image or
// in a slab: verify names the file and what differs.
func TestVerifyPushed(t *testing.T) {
	for _, tc := range []struct {
		name    string
		flip    func(g *gpuStore, f *File)
		problem string
	}{
		{"intact", nil, ""},
		{"host image", func(g *gpuStore, f *File) { f.Bytes()[f.Size()-1] ^= 1 }, "XXH3 differs"},
		{"slab", func(g *gpuStore, f *File) {
			r := f.replicas[1]
			b, _ := g.fake.Read(r.slab.Ptr, 1)
			g.fake.Write(r.slab.Ptr, []byte{b[0] ^ 1})
		}, "slab differs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0", "1")
			one := []PushTensor{{Name: "w", DType: safetensors.U8, Shape: []int64{1000}}}
			v, _ := g.pushOnGPU(t, "m", one, 11)
			f := weightsFiles(v)[0]
			recorded, err := f.WaitChecksum(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if tc.flip != nil {
				tc.flip(g, f)
			}
			_, checks, err := g.Verify(context.Background(), "m", 0)
			if err != nil {
				t.Fatal(err)
			}
			if len(checks) != 1 {
				t.Fatalf("%d checks, want 1", len(checks))
			}
			c := checks[0]
			if c.XXH3 != FormatChecksum(recorded) || c.ServedXXH3 != FormatChecksum(xxh3.Hash(f.Bytes())) || len(c.GPUs) != 2 {
				t.Errorf("check %+v; recorded %016x", c, recorded)
			}
			if tc.problem == "" {
				if !c.OK || c.Source != "" || c.SourceSHA256 != "" {
					t.Errorf("intact pushed file: %+v", c)
				}
				return
			}
			if c.OK || !bytes.Contains([]byte(c.Problem), []byte(tc.problem)) {
				t.Errorf("verify after a flipped byte in the %s: OK %v, problem %q, want %q", tc.name, c.OK, c.Problem, tc.problem)
			}
		})
	}
}

// A commit does not wait for the versions it drops to be freed (unpinning
// and freeing tens of GB take seconds; trainers and engines wait for the
// commit). Were it to wait, the held cuMemFree would hang the commit.
func TestCommitDoesNotWaitForFrees(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0")
	g.keep = 1
	base := loadBase(t, g.Store, "m")
	gate := g.fake.Hold("cuMemFree_v2")
	defer gate.Release()
	v, _ := g.pushOnGPU(t, "m", manifestOf(base), 11) // drops base
	if g.Model("m").Current() != v || g.Version("m", base.Number()) != nil {
		t.Fatalf("after the commit: current %s, base still listed %v", g.Model("m").Current().Name(), g.Version("m", base.Number()) != nil)
	}
	<-gate.Arrived() // the free runs after the commit returned
	gate.Release()
	g.reaps.Wait()
	if !freed(base) || len(g.Draining()) != 0 {
		t.Errorf("the dropped version: freed %v, draining %d", freed(base), len(g.Draining()))
	}
}

// allocatedBytes is what the kernel allocated for f's host image.
func allocatedBytes(t *testing.T, f *File) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(f.BackingFd(), &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// A push written on the GPU allocates its host image's pages after the
// commit, in the fill, not while staging (50 ms for 16 GB on the H200);
// meanwhile the image costs its estimate, so budgets hold.
func TestPushAllocatesHostImageAfterCommit(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0")
	manifest := []PushTensor{{Name: "w", DType: safetensors.U8, Shape: []int64{3 << 20}}}
	st, err := g.Stage("m", manifest, nil, StageOptions{Writer: "test"})
	if err != nil {
		t.Fatal(err)
	}
	ts, err := st.Tensors()
	if err != nil {
		t.Fatal(err)
	}
	data := pushData(t, st, 4)
	g.writeOnGPU(t, st, ts[0], g.gpus.List()[0].UUID(), data["w"])
	f := st.v.files[0]
	if got := allocatedBytes(t, f); got >= f.Size() {
		t.Errorf("%d bytes allocated for %s while staged, want only the header's pages", got, f.Path())
	}
	if f.buf.Cost() < f.Size() {
		t.Errorf("cost %d while unallocated, want at least its size %d", f.buf.Cost(), f.Size())
	}
	v, err := st.Commit(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := f.WaitReady(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := allocatedBytes(t, f); got < f.Size() {
		t.Errorf("%d bytes allocated for %s after its fill, want all %d", got, f.Path(), f.Size())
	}
	checkPushed(t, v, data)
}
