package store

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/weightfs/weightfs/cuda"
	"github.com/weightfs/weightfs/cuda/cudatest"
	"github.com/weightfs/weightfs/store/safetensors"
)

// quiet drops the store's log: failures show in the test's own errors.
var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// gpuStore is a store replicating to fake GPUs, wired as cmd/weightfs does.
type gpuStore struct {
	*Store
	fake *cudatest.Fake
	gpus *GPUs
}

// newGPUStore makes a store over a fake driver's devices ids (default "0").
// At the end of the test it closes the store and the GPUs and checks that
// no allocation, pinned range, stream or context was left behind.
func newGPUStore(t *testing.T, opts cudatest.Options, budgets Budgets, ids ...string) *gpuStore {
	t.Helper()
	return newGPUStoreWith(t, opts, Options{Budgets: budgets, Logger: quiet}, ids...)
}

// newGPUStoreWith is newGPUStore with the store's options (GPUs is set).
func newGPUStoreWith(t *testing.T, opts cudatest.Options, sopts Options, ids ...string) *gpuStore {
	t.Helper()
	fake := cudatest.New(opts)
	t.Cleanup(func() {
		fake.CheckClean(t)
		if c := fake.RetainedContexts(); len(c) != 0 {
			t.Errorf("contexts still retained: %v", c)
		}
	})
	driver, err := fake.Driver()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { driver.Close() })
	if len(ids) == 0 {
		ids = []string{"0"}
	}
	gpus, err := OpenGPUs(driver, ids)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := gpus.Close(); err != nil {
			t.Error(err)
		}
	})
	sopts.GPUs = gpus
	s := New(OpenMemfdArena(), sopts)
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Error(err)
		}
	})
	return &gpuStore{Store: s, fake: fake, gpus: gpus}
}

// writeShardedFolder writes a two-shard checkpoint with an index and a
// config. Tensors of mixed dtypes and odd sizes make the slab layout insert
// padding; the data is random so misplaced bytes show.
func writeShardedFolder(t *testing.T, seed uint64) string {
	t.Helper()
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(seed, 7))
	data := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	shards := [][]safetensors.Tensor{
		{
			{Name: "embed", DType: safetensors.BF16, Shape: []int64{3, 5}, Data: data(30)},
			{Name: "norm", DType: safetensors.F32, Shape: []int64{7}, Data: data(28)},
			{Name: "empty", DType: safetensors.F32, Shape: []int64{0}, Data: nil},
			{Name: "mask", DType: safetensors.U8, Shape: []int64{1001}, Data: data(1001)},
		},
		{
			{Name: "lm_head", DType: safetensors.BF16, Shape: []int64{64, 300}, Data: data(64 * 300 * 2)},
			{Name: "bias", DType: safetensors.F64, Shape: []int64{3}, Data: data(24)},
		},
	}
	weightMap := map[string]string{}
	for i, tensors := range shards {
		name := fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, len(shards))
		var b bytes.Buffer
		if err := safetensors.Write(&b, tensors, nil); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(dir, name), b.Bytes())
		for _, x := range tensors {
			weightMap[x.Name] = name
		}
	}
	idx, _ := json.Marshal(map[string]any{"metadata": map[string]any{}, "weight_map": weightMap})
	writeFile(t, filepath.Join(dir, "model.safetensors.index.json"), idx)
	writeFile(t, filepath.Join(dir, "config.json"), []byte(`{"model_type":"test"}`))
	return dir
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func weightsFiles(v *Version) []*File {
	var out []*File
	for _, f := range v.Files() {
		if f.Kind() == Weights {
			out = append(out, f)
		}
	}
	return out
}

// manifest decodes a file's user.weightfs.cuda value.
func manifest(t *testing.T, f *File) (Manifest, bool) {
	t.Helper()
	raw, ok := f.CUDAManifest()
	if !ok {
		return Manifest{}, false
	}
	var m Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("%s: manifest %s: %v", f.Path(), raw, err)
	}
	return m, true
}

