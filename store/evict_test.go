package store

import (
	"bytes"
	"context"
	"errors"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/weightfs/weightfs/cuda/cudatest"
	"github.com/weightfs/weightfs/store/safetensors"
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
	want := `
# HELP weightfs_tier_moves_total Versions moved between memory tiers (from, to), by eviction or restore.
# TYPE weightfs_tier_moves_total counter
weightfs_tier_moves_total{from="compressed",to="dropped"} 0
weightfs_tier_moves_total{from="compressed",to="host"} 0
weightfs_tier_moves_total{from="gpu",to="host"} 2
weightfs_tier_moves_total{from="host",to="compressed"} 0
`
	if err := testutil.CollectAndCompare(g.Collector(), strings.NewReader(want), "weightfs_tier_moves_total"); err != nil {
		t.Error(err)
	}
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

// dropStore has a@1 and a@2 (current) of an incompressible folder (their
// streams are as large as their images) in a store with CompressIdle whose
// host budget holds two and a half; the log goes to logs.
func dropStore(t *testing.T) (s *Store, logs *logBuffer, dirA string, a1, a2 *Version, dirB string) {
	t.Helper()
	dirA, dirB = writeRandomFolder(t, 21), writeRandomFolder(t, 22)
	logs = &logBuffer{}
	s = New(OpenMemfdArena(), Options{CompressIdle: true, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	t.Cleanup(func() { s.Close() })
	cost := dirCost(t, s, dirA)
	s.budgets.Host = 2*cost + cost/2
	a1, a2 = load(t, s, "a", dirA), load(t, s, "a", dirA)
	settle(t, a1)
	settle(t, a2)
	return s, logs, dirA, a1, a2, dirB
}

// TestEvictionDropsReloadable: when compressing every idle version is not
// enough, the compressed non-current version whose source is unchanged
// leaves the mount, logged with how to get it back; the current one stays.
func TestEvictionDropsReloadable(t *testing.T) {
	s, logs, dirA, a1, a2, dirB := dropStore(t)
	want := snapshot(a2)
	b := load(t, s, "b", dirB)
	if got := s.Model("a").Version(1); got != nil {
		t.Fatalf("a@1 is still listed (tier %s)", got.Tier())
	}
	if a1.State() != StateDraining || a1.HostBytes() != 0 {
		t.Errorf("a@1: state %s, %d host bytes after the drop", a1.State(), a1.HostBytes())
	}
	if s.Model("a").Current() != a2 || a2.Tier() != TierCompressed {
		t.Fatalf("a@2 must stay, compressed: current %v, tier %s", s.Model("a").Current().Name(), a2.Tier())
	}
	line := ""
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, "to=dropped") {
			line = l
		}
	}
	if !strings.Contains(line, "version=a@1") || !strings.Contains(line, "weightfs load a "+dirA) {
		t.Errorf("drop log %q in:\n%s", line, logs)
	}
	// a@2 comes back byte for byte once there is room (b is a current
	// version too: it is compressed, never dropped).
	settle(t, b)
	if _, err := s.Unload("b", 0); err != nil {
		t.Fatal(err)
	}
	restoreAndCheck(t, a2, want)
}

// TestEvictionKeepsChangedSource: a version whose source changed since it
// was loaded cannot be re-loaded as it was: it is not dropped and the load
// is refused with the budget's message.
func TestEvictionKeepsChangedSource(t *testing.T) {
	s, _, dirA, a1, _, dirB := dropStore(t)
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(filepath.Join(dirA, "model.safetensors"), later, later); err != nil {
		t.Fatal(err)
	}
	_, err := s.Load(context.Background(), "b", dirB, LoadOptions{})
	var be *BudgetError
	if !errors.As(err, &be) || be.Tier != TierHost {
		t.Fatalf("load with nothing droppable: %v", err)
	}
	if s.Model("a").Version(1) != a1 || a1.State() != StateReady {
		t.Fatal("a@1 with a changed source was dropped")
	}
}

// writeRandomFolder writes a one-file model of 1 MiB of random bytes: its
// compressed stream is as large as its image.
func writeRandomFolder(t *testing.T, seed uint64) string {
	t.Helper()
	rng := rand.New(rand.NewPCG(seed, 9))
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	var b bytes.Buffer
	err := safetensors.Write(&b, []safetensors.Tensor{{Name: "w", DType: "U8", Shape: []int64{int64(len(data))}, Data: data}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for name, data := range map[string][]byte{"model.safetensors": b.Bytes(), "config.json": []byte("{}")} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestDropNeverPushed: a compressed, idle, non-current pushed version is
// not dropped, even with a snapshot on disk (one is loaded at a start only
// when it is the model's newest).
func TestDropNeverPushed(t *testing.T) {
	s, _ := snapStore(t, t.TempDir(), 0)
	p1 := pushSnapshotted(t, s, "p", 1)
	pushSnapshotted(t, s, "p", 2)
	settle(t, p1)
	if _, err := s.Compress(context.Background(), "p", p1.Number()); err != nil {
		t.Fatal(err)
	}
	if _, err := p1.reloadCommand(); err == nil || !strings.Contains(err.Error(), "pushed") {
		t.Errorf("reloadCommand of a pushed version: %v", err)
	}
	if s.dropOne("test") || s.Model("p").Version(p1.Number()) != p1 {
		t.Fatal("a pushed version was dropped")
	}
}
