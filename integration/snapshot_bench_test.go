package integration

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/store/codec"
	"github.com/weightfs/weightfs/store/codec/codectest"
	"github.com/weightfs/weightfs/store/safetensors"
)

// TestBenchReportSnapshot is the snapshots' part of `make bench`: a
// trained-like BF16 safetensors file (1 GiB by default,
// WEIGHTFS_BENCH_SNAPSHOT_MIB) written to the same disk folder raw and as a
// snapshot stream (what --snapshot-dir writes), then loaded into memory from
// a cold page cache: raw = read the file; snapshot = read the stream, then
// DecodeParallel on GOMAXPROCS workers, and DecodeReader (blocks decoded
// as they are read, what the daemon does). The folder is
// WEIGHTFS_BENCH_DIR, else the temporary folder; a tmpfs is refused (it
// has no disk to measure). The page cache is dropped for the two files
// only, without root: fsync, then posix_fadvise(POSIX_FADV_DONTNEED) before
// every run. A report, not a test: it asserts only that the bytes round
// trip, and runs only with WEIGHTFS_BENCH=1.
func TestBenchReportSnapshot(t *testing.T) {
	if os.Getenv("WEIGHTFS_BENCH") == "" {
		t.Skip("skipping: a benchmark report; run it with `make bench` (WEIGHTFS_BENCH=1)")
	}
	mib := 1024
	if s := os.Getenv("WEIGHTFS_BENCH_SNAPSHOT_MIB"); s != "" {
		var err error
		if mib, err = strconv.Atoi(s); err != nil || mib <= 0 {
			t.Fatalf("WEIGHTFS_BENCH_SNAPSHOT_MIB=%q: want a positive number of MiB", s)
		}
	}
	base := os.Getenv("WEIGHTFS_BENCH_DIR")
	if base == "" {
		base = os.TempDir()
	}
	dir, err := os.MkdirTemp(base, "weightfs-snapshot-bench-")
	must(t, err)
	defer os.RemoveAll(dir)
	var fs unix.Statfs_t
	must(t, unix.Statfs(dir, &fs))
	if fs.Type == unix.TMPFS_MAGIC {
		t.Skipf("%s is a tmpfs: set WEIGHTFS_BENCH_DIR to a folder on a disk", base)
	}

	weights, err := codectest.Model("BF16", mib<<20, 1)
	must(t, err)
	var file bytes.Buffer
	must(t, safetensors.Write(&file, []safetensors.Tensor{
		{Name: "model.weights", DType: "BF16", Shape: []int64{int64(len(weights) / 2)}, Data: weights}}, nil))
	weights = nil
	raw := file.Bytes()
	c := codec.New(codec.Options{})
	defer c.Close()
	start := time.Now()
	enc, err := c.EncodeSafetensors(context.Background(), make([]byte, 0, len(raw)+len(raw)/1024+1<<20), raw, 0)
	must(t, err)
	encSecs := time.Since(start).Seconds()
	rawPath, snapPath := filepath.Join(dir, "model.safetensors"), filepath.Join(dir, "0.wfsc")
	writeSynced(t, rawPath, raw)
	writeSynced(t, snapPath, enc)
	rawLen, encLen := len(raw), len(enc)
	enc = nil

	dst := make([]byte, rawLen)
	scratch := make([]byte, encLen)
	const runs = 3
	var rawT, snapT, streamT []float64
	// timed loads path into dst from a cold page cache with load, records
	// the seconds and checks the bytes.
	timed := func(times *[]float64, path, what string, load func()) {
		dropCache(t, path)
		start := time.Now()
		load()
		*times = append(*times, time.Since(start).Seconds())
		if !bytes.Equal(dst, raw) {
			t.Fatalf("%s: other bytes than written", what)
		}
		clear(dst)
	}
	for range runs {
		timed(&rawT, rawPath, "the raw file read back", func() { readInto(t, rawPath, dst) })
		timed(&snapT, snapPath, "the snapshot decoded", func() {
			readInto(t, snapPath, scratch)
			must(t, c.DecodeParallel(context.Background(), dst, scratch, runtime.GOMAXPROCS(0)))
		})
		timed(&streamT, snapPath, "the streamed snapshot decoded", func() {
			f, err := os.Open(snapPath)
			must(t, err)
			err = c.DecodeReader(context.Background(), dst, f, int64(encLen), runtime.GOMAXPROCS(0))
			f.Close()
			must(t, err)
		})
	}
	med := func(x []float64) float64 { s := append([]float64(nil), x...); sort.Float64s(s); return s[len(s)/2] }
	gb := func(sec float64) float64 { return float64(rawLen) / sec / 1e9 }
	fmt.Printf("\nsnapshot: %d MiB trained-like BF16 safetensors on %s, cold page cache (fadvise DONTNEED), %d cores, %d runs\n",
		mib, base, runtime.GOMAXPROCS(0), runs)
	fmt.Printf("sizes: raw %d B, snapshot %d B, ratio %.3f; encode %.2f s (%.2f GB/s)\n",
		rawLen, encLen, float64(rawLen)/float64(encLen), encSecs, gb(encSecs))
	fmt.Printf("| load | runs (s) | median (s) | GB/s of raw bytes |\n|---|---|---|---|\n")
	fmt.Printf("| raw read | %s | %.3f | %.2f |\n", fmtRuns(rawT), med(rawT), gb(med(rawT)))
	fmt.Printf("| snapshot: read, then DecodeParallel | %s | %.3f | %.2f |\n", fmtRuns(snapT), med(snapT), gb(med(snapT)))
	fmt.Printf("| snapshot: DecodeReader (blocks decoded as read; the daemon's load) | %s | %.3f | %.2f |\n", fmtRuns(streamT), med(streamT), gb(med(streamT)))
	fmt.Printf("snapshot load / raw load time (medians): read then decode %.3f, DecodeReader %.3f (below 1: the snapshot loads faster)\n",
		med(snapT)/med(rawT), med(streamT)/med(rawT))
}

func fmtRuns(x []float64) string {
	s := ""
	for i, v := range x {
		if i > 0 {
			s += ", "
		}
		s += strconv.FormatFloat(v, 'f', 3, 64)
	}
	return s
}

func writeSynced(t testing.TB, path string, b []byte) {
	t.Helper()
	f, err := os.Create(path)
	must(t, err)
	defer f.Close()
	_, err = f.Write(b)
	must(t, err)
	must(t, f.Sync())
}

// dropCache evicts path's pages from the page cache (they are clean: the
// file was fsynced), which needs no root.
func dropCache(t testing.TB, path string) {
	t.Helper()
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	must(t, unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED))
}

func readInto(t testing.TB, path string, dst []byte) {
	t.Helper()
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	_, err = io.ReadFull(f, dst)
	must(t, err)
}