// checkOnGPUs checks a resident version against the fake: one slab per GPU
// for each weights file, found by its handle, sized to the layout rounded to
// 2 MiB, holding every tensor's bytes at its layout offset; the host image
// pinned while resident.
func (g *gpuStore) checkOnGPUs(t *testing.T, v *Version) {
	t.Helper()
	if err := v.GPUError(); err != nil {
		t.Fatalf("%s: GPU error: %v", v.Name(), err)
	}
	devs := g.fake.Devices()
	var wantUUIDs []string
	for _, gpu := range g.gpus.List() {
		wantUUIDs = append(wantUUIDs, gpu.UUID())
	}
	if got := v.Residency(); !reflect.DeepEqual(got, append([]string{"host"}, wantUUIDs...)) {
		t.Errorf("%s: residency %v, want host and %v", v.Name(), got, wantUUIDs)
	}
	perGPU := map[string]int64{}
	for _, f := range weightsFiles(v) {
		m, ok := manifest(t, f)
		if !ok {
			t.Fatalf("%s: no CUDA manifest", f.Path())
		}
		h := f.Header()
		offsets, need := SlabLayout(h)
		if m.Schema != 1 || m.FileSize != f.Size() || m.DataOffset != h.DataOffset() || m.Align != SlabAlign || len(m.Replicas) != len(wantUUIDs) {
			t.Errorf("%s: manifest %+v", f.Path(), m)
			continue
		}
		// Loaded host images stay pinned (uploads and re-uploads); a push's
		// image filled from the GPU is not (store/background.go says why).
		if f.Source() != "" && !g.fake.IsPinned(f.Bytes()) {
			t.Errorf("%s: host image not pinned while resident", f.Path())
		}
		for i, r := range m.Replicas {
			if r.GPU != wantUUIDs[i] {
				t.Errorf("%s: replica %d on %s, want %s", f.Path(), i, r.GPU, wantUUIDs[i])
			}
			raw, err := base64.StdEncoding.DecodeString(r.Handle)
			if err != nil || len(raw) != 64 {
				t.Fatalf("%s: handle %q: %v", f.Path(), r.Handle, err)
			}
			a, ok := g.fake.HandleAllocation(cuda.IPCHandle(raw))
			if !ok {
				t.Fatalf("%s: handle on %s exports no live allocation", f.Path(), r.GPU)
			}
			if devs[a.Device].UUID != r.GPU {
				t.Errorf("%s: handle for %s exports an allocation on %s", f.Path(), r.GPU, devs[a.Device].UUID)
			}
			if want := alignUp(need, 2<<20); int64(a.Size) != want || r.SlabBytes != want {
				t.Errorf("%s: slab of %d bytes (manifest %d), want the layout's %d rounded to 2 MiB = %d",
					f.Path(), a.Size, r.SlabBytes, need, want)
			}
			perGPU[r.GPU] += r.SlabBytes
			slab, err := g.fake.Read(a.Ptr, a.Size)
			if err != nil {
				t.Fatal(err)
			}
			for k, x := range h.Tensors {
				want := f.Bytes()[h.DataOffset()+x.Begin : h.DataOffset()+x.End]
				if got := slab[offsets[k] : offsets[k]+x.Size()]; !bytes.Equal(got, want) {
					t.Errorf("%s on %s: tensor %s at slab offset %d holds other bytes", f.Path(), r.GPU, x.Name, offsets[k])
				}
				if offsets[k]%SlabAlign != 0 {
					t.Errorf("%s: tensor %s at unaligned offset %d", f.Path(), x.Name, offsets[k])
				}
			}
		}
	}
	for _, f := range v.Files() {
		if f.Kind() == Plain {
			if _, ok := f.CUDAManifest(); ok {
				t.Errorf("plain file %s has a CUDA manifest", f.Path())
			}
			if f.Size() > 0 && g.fake.IsPinned(f.Bytes()) {
				t.Errorf("plain file %s is pinned", f.Path())
			}
		}
	}
	for uuid, n := range perGPU {
		if got := v.GPUBytes(uuid); got != n {
			t.Errorf("GPUBytes(%s) = %d, want %d", uuid, got, n)
		}
	}
}

// checkNothingOnGPUs checks that a version holds no slab and no pin, and
// that the fake has no allocation or pinned range left at all.
func (g *gpuStore) checkNothingOnGPUs(t *testing.T, v *Version) {
	t.Helper()
	if v != nil {
		for _, f := range v.Files() {
			if _, ok := f.CUDAManifest(); ok {
				t.Errorf("%s still has a CUDA manifest", f.Path())
			}
		}
		if got := v.Residency(); !reflect.DeepEqual(got, []string{"host"}) {
			t.Errorf("residency %v, want host only", got)
		}
	}
	if a := g.fake.Allocations(); len(a) != 0 {
		t.Errorf("device allocations left: %+v", a)
	}
	if p := g.fake.Pinned(); len(p) != 0 {
		t.Errorf("pinned ranges left: %+v", p)
	}
}

