package store

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/weightfs/weightfs/cuda/cudatest"
)

// gpuEvictStore has model m at versions 1 and 2 (2 current), each with two
// 2 MiB slabs on one fake GPU, settled, eviction on; budget is the GPU
// budget (0: none).
func gpuEvictStore(t *testing.T, budget int64) (g *gpuStore, dir string, v1, v2 *Version) {
	t.Helper()
	g = newGPUStoreWith(t, cudatest.Options{}, Options{Budgets: Budgets{GPU: budget}, Logger: quiet, CompressIdle: true}, "0")
	dir = writeShardedFolder(t, 11)
	v1, v2 = load(t, g.Store, "m", dir), load(t, g.Store, "m", dir)
	settle(t, v1)
	settle(t, v2)
	g.checkOnGPUs(t, v1)
	g.checkOnGPUs(t, v2)
	return g, dir, v1, v2
}

// checkEvictedFromGPU: v has no slab left and still serves its bytes from
// the host; its files have no CUDA manifest (ENODATA on the mount).
func (g *gpuStore) checkEvictedFromGPU(t *testing.T, v *Version) {
	t.Helper()
	if n := v.GPUBytes(g.gpus.List()[0].UUID()); n != 0 {
		t.Fatalf("%s keeps %d bytes on the GPU", v.Name(), n)
	}
	for _, f := range v.Files() {
		if _, ok := f.CUDAManifest(); ok {
			t.Errorf("%s/%s still has a CUDA manifest", v.Name(), f.Path())
		}
		if _, ok := v.HandOut(1, f.CUDAManifest); ok {
			t.Errorf("%s/%s handed out handles", v.Name(), f.Path())
		}
		if r := f.Residency(); len(r) != 1 || r[0] != TierHost {
			t.Errorf("%s/%s residency %v", v.Name(), f.Path(), r)
		}
	}
	if len(v.HandleHolders()) != 0 {
		t.Errorf("a handle request without a manifest recorded holders %v", v.HandleHolders())
	}
	checkHostBytes(t, v)
}

// TestGPUEvictionForBudget: a load over the GPU budget frees the replicas
// of the old, non-current version and gets its own.
func TestGPUEvictionForBudget(t *testing.T) {
	g, dir, v1, v2 := gpuEvictStore(t, 8<<20)
	v3 := load(t, g.Store, "m", dir)
	g.checkOnGPUs(t, v3)
	g.checkEvictedFromGPU(t, v1)
	g.checkOnGPUs(t, v2) // it was current: never chosen
	// The next load finds only v2 (not current any more) to free.
	settle(t, v3)
	v4 := load(t, g.Store, "m", dir)
	g.checkOnGPUs(t, v4)
	g.checkEvictedFromGPU(t, v2)
	g.checkOnGPUs(t, v3)
}

// TestGPUEvictionForDeviceMemory: with no budget, a device whose free
// memory is short has the old version's replicas freed instead of the
// load going host-only.
func TestGPUEvictionForDeviceMemory(t *testing.T) {
	g, dir, v1, v2 := gpuEvictStore(t, 0)
	g.fake.SetMemoryLimit(0, 8<<20)
	v3 := load(t, g.Store, "m", dir)
	g.checkOnGPUs(t, v3)
	g.checkEvictedFromGPU(t, v1)
	g.checkOnGPUs(t, v2)
}

// TestGPUEvictionSparesUsed: a version a live process holds handles of, or
// has open, keeps its replicas, and the load is refused with the budget's
// message; once the holder released them it can go.
func TestGPUEvictionSparesUsed(t *testing.T) {
	g, dir, v1, v2 := gpuEvictStore(t, 8<<20)
	holder := startHolder(t)
	var f *File
	for _, x := range v1.Files() {
		if x.Kind() == Weights {
			f = x
		}
	}
	if _, ok := v1.HandOut(holder.Process.Pid, f.CUDAManifest); !ok {
		t.Fatal("no manifest handed out")
	}
	_, err := g.Load(context.Background(), "m", dir, LoadOptions{})
	var be *BudgetError
	if !errors.As(err, &be) || be.Tier != TierGPU || !strings.Contains(err.Error(), "GPU memory") {
		t.Fatalf("load with the old version held: %v", err)
	}
	g.checkOnGPUs(t, v1)
	g.checkOnGPUs(t, v2)

	v1.ReleaseHandles(holder.Process.Pid) // released: it does not count
	if !v1.Acquire() {
		t.Fatal("acquire")
	}
	if _, err := g.Load(context.Background(), "m", dir, LoadOptions{}); !errors.As(err, &be) {
		t.Fatalf("load with the old version open: %v", err)
	}
	g.checkOnGPUs(t, v1)
	v1.Release()
	v3 := load(t, g.Store, "m", dir)
	g.checkOnGPUs(t, v3)
	g.checkEvictedFromGPU(t, v1)
}

// TestGPUEvictionCurrentOnly: the current version is never freed; the
// load is refused (without CompressIdle, TestGPUBudget).
func TestGPUEvictionCurrentOnly(t *testing.T) {
	g := newGPUStoreWith(t, cudatest.Options{}, Options{Budgets: Budgets{GPU: 4 << 20}, Logger: quiet, CompressIdle: true}, "0")
	dir := writeShardedFolder(t, 12)
	v1 := load(t, g.Store, "m", dir)
	settle(t, v1)
	_, err := g.Load(context.Background(), "m", dir, LoadOptions{})
	var be *BudgetError
	if !errors.As(err, &be) || be.Tier != TierGPU {
		t.Fatalf("load over the budget with only the current version: %v", err)
	}
	g.checkOnGPUs(t, v1)
}
