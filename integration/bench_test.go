package integration

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/safetensors"
)

// TestBenchReport is `make bench`: the same 2 GiB checkpoint read from a
// file on tmpfs and from the mount (passthrough, then cached), side by side
// in one run, printed with ratios. It is a report, not a test: it asserts
// nothing about speed and runs only with WEIGHTFS_BENCH=1.
func TestBenchReport(t *testing.T) {
	if os.Getenv("WEIGHTFS_BENCH") == "" {
		t.Skip("skipping: a benchmark report; run it with `make bench` (WEIGHTFS_BENCH=1)")
	}
	requireFUSE(t)
	gib := 2
	if s := os.Getenv("WEIGHTFS_BENCH_GIB"); s != "" {
		gib, _ = strconv.Atoi(s)
	}
	runs := 5

	// The baseline: a plain tmpfs file (4 KiB pages), as in /dev/shm.
	shm := t.TempDir()
	must(t, unix.Mount("bench-tmpfs", shm, "tmpfs", 0, "size=90%"))
	t.Cleanup(func() { unix.Unmount(shm, unix.MNT_DETACH) })
	src := filepath.Join(shm, "model")
	writeBigCheckpoint(t, filepath.Join(src, "model.safetensors"), int64(gib)<<30)
	writeFile(t, filepath.Join(src, "config.json"), `{"model_type":"bench"}`)
	tmpfsFile := filepath.Join(src, "model.safetensors")

	type row struct {
		name        string
		read, touch float64 // GB/s
	}
	measure := func(name, path string) row {
		r := row{name: name}
		r.read = median(runs, func() float64 { return readThroughput(t, path) })
		r.touch = median(runs, func() float64 { return touchThroughput(t, path) })
		return r
	}
	rows := []row{measure("tmpfs file (baseline)", tmpfsFile)}
	var loads []string
	for _, mode := range readModes {
		m := mountStore(t, mode.cached)
		start := time.Now()
		v, err := m.store.Load(context.Background(), "bench", src, store.LoadOptions{}) // the daemon's defaults
		must(t, err)
		secs := time.Since(start).Seconds()
		loads = append(loads, fmt.Sprintf("load into %s mount: %.2f s, %.2f GB/s", mode.name, secs, float64(v.Bytes())/secs/1e9))
		rows = append(rows, measure("weightfs "+m.srv.Mode().String(), filepath.Join(m.dir, "bench", "model.safetensors")))
	}

	var b strings.Builder
	fmt.Fprintf(&b, "\n%d GiB safetensors file, median of %d runs, GB/s (1e9 B/s); ratio = weightfs / tmpfs\n\n", gib, runs)
	fmt.Fprintf(&b, "| path | read 1 MiB | ratio | mmap touch each 4 KiB page | ratio |\n|---|---|---|---|---|\n")
	base := rows[0]
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %.2f | %.2f× | %.2f | %.2f× |\n", r.name, r.read, r.read/base.read, r.touch, r.touch/base.touch)
	}
	for _, l := range loads {
		fmt.Fprintf(&b, "\n%s", l)
	}
	t.Log(b.String())
	fmt.Println(b.String())
}

// writeBigCheckpoint writes a safetensors file of about size bytes with
// non-zero contents (8 tensors of BF16).
func writeBigCheckpoint(t testing.TB, path string, size int64) {
	t.Helper()
	const tensors = 8
	per := size / tensors / 2 / 4096 * 4096 // BF16 elements per tensor
	var infos []safetensors.TensorInfo
	for i := range tensors {
		infos = append(infos, safetensors.TensorInfo{Name: fmt.Sprintf("layer.%d.weight", i), DType: "BF16", Shape: []int64{per / 4096, 4096}})
	}
	prefix, placed, err := safetensors.EncodeHeader(infos, map[string]string{"format": "pt"})
	must(t, err)
	must(t, os.MkdirAll(filepath.Dir(path), 0o755))
	f, err := os.Create(path)
	must(t, err)
	defer f.Close()
	_, err = f.Write(prefix)
	must(t, err)
	chunk := make([]byte, 8<<20)
	for i := range chunk {
		chunk[i] = byte(i*131 + i>>9)
	}
	total := placed[len(placed)-1].End
	for written := int64(0); written < total; {
		n := min(int64(len(chunk)), total-written)
		_, err := f.Write(chunk[:n])
		must(t, err)
		written += n
	}
}

func median(n int, f func() float64) float64 {
	f() // warm up
	var xs []float64
	for range n {
		xs = append(xs, f())
	}
	slices.Sort(xs)
	return xs[len(xs)/2]
}

// readThroughput reads the whole file sequentially in 1 MiB reads.
func readThroughput(t testing.TB, path string) float64 {
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	buf := make([]byte, 1<<20)
	start := time.Now()
	var total int64
	for {
		n, err := f.Read(buf)
		total += int64(n)
		if err == io.EOF {
			break
		}
		must(t, err)
	}
	return float64(total) / time.Since(start).Seconds() / 1e9
}

// touchThroughput maps the file and touches one byte in every 4 KiB page,
// as a loader that mmaps safetensors does.
func touchThroughput(t testing.TB, path string) float64 {
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	st, err := f.Stat()
	must(t, err)
	start := time.Now()
	mem, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	must(t, err)
	var sum byte
	for off := 0; off < len(mem); off += 4096 {
		sum += mem[off]
	}
	must(t, unix.Munmap(mem))
	secs := time.Since(start).Seconds()
	runtime.KeepAlive(sum)
	return float64(st.Size()) / secs / 1e9
}