// checkHostBytes compares every served file with its source.
func checkHostBytes(t *testing.T, v *Version) {
	t.Helper()
	for _, f := range v.Files() {
		src, err := os.ReadFile(f.Source())
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(src, f.Bytes()) {
			t.Errorf("%s: served bytes differ from the source", f.Path())
		}
	}
}

func TestGPUReplication(t *testing.T) {
	for _, c := range []struct {
		name string
		ids  []string
	}{
		{"one GPU", []string{"0"}},
		{"two GPUs", []string{"0", "1"}},
		{"two GPUs by UUID, second first", []string{cudatest.H200(1).UUID, "0"}},
		{"same GPU twice", []string{"1", cudatest.H200(1).UUID}},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := newGPUStore(t, cudatest.Options{}, Budgets{}, c.ids...)
			dir := writeShardedFolder(t, 1)
			v, err := g.Load(context.Background(), "m", dir, LoadOptions{ChunkSize: 4096})
			if err != nil {
				t.Fatal(err)
			}
			checkHostBytes(t, v)
			g.checkOnGPUs(t, v)
			if st := g.fake.Stats(); st.HtoDBytes == 0 || st.HtoDPinnedBytes != st.HtoDBytes {
				t.Errorf("copies %+v: want every host-to-device byte from pinned memory", st)
			}
			u := g.Usage()
			if len(u.GPUs) != len(g.gpus.List()) {
				t.Fatalf("usage %+v", u)
			}
			for _, gu := range u.GPUs {
				if gu.Bytes != v.GPUBytes(gu.UUID) || gu.Bytes == 0 || gu.DeviceTotal != cudatest.H200TotalMem ||
					gu.DeviceFree != gu.DeviceTotal-uint64(gu.Bytes) || gu.Name != "NVIDIA H200" {
					t.Errorf("usage of %s: %+v", gu.UUID, gu)
				}
			}
			if _, err := g.Unload("m", 0); err != nil {
				t.Fatal(err)
			}
			g.checkNothingOnGPUs(t, v)
		})
	}
}

func TestGPUBudget(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{GPU: 3 << 20}, "0", "1")
	dir := writeShardedFolder(t, 2) // two shards: two 2 MiB slabs per GPU
	_, err := g.Load(context.Background(), "m", dir, LoadOptions{})
	if err == nil || !strings.Contains(err.Error(), "GPU memory") || !strings.Contains(err.Error(), dir) {
		t.Fatalf("over-budget load: %v", err)
	}
	if g.Model("m") != nil || g.Usage().HostReserved != 0 {
		t.Error("a refused load left something behind")
	}
	g.checkNothingOnGPUs(t, nil)

	g2 := newGPUStore(t, cudatest.Options{}, Budgets{GPU: 4 << 20}, "0", "1")
	v, err := g2.Load(context.Background(), "m", dir, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	g2.checkOnGPUs(t, v)
	// The budget is full now: a second load is refused, the first stays.
	if _, err := g2.Load(context.Background(), "m2", dir, LoadOptions{}); err == nil || !strings.Contains(err.Error(), "GPU memory") {
		t.Errorf("second load into a full budget: %v", err)
	}
	g2.checkOnGPUs(t, v)
}

func TestGPUTooLittleDeviceMemory(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0", "1")
	g.fake.SetMemoryLimit(1, 2<<20) // room for one 2 MiB slab, the model needs two
	dir := writeShardedFolder(t, 3)
	v, err := g.Load(context.Background(), "m", dir, LoadOptions{})
	if err != nil {
		t.Fatalf("load must succeed host-only: %v", err)
	}
	gerr := v.GPUError()
	if gerr == nil || !strings.Contains(gerr.Error(), "GPU memory") || !strings.Contains(gerr.Error(), cudatest.H200(1).UUID) {
		t.Fatalf("GPUError = %v, want one naming the short GPU", gerr)
	}
	if strings.Contains(gerr.Error(), cudatest.H200(0).UUID) {
		t.Errorf("GPUError names the GPU with room: %v", gerr)
	}
	checkHostBytes(t, v)
	g.checkNothingOnGPUs(t, v)
	if g.fake.Calls("cuMemAlloc_v2") != 0 {
		t.Error("the load allocated before finding the memory short")
	}
}

