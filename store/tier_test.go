package store

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/weightfs/weightfs/cuda/cudatest"
)

// settle waits for v's fill, checksums and snapshot: a version is
// compressed only after them.
func settle(t *testing.T, v *Version) {
	t.Helper()
	if v.bg != nil {
		<-v.bg.done
	}
}

// compressed checks v is in the compressed tier with its images freed.
func checkCompressed(t *testing.T, v *Version) {
	t.Helper()
	if v.Tier() != TierCompressed {
		t.Fatalf("%s is in tier %s, want compressed", v.Name(), v.Tier())
	}
	if v.CompressedBytes() <= 0 || v.HostBytes() != v.CompressedBytes() {
		t.Fatalf("%s: host bytes %d, compressed %d: want the streams only", v.Name(), v.HostBytes(), v.CompressedBytes())
	}
	for _, f := range v.Files() {
		if f.Bytes() != nil || f.BackingFd() != -1 || f.Residency()[0] != TierCompressed {
			t.Fatalf("%s/%s keeps a host image while compressed", v.Name(), f.Path())
		}
	}
}

// restoreAndCheck opens v as a reader does and checks every byte.
func restoreAndCheck(t *testing.T, v *Version, want map[string][]byte) {
	t.Helper()
	if !v.Acquire() {
		t.Fatal("acquire failed")
	}
	defer v.Release()
	if err := v.EnsureHost(context.Background()); err != nil {
		t.Fatal(err)
	}
	if v.Tier() != TierHost || v.CompressedBytes() != 0 {
		t.Fatalf("%s is in tier %s after the restore", v.Name(), v.Tier())
	}
	sameVersion(t, v, want)
	checkChecksums(t, v)
}

func TestCompressRestoreLoaded(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0")
	v := loadBase(t, g.Store, "m")
	settle(t, v)
	want := snapshot(v)
	gpuBefore := v.GPUBytes(g.gpus.List()[0].UUID())
	if _, err := g.Compress(context.Background(), "m", v.Number()); err != nil {
		t.Fatal(err)
	}
	checkCompressed(t, v)
	if v.GPUBytes(g.gpus.List()[0].UUID()) != gpuBefore || gpuBefore == 0 {
		t.Fatalf("GPU replicas changed by compression: %d bytes, were %d", v.GPUBytes(g.gpus.List()[0].UUID()), gpuBefore)
	}
	for _, f := range v.Files() {
		if f.Size() != int64(len(want[f.Path()])) {
			t.Fatalf("%s: size %d while compressed, want %d", f.Path(), f.Size(), len(want[f.Path()]))
		}
	}
	restoreAndCheck(t, v, want)
	// Again, round trip twice.
	if _, err := g.Compress(context.Background(), "m", v.Number()); err != nil {
		t.Fatal(err)
	}
	restoreAndCheck(t, v, want)
	if g.moveCompress.Load() != 2 || g.moveRestore.Load() != 2 {
		t.Fatalf("moves counted: %d compress, %d restore", g.moveCompress.Load(), g.moveRestore.Load())
	}
}

func TestCompressRestorePushed(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0")
	base := loadBase(t, g.Store, "m")
	v, _ := g.pushOnGPU(t, "m", manifestOf(base), 3)
	settle(t, v)
	want := snapshot(v)
	if _, err := g.Compress(context.Background(), "m", v.Number()); err != nil {
		t.Fatal(err)
	}
	checkCompressed(t, v)
	restoreAndCheck(t, v, want)
}

// TestRestoreChecksumMismatch: restored bytes that differ from the
// recorded XXH3 are refused, and the version stays compressed.
func TestRestoreChecksumMismatch(t *testing.T) {
	s := newTestStore(t, Budgets{})
	v := load(t, s, "m", writeFolder(t, 1<<20))
	settle(t, v)
	want := snapshot(v)
	if _, err := s.Compress(context.Background(), "m", v.Number()); err != nil {
		t.Fatal(err)
	}
	f := v.Files()[0]
	f.sum ^= 1
	v.Acquire()
	err := v.EnsureHost(context.Background())
	v.Release()
	if err == nil || !strings.Contains(err.Error(), "checksum") || !strings.Contains(err.Error(), f.Path()) {
		t.Fatalf("restore with a wrong checksum: %v", err)
	}
	if v.Tier() != TierCompressed {
		t.Fatal("a failed restore left the compressed tier")
	}
	f.sum ^= 1
	restoreAndCheck(t, v, want)
}

