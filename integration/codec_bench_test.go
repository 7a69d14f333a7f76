package integration

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/weightfs/weightfs/store/codec"
	"github.com/weightfs/weightfs/store/codec/codectest"
)

// TestBenchReportCodec is the codec's part of `make bench`: trained-like
// BF16, F16 and F32 weights (codectest.Model) coded by store/codec, beside
// plain zstd of the same bytes (default and fastest level) and a memcpy,
// in one run, with ratios. A report, not a test: it asserts only that every
// round trip is exact, and runs only with WEIGHTFS_BENCH=1. It needs
// neither root nor FUSE. WEIGHTFS_BENCH_CODEC_MIB sets the size per dtype
// (256 MiB by default).
func TestBenchReportCodec(t *testing.T) {
	if os.Getenv("WEIGHTFS_BENCH") == "" {
		t.Skip("skipping: a benchmark report; run it with `make bench` (WEIGHTFS_BENCH=1)")
	}
	mib := 256
	if s := os.Getenv("WEIGHTFS_BENCH_CODEC_MIB"); s != "" {
		var err error
		if mib, err = strconv.Atoi(s); err != nil || mib <= 0 {
			t.Fatalf("WEIGHTFS_BENCH_CODEC_MIB=%q: want a positive number of MiB", s)
		}
	}
	const runs = 3
	cores := runtime.GOMAXPROCS(0)
	ours := codec.New(codec.Options{})
	defer ours.Close()
	planesOnly := codec.New(codec.Options{NoZstd: true})
	defer planesOnly.Close()
	zdec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	defer zdec.Close()

	type row struct {
		name                  string
		ratio                 float64
		enc, encN, dec1, decN float64 // GB/s of raw bytes; 0: not measured
	}
	var b strings.Builder
	fmt.Fprintf(&b, "\ncodec: %d MiB of trained-like weights per dtype, %d cores (GOMAXPROCS), GB/s (1e9 B/s) of raw bytes, median of %d runs after a warm-up;\n", mib, cores, runs)
	fmt.Fprintf(&b, "ratio = raw size / coded size; \"vs memcpy\" = decode on 1 core / memcpy on 1 core\n\n")
	fmt.Fprintf(&b, "| dtype | coder | ratio | encode, 1 core | encode, %d cores | decode, 1 core | decode, %d cores | 1-core decode vs memcpy |\n|---|---|---|---|---|---|---|---|\n", cores, cores)
	for _, dtype := range []string{"BF16", "F16", "F32"} {
		src, err := codectest.Model(dtype, mib<<20, 1)
		if err != nil {
			t.Fatal(err)
		}
		gbs := func(secs float64) float64 { return float64(len(src)) / secs / 1e9 }
		dst := make([]byte, len(src))
		var rows []row

		memcpy := row{name: "raw (memcpy)", ratio: 1}
		memcpy.dec1 = median(runs, func() float64 { return gbs(benchTime(func() { copy(dst, src) })) })
		rows = append(rows, memcpy)

		for _, cd := range []struct {
			name string
			c    *codec.Codec
		}{{"weightfs codec", ours}, {"weightfs codec, planes only (NoZstd)", planesOnly}} {
			var enc []byte
			r := row{name: cd.name}
			r.enc = median(runs, func() float64 {
				return gbs(benchTime(func() { enc, err = cd.c.Encode(enc[:0], src, dtype) }))
			})
			if err != nil {
				t.Fatal(err)
			}
			r.encN = median(runs, func() float64 {
				return gbs(benchTime(func() { enc, err = cd.c.EncodeParallel(context.Background(), enc[:0], src, dtype, cores) }))
			})
			if err != nil {
				t.Fatal(err)
			}
			r.ratio = float64(len(src)) / float64(len(enc))
			r.dec1 = median(runs, func() float64 {
				return gbs(benchTime(func() { err = cd.c.Decode(dst, enc) }))
			})
			benchSame(t, err, dst, src, cd.name)
			clear(dst)
			r.decN = median(runs, func() float64 {
				return gbs(benchTime(func() { err = cd.c.DecodeParallel(context.Background(), dst, enc, cores) }))
			})
			benchSame(t, err, dst, src, cd.name+" parallel")
			rows = append(rows, r)
		}

		for _, z := range []struct {
			name  string
			level zstd.EncoderLevel
		}{{"zstd default level, whole buffer", zstd.SpeedDefault}, {"zstd fastest level, whole buffer", zstd.SpeedFastest}} {
			zenc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(z.level), zstd.WithEncoderConcurrency(1))
			if err != nil {
				t.Fatal(err)
			}
			var enc, out []byte
			r := row{name: z.name}
			r.enc = median(runs, func() float64 { return gbs(benchTime(func() { enc = zenc.EncodeAll(src, enc[:0]) })) })
			zenc.Close()
			r.ratio = float64(len(src)) / float64(len(enc))
			r.dec1 = median(runs, func() float64 {
				return gbs(benchTime(func() { out, err = zdec.DecodeAll(enc, dst[:0]) }))
			})
			benchSame(t, err, out, src, z.name)
			rows = append(rows, r)
		}

		for _, r := range rows {
			f := func(v float64) string {
				if v == 0 {
					return "–"
				}
				return fmt.Sprintf("%.2f", v)
			}
			fmt.Fprintf(&b, "| %s | %s | %.3f× | %s | %s | %s | %s | %.2f× |\n", dtype, r.name, r.ratio, f(r.enc), f(r.encN), f(r.dec1), f(r.decN), r.dec1/memcpy.dec1)
		}
	}
	fmt.Fprintf(&b, "\ntargets (issue 10): ratio >= 1.4x on BF16, restore >= 1 GB/s per core\n")
	t.Log(b.String())
	fmt.Println(b.String())
}

func benchTime(f func()) float64 {
	start := time.Now()
	f()
	return time.Since(start).Seconds()
}

func benchSame(t *testing.T, err error, got, want []byte, what string) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: round trip differs", what)
	}
}