func TestGPUFailureMidUpload(t *testing.T) {
	for _, c := range []cudatest.Fault{
		{Call: "cuMemHostRegister_v2", Code: cuda.CodeOutOfMemory, After: 1},
		{Call: "cuMemAlloc_v2", Code: cuda.CodeOutOfMemory, After: 1},
		{Call: "cuMemAlloc_v2", Code: cuda.CodeOutOfMemory, After: 3},
		{Call: "cuMemcpyHtoDAsync_v2", Code: cudatest.CodeIllegalAddress, After: 2},
		{Call: "cuStreamSynchronize", Code: cudatest.CodeIllegalAddress, After: 3},
		{Call: "cuIpcGetMemHandle", Code: cuda.CodeInvalidValue, After: 2},
	} {
		t.Run(fmt.Sprintf("%s after %d", c.Call, c.After), func(t *testing.T) {
			g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0", "1")
			g.fake.Inject(c)
			dir := writeShardedFolder(t, 4)
			v, err := g.Load(context.Background(), "m", dir, LoadOptions{ChunkSize: 4096})
			if err != nil {
				t.Fatalf("load must succeed host-only: %v", err)
			}
			if g.fake.Calls(c.Call) <= c.After {
				t.Fatalf("%s called %d times: the fault never fired", c.Call, g.fake.Calls(c.Call))
			}
			if err := v.GPUError(); !errors.Is(err, &cuda.Error{Call: c.Call, Code: c.Code}) {
				t.Errorf("GPUError = %v, want the injected %s failure", err, c.Call)
			}
			checkHostBytes(t, v)
			g.checkNothingOnGPUs(t, v)
			if u := g.Usage(); u.GPUs[0].Bytes != 0 || u.GPUs[1].Bytes != 0 {
				t.Errorf("usage %+v", u.GPUs)
			}
		})
	}
}

func TestGPUUnloadWhileOpen(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0", "1")
	dir := writeShardedFolder(t, 5)
	v := load(t, g.Store, "m", dir)
	allocs := len(g.fake.Allocations())
	if allocs != 4 {
		t.Fatalf("%d slabs, want 2 files × 2 GPUs", allocs)
	}
	if !v.Acquire() {
		t.Fatal("acquire")
	}
	if _, err := g.Unload("m", 0); err != nil {
		t.Fatal(err)
	}
	if v.State() != StateDraining || len(g.fake.Allocations()) != allocs {
		t.Fatalf("state %s, %d slabs: an open file must keep them", v.State(), len(g.fake.Allocations()))
	}
	g.checkOnGPUs(t, v) // still whole, still pinned
	v.Release()
	g.checkNothingOnGPUs(t, nil)
}

// startHolder starts a child process that stands for an engine holding the
// version's GPU handles.
func startHolder(t *testing.T) *exec.Cmd {
	t.Helper()
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Skip("no sleep binary to stand for a handle holder: ", err)
	}
	cmd := exec.Command(sleep, "60")
	if err := cmd.Start(); err != nil {
		t.Skip("cannot start a handle holder: ", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	return cmd
}

// stopHolder ends the holder and reaps it (a zombie still counts as alive).
func stopHolder(t *testing.T, cmd *exec.Cmd) {
	t.Helper()
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
}

func TestGPUHandleHolderKeepsSlabs(t *testing.T) {
	t.Run("Run's reaper frees after the holder exits", func(t *testing.T) {
		g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0")
		v := load(t, g.Store, "m", writeShardedFolder(t, 6))
		holder := startHolder(t)
		v.NoteHandleHolder(holder.Process.Pid)
		if got := v.HandleHolders(); !reflect.DeepEqual(got, []int{holder.Process.Pid}) {
			t.Errorf("HandleHolders = %v", got)
		}
		if _, err := g.Unload("m", 0); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); g.Run(ctx, time.Millisecond) }()
		defer func() { cancel(); wg.Wait() }()
		// The reaper runs while the holder lives: the slabs stay.
		runs := g.fake.Calls("cuMemFree_v2")
		for range 20 {
			time.Sleep(time.Millisecond)
		}
		if len(g.fake.Allocations()) != 2 || g.fake.Calls("cuMemFree_v2") != runs {
			t.Fatalf("slabs freed while their holder lives: %v", g.fake.Allocations())
		}
		stopHolder(t, holder)
		for i := 0; len(g.fake.Allocations()) > 0; i++ {
			if i > 10000 { // ten seconds of a 1 ms reaper: it is not running
				t.Fatal("the reaper never freed the slabs after the holder exited")
			}
			time.Sleep(time.Millisecond)
		}
		cancel()
		wg.Wait()
		g.checkNothingOnGPUs(t, nil)
	})
	t.Run("the next reap frees", func(t *testing.T) {
		g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0")
		v := load(t, g.Store, "m", writeShardedFolder(t, 7))
		holder := startHolder(t)
		v.NoteHandleHolder(holder.Process.Pid)
		v.NoteHandleHolder(0) // ignored
		if !v.Acquire() {
			t.Fatal("acquire")
		}
		if _, err := g.Unload("m", 0); err != nil {
			t.Fatal(err)
		}
		stopHolder(t, holder)
		if len(g.fake.Allocations()) != 2 {
			t.Fatal("slabs freed while a file is open")
		}
		v.Release() // the last user: this reap frees
		g.checkNothingOnGPUs(t, nil)
		if len(v.HandleHolders()) != 0 {
			t.Errorf("HandleHolders after exit = %v", v.HandleHolders())
		}
	})
}