func TestCompressRefusesInUse(t *testing.T) {
	g := newGPUStore(t, cudatest.Options{}, Budgets{}, "0")
	v := loadBase(t, g.Store, "m")
	settle(t, v)
	v.Acquire()
	if _, err := g.Compress(context.Background(), "m", v.Number()); !errors.Is(err, ErrBusy) {
		t.Fatalf("compress of an open version: %v", err)
	}
	v.Release()
	holder := startHolder(t)
	v.NoteHandleHolder(holder.Process.Pid)
	if _, err := g.Compress(context.Background(), "m", v.Number()); !errors.Is(err, ErrBusy) {
		t.Fatalf("compress of a held version: %v", err)
	}
	if v.Tier() != TierHost || v.GPUBytes(g.gpus.List()[0].UUID()) == 0 {
		t.Fatal("a held version was moved")
	}
	stopHolder(t, holder)
	if _, err := g.Compress(context.Background(), "m", v.Number()); err != nil {
		t.Fatal(err)
	}
}

// twoOfThree loads two versions in a store with CompressIdle whose host
// budget holds two and a half; dirC is a third of the same size.
func twoOfThree(t *testing.T) (s *Store, a, b *Version, dirC string) {
	dirA, dirB, dirC := writeFolder(t, 4<<20), writeFolder(t, 4<<20), writeFolder(t, 4<<20)
	s = newTestStore(t, Budgets{})
	s.compressIdle = true
	cost := dirCost(t, s, dirA)
	s.budgets.Host = 2*cost + cost/2
	a, b = load(t, s, "a", dirA), load(t, s, "b", dirB)
	settle(t, a)
	settle(t, b)
	return s, a, b, dirC
}

// TestEvictionCompressesLRU: a load refused by the host budget compresses
// the least recently used idle version and goes on; restoring that one
// evicts the next.
func TestEvictionCompressesLRU(t *testing.T) {
	s, a, b, dirC := twoOfThree(t)
	wantA := snapshot(a)
	b.Acquire() // b is used after a: a is the least recently used
	b.Release()
	c := load(t, s, "c", dirC)
	settle(t, c)
	if a.Tier() != TierCompressed || b.Tier() != TierHost || c.Tier() != TierHost {
		t.Fatalf("tiers after the third load: a %s, b %s, c %s", a.Tier(), b.Tier(), c.Tier())
	}
	restoreAndCheck(t, a, wantA) // evicts b, now the least recently used
	if b.Tier() != TierCompressed {
		t.Fatalf("b is %s after a's restore", b.Tier())
	}
}

// TestEvictionSparesOpenFiles: with every version open, a load is refused
// with the budget's message and nothing is evicted.
func TestEvictionSparesOpenFiles(t *testing.T) {
	s, a, b, dirC := twoOfThree(t)
	a.Acquire()
	defer a.Release()
	holder := startHolder(t)
	b.NoteHandleHolder(holder.Process.Pid)
	_, err := s.Load(context.Background(), "c", dirC, LoadOptions{})
	var be *BudgetError
	if !errors.As(err, &be) || be.Tier != TierHost {
		t.Fatalf("load over the budget with everything in use: %v", err)
	}
	if a.Tier() != TierHost || b.Tier() != TierHost {
		t.Fatal("an open or held version was evicted")
	}
}

// TestTierConcurrency: readers open, restore and read while versions are
// compressed again and again (go test -race).
func TestTierConcurrency(t *testing.T) {
	s := newTestStore(t, Budgets{})
	v := loadBase(t, s, "m")
	settle(t, v)
	want := snapshot(v)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for ctx.Err() == nil {
			if _, err := s.Compress(ctx, "m", v.Number()); err != nil && !errors.Is(err, ErrBusy) && ctx.Err() == nil {
				t.Error(err)
				return
			}
			s.Usage()
			v.Residency()
		}
	}()
	var readers sync.WaitGroup
	for range 4 {
		readers.Add(1)
		go func() {
			defer readers.Done()
			for range 20 {
				if !v.Acquire() {
					t.Error("acquire failed")
					return
				}
				if err := v.EnsureHost(ctx); err != nil {
					t.Error(err)
				}
				for _, f := range v.Files() {
					if string(f.Bytes()) != string(want[f.Path()]) {
						t.Errorf("%s differs while open", f.Path())
					}
				}
				v.Release()
			}
		}()
	}
	readers.Wait()
	cancel()
	wg.Wait()
}