func TestGPUStoreCloseFreesEverything(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0", "1")
	dir := writeShardedFolder(t, 8)
	v1 := load(t, g.Store, "a", dir)
	load(t, g.Store, "a", dir)
	load(t, g.Store, "b", dir)
	v1.Acquire() // open files do not stop Close
	if _, err := g.Unload("a", 1); err != nil {
		t.Fatal(err)
	}
	if n := len(g.fake.Allocations()); n != 12 {
		t.Fatalf("%d slabs, want 3 versions × 2 files × 2 GPUs", n)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	g.checkNothingOnGPUs(t, nil)
}

func TestGPUConcurrentLoads(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0", "1")
	var wg sync.WaitGroup
	vs := make([]*Version, 4)
	errs := make([]error, 4)
	for i := range vs {
		dir := writeShardedFolder(t, uint64(10+i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			vs[i], errs[i] = g.Load(context.Background(), fmt.Sprintf("m%d", i), dir, LoadOptions{ChunkSize: 1024, Readers: 3})
		}()
	}
	wg.Wait()
	for i, v := range vs {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		g.checkOnGPUs(t, v)
	}
}

func TestOpenGPUsErrors(t *testing.T) {
	fake := cudatest.New(cudatest.Options{})
	defer fake.CheckClean(t)
	driver, err := fake.Driver()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := OpenGPUs(driver, []string{"0", "7"}); err == nil || !strings.Contains(err.Error(), "7") {
		t.Errorf("OpenGPUs with a missing GPU: %v", err)
	}
	fake.Inject(cudatest.Fault{Call: "cuStreamCreate", Code: cuda.CodeOutOfMemory, After: 3})
	if _, err := OpenGPUs(driver, []string{"0", "1"}); !errors.Is(err, &cuda.Error{Call: "cuStreamCreate", Code: cuda.CodeOutOfMemory}) ||
		!strings.Contains(err.Error(), cudatest.H200(1).UUID) {
		t.Errorf("OpenGPUs with a failing stream: %v", err)
	}
	fake.ClearFaults()
	fake.Inject(cudatest.Fault{Call: "cuDevicePrimaryCtxRetain", Code: cuda.CodeInvalidDevice, After: 1, Times: 1})
	if _, err := OpenGPUs(driver, []string{"0", "1"}); !errors.Is(err, &cuda.Error{Call: "cuDevicePrimaryCtxRetain", Code: cuda.CodeInvalidDevice}) {
		t.Errorf("OpenGPUs with a failing context: %v", err)
	}
	if c := fake.RetainedContexts(); len(c) != 0 {
		t.Errorf("a failed OpenGPUs kept contexts: %v", c)
	}
	var none *GPUs
	if none.List() != nil || none.Close() != nil {
		t.Error("nil GPUs")
	}
	gpus, err := OpenGPUs(driver, []string{"1"})
	if err != nil {
		t.Fatal(err)
	}
	if free, total, err := gpus.List()[0].MemInfo(); err != nil || free != total || gpus.List()[0].Device().Ordinal != 1 {
		t.Errorf("MemInfo %d/%d %v", free, total, err)
	}
	if err := gpus.Close(); err != nil {
		t.Fatal(err)
	}
}
