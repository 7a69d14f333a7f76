package codec_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/weightfs/weightfs/store/codec"
	"github.com/weightfs/weightfs/store/codec/codectest"
	"github.com/weightfs/weightfs/store/safetensors"
)

var allDTypes = append([]string{"", "NOT_A_DTYPE"}, func() []string {
	var s []string
	for _, d := range safetensors.DTypes {
		s = append(s, string(d))
	}
	return s
}()...)

func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func trained(t testing.TB, dtype string, n int, seed uint64) []byte {
	t.Helper()
	if codectest.ElemSize(dtype) == 0 {
		// Another dtype: small integers, as quantized or index tensors hold.
		r := rand.New(rand.NewPCG(seed, 2))
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.NormFloat64() * 8)
		}
		return b
	}
	b, err := codectest.Model(dtype, n, seed)
	if err != nil {
		t.Fatal(err)
	}
	return append(b, randomBytes(n-len(b), seed)...) // a ragged tail, if any
}

func roundTrip(t testing.TB, c *codec.Codec, src []byte, dtype string) []byte {
	t.Helper()
	enc, err := c.Encode(nil, src, dtype)
	if err != nil {
		t.Fatalf("encode %d bytes of %q: %v", len(src), dtype, err)
	}
	if par, err := c.EncodeParallel(context.Background(), nil, src, dtype, 3); err != nil || !bytes.Equal(par, enc) {
		t.Fatalf("EncodeParallel of %d bytes of %q: %v, or a different stream", len(src), dtype, err)
	}
	n, err := codec.RawSize(enc)
	if err != nil || n != int64(len(src)) {
		t.Fatalf("RawSize = %d, %v; want %d", n, err, len(src))
	}
	got := make([]byte, n)
	if err := c.Decode(got, enc); err != nil {
		t.Fatalf("decode %d bytes of %q: %v", len(src), dtype, err)
	}
	if !bytes.Equal(got, src) {
		t.Fatalf("round trip of %d bytes of %q differs", len(src), dtype)
	}
	par := make([]byte, n)
	if err := c.DecodeParallel(context.Background(), par, enc, 4); err != nil || !bytes.Equal(par, src) {
		t.Fatalf("parallel decode of %d bytes of %q: err %v, equal %v", len(src), dtype, err, bytes.Equal(par, src))
	}
	return enc
}

func TestRoundTrip(t *testing.T) {
	small := codec.New(codec.Options{BlockSize: codec.MinBlockSize})
	defer small.Close()
	noZstd := codec.New(codec.Options{BlockSize: codec.MinBlockSize, NoZstd: true})
	defer noZstd.Close()
	bs := codec.MinBlockSize
	sizes := []int{0, 1, 2, 3, 7, 100, 1001, codec.ChunkSize*2 + 3, bs - 1, bs, bs + 1, 3*bs + 5}
	contents := map[string]func(n int, dtype string) []byte{
		"zero":    func(n int, _ string) []byte { return make([]byte, n) },
		"random":  func(n int, _ string) []byte { return randomBytes(n, uint64(n)) },
		"trained": func(n int, dt string) []byte { return trained(t, dt, n, uint64(n)) },
		"ramp": func(n int, _ string) []byte {
			b := make([]byte, n)
			for i := range b {
				b[i] = byte(i / 1000)
			}
			return b
		},
	}
	for _, dt := range allDTypes {
		for _, make := range contents {
			for _, n := range sizes {
				src := make(n, dt)
				for _, c := range []*codec.Codec{small, noZstd} {
					roundTrip(t, c, src, dt)
				}
			}
		}
	}
}

// TestRatio pins the figures the compressed tier is for: trained-like BF16
// in byte planes beats 1.4x, and every block of it is coded as planes.
func TestRatio(t *testing.T) {
	c := codec.New(codec.Options{})
	defer c.Close()
	for _, tc := range []struct {
		dtype string
		min   float64
	}{{"BF16", 1.4}, {"F16", 1.1}, {"F32", 1.1}} {
		src := trained(t, tc.dtype, 8<<20, 7)
		enc := roundTrip(t, c, src, tc.dtype)
		ratio := float64(len(src)) / float64(len(enc))
		t.Logf("%s: %.3fx", tc.dtype, ratio)
		if ratio < tc.min {
			t.Errorf("%s: ratio %.3f, want >= %.2f", tc.dtype, ratio, tc.min)
		}
		infos, err := codec.Info(enc)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range infos {
			if b.Method != "planes" || b.DType != tc.dtype {
				t.Errorf("%s block %d: method %s dtype %q, want planes", tc.dtype, b.Index, b.Method, b.DType)
			}
		}
	}
	// Zeros and repeated text go to whichever is smallest, and small.
	zeros := roundTrip(t, c, make([]byte, 4<<20), "BF16")
	if len(zeros) > 4<<10 {
		t.Errorf("4 MiB of zeros encode to %d bytes", len(zeros))
	}
	text := []byte(strings.Repeat("the quick brown fox ", 100000))
	if enc := roundTrip(t, c, text, ""); len(enc) > len(text)/20 {
		t.Errorf("repeated text: %d bytes from %d", len(enc), len(text))
	}
	random := randomBytes(3<<20, 1)
	if enc := roundTrip(t, c, random, "F32"); len(enc) > len(random)+len(random)/1000 {
		t.Errorf("random bytes: %d bytes from %d, want raw plus headers", len(enc), len(random))
	}
}

func TestEncodeAppends(t *testing.T) {
	c := codec.New(codec.Options{})
	defer c.Close()
	src := trained(t, "BF16", 100000, 3)
	enc, err := c.Encode([]byte("prefix"), src, "BF16")
	if err != nil || string(enc[:6]) != "prefix" {
		t.Fatalf("Encode did not append: %v", err)
	}
	got := make([]byte, len(src))
	if err := c.Decode(got, enc[6:]); err != nil || !bytes.Equal(got, src) {
		t.Fatalf("decode after prefix: %v", err)
	}
	if err := c.Decode(got[:10], enc[6:]); err == nil || errors.Is(err, codec.ErrCorrupt) {
		t.Fatalf("short destination: %v, want a size error", err)
	}
}

func TestSafetensors(t *testing.T) {
	c := codec.New(codec.Options{BlockSize: codec.MinBlockSize})
	defer c.Close()
	var tensors []safetensors.Tensor
	add := func(name, dtype string, rows, cols int, data []byte) {
		tensors = append(tensors, safetensors.Tensor{Name: name, DType: safetensors.DType(dtype), Shape: []int64{int64(rows), int64(cols)}, Data: data})
	}
	for i, dt := range []string{"BF16", "F16", "F32", "BF16"} {
		for l := range 3 {
			w, err := codectest.Tensor(codectest.Linear, dt, 96, 512, uint64(10*i+l))
			if err != nil {
				t.Fatal(err)
			}
			add(fmt.Sprintf("layer%d.%d.weight", i, l), dt, 96, 512, w)
			n, _ := codectest.Tensor(codectest.LayerNorm, dt, 1, 512, uint64(10*i+l))
			add(fmt.Sprintf("layer%d.%d.norm", i, l), dt, 1, 512, n)
		}
	}
	add("ids", "I64", 3, 5, make([]byte, 3*5*8))
	add("q", "F8_E4M3", 33, 17, randomBytes(33*17, 5))
	add("empty", "BF16", 0, 4, nil)
	var file bytes.Buffer
	if err := safetensors.Write(&file, tensors, map[string]string{"format": "pt"}); err != nil {
		t.Fatal(err)
	}
	enc, err := c.EncodeSafetensors(context.Background(), nil, file.Bytes(), 1)
	if err != nil {
		t.Fatal(err)
	}
	if par, err := c.EncodeSafetensors(context.Background(), nil, file.Bytes(), 3); err != nil || !bytes.Equal(par, enc) {
		t.Fatalf("parallel EncodeSafetensors: %v, or a different stream", err)
	}
	got := make([]byte, file.Len())
	if err := c.DecodeParallel(context.Background(), got, enc, 3); err != nil || !bytes.Equal(got, file.Bytes()) {
		t.Fatalf("safetensors round trip: %v", err)
	}
	infos, _ := codec.Info(enc)
	seen := map[string]bool{}
	for _, b := range infos {
		seen[b.DType+"/"+b.Method] = true
	}
	for _, want := range []string{"BF16/planes", "F16/planes", "F32/planes"} {
		if !seen[want] {
			t.Errorf("no %s block in %v", want, seen)
		}
	}
	t.Logf("%d bytes -> %d (%.3fx), blocks %v", file.Len(), len(enc), float64(file.Len())/float64(len(enc)), seen)
	if _, err := c.EncodeSafetensors(context.Background(), nil, []byte("not safetensors"), 0); err == nil {
		t.Fatal("EncodeSafetensors accepted garbage")
	}
}

// TestCorrupt flips, cuts and extends streams: every change is an error
// that matches ErrCorrupt and names where, never a panic or a wrong result.
func TestCorrupt(t *testing.T) {
	c := codec.New(codec.Options{BlockSize: codec.MinBlockSize})
	defer c.Close()
	var streams [][]byte
	for _, dt := range []string{"BF16", "F32", "", "U8"} {
		streams = append(streams, roundTrip(t, c, trained(t, dt, 200000, 9), dt))
	}
	streams = append(streams, roundTrip(t, c, []byte(strings.Repeat("abc", 50000)), ""))
	streams = append(streams, roundTrip(t, c, randomBytes(100000, 3), "F16"))
	r := rand.New(rand.NewPCG(1, 2))
	for si, enc := range streams {
		n, _ := codec.RawSize(enc)
		dst := make([]byte, n)
		check := func(what string, bad []byte) {
			t.Helper()
			m, err := codec.RawSize(bad)
			if err == nil {
				if m != n { // the header is checksummed
					t.Fatalf("stream %d, %s: raw size %d, want %d or an error", si, what, m, n)
				}
				err = c.Decode(dst, bad)
			}
			if err == nil {
				t.Fatalf("stream %d, %s: no error", si, what)
			}
			if !errors.Is(err, codec.ErrCorrupt) {
				t.Fatalf("stream %d, %s: %v does not match ErrCorrupt", si, what, err)
			}
			rerr := c.DecodeReader(context.Background(), dst, iotest.HalfReader(bytes.NewReader(bad)), int64(len(bad)), 2)
			if !errors.Is(rerr, codec.ErrCorrupt) {
				t.Fatalf("stream %d, %s: DecodeReader: %v does not match ErrCorrupt", si, what, rerr)
			}
		}
		for range 300 {
			bad := bytes.Clone(enc)
			i := r.IntN(len(bad))
			bad[i] ^= byte(1 + r.IntN(255))
			check(fmt.Sprintf("byte %d flipped", i), bad)
		}
		for _, cut := range []int{0, 1, 27, 28, 29, 47, 48, len(enc) / 2, len(enc) - 1} {
			check(fmt.Sprintf("cut to %d", cut), enc[:cut])
		}
		check("extended", append(bytes.Clone(enc), 0))
	}
	// The messages say what and where.
	enc := streams[0]
	bad := bytes.Clone(enc)
	infos, _ := codec.Info(enc)
	last := infos[len(infos)-1]
	bad[len(bad)-last.EncodedLen/2] ^= 0x55
	err := c.Decode(make([]byte, len(dst0(enc))), bad)
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("block %d", last.Index)) {
		t.Errorf("corrupt last block: %v, want it named", err)
	}
	err = c.Decode(make([]byte, len(dst0(enc))), enc[:len(enc)-3])
	if err == nil || !strings.Contains(err.Error(), "truncated stream at byte") {
		t.Errorf("truncated: %v", err)
	}
	t.Logf("examples: %v", err)
}

func dst0(enc []byte) []byte {
	n, _ := codec.RawSize(enc)
	return make([]byte, n)
}

func TestCancel(t *testing.T) {
	c := codec.New(codec.Options{BlockSize: codec.MinBlockSize})
	defer c.Close()
	src := trained(t, "BF16", 2<<20, 1)
	enc := roundTrip(t, c, src, "BF16")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := c.DecodeParallel(ctx, make([]byte, len(src)), enc, 2)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled decode: %v", err)
	}
	for _, workers := range []int{1, 2} {
		if _, err := c.EncodeParallel(ctx, nil, src, "BF16", workers); !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled encode on %d workers: %v", workers, err)
		}
	}
}

// TestConcurrent shares one Codec between goroutines (run it with -race).
func TestConcurrent(t *testing.T) {
	c := codec.New(codec.Options{BlockSize: codec.MinBlockSize})
	defer c.Close()
	done := make(chan error)
	for g := range 4 {
		go func() {
			var err error
			defer func() { done <- err }()
			dt := []string{"BF16", "F16", "F32", ""}[g]
			src := trained(t, dt, 600000+g, uint64(g))
			for range 3 {
				var enc []byte
				if enc, err = c.Encode(nil, src, dt); err != nil {
					return
				}
				got := make([]byte, len(src))
				if err = c.DecodeParallel(context.Background(), got, enc, 3); err != nil {
					return
				}
				if !bytes.Equal(got, src) {
					err = fmt.Errorf("goroutine %d: round trip differs", g)
					return
				}
			}
		}()
	}
	for range 4 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}

func TestConversions(t *testing.T) {
	for _, tc := range []struct {
		f      float32
		bf, hf uint16
	}{
		{0, 0, 0}, {1, 0x3F80, 0x3C00}, {-2, 0xC000, 0xC000}, {0.02, 0x3CA4, 0x251F},
		{65504, 0x4780, 0x7BFF}, {1e6, 0x4974, 0x7C00}, {6e-8, 0x3381, 0x0001}, {1e-9, 0x3089, 0},
	} {
		if got := codectest.BF16(tc.f); got != tc.bf {
			t.Errorf("BF16(%g) = %#04x, want %#04x", tc.f, got, tc.bf)
		}
		if got := codectest.F16(tc.f); got != tc.hf {
			t.Errorf("F16(%g) = %#04x, want %#04x", tc.f, got, tc.hf)
		}
	}
}

// TestDecodeReader: decoding while reading gives the bytes Decode gives,
// whatever the reader's pace; a reader shorter than announced, a failing
// reader and a cancelled context are errors.
func TestDecodeReader(t *testing.T) {
	c := codec.New(codec.Options{BlockSize: codec.MinBlockSize})
	defer c.Close()
	src := trained(t, "BF16", 3<<20, 5)
	enc := roundTrip(t, c, src, "BF16")
	for _, workers := range []int{1, 3} {
		for name, r := range map[string]io.Reader{"whole": bytes.NewReader(enc), "halves": iotest.HalfReader(bytes.NewReader(enc)),
			"bytes": iotest.DataErrReader(bytes.NewReader(enc))} {
			dst := make([]byte, len(src))
			if err := c.DecodeReader(context.Background(), dst, r, int64(len(enc)), workers); err != nil {
				t.Fatalf("%s, %d workers: %v", name, workers, err)
			}
			if !bytes.Equal(dst, src) {
				t.Fatalf("%s, %d workers: other bytes", name, workers)
			}
		}
	}
	dst := make([]byte, len(src))
	if err := c.DecodeReader(context.Background(), dst, bytes.NewReader(enc[:len(enc)/2]), int64(len(enc)), 2); !errors.Is(err, codec.ErrCorrupt) {
		t.Errorf("short reader: %v", err)
	}
	boom := errors.New("disk on fire")
	if err := c.DecodeReader(context.Background(), dst, io.MultiReader(bytes.NewReader(enc[:len(enc)/3]), iotest.ErrReader(boom)), int64(len(enc)), 2); !errors.Is(err, boom) {
		t.Errorf("failing reader: %v", err)
	}
	if err := c.DecodeReader(context.Background(), make([]byte, 5), bytes.NewReader(enc), int64(len(enc)), 2); err == nil {
		t.Error("a destination of the wrong size was accepted")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := c.DecodeReader(ctx, dst, bytes.NewReader(enc), int64(len(enc)), 2); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled: %v", err)
	}
}

// TestDecodePrefix: the first n bytes of a stream decode alone, for every n
// around block boundaries, reading only their blocks; a corrupt block among
// them is ErrCorrupt, a short stream a truncated one.
func TestDecodePrefix(t *testing.T) {
	c := codec.New(codec.Options{BlockSize: codec.MinBlockSize})
	defer c.Close()
	src := trained(t, "BF16", 5*codec.MinBlockSize+123, 4)
	enc := roundTrip(t, c, src, "BF16")
	bs := codec.MinBlockSize
	for _, n := range []int{0, 1, 8, bs - 1, bs, bs + 1, 3*bs + 7, len(src) - 1, len(src)} {
		dst := make([]byte, n)
		if err := c.DecodePrefixAt(dst, bytes.NewReader(enc), int64(len(enc))); err != nil || !bytes.Equal(dst, src[:n]) {
			t.Fatalf("prefix of %d bytes: %v, equal %v", n, err, bytes.Equal(dst, src[:n]))
		}
	}
	at := func(dst, enc []byte) error { return c.DecodePrefixAt(dst, bytes.NewReader(enc), int64(len(enc))) }
	if err := at(make([]byte, len(src)+1), enc); err == nil {
		t.Error("a prefix longer than the stream: no error")
	}
	infos, err := codec.Info(enc)
	if err != nil {
		t.Fatal(err)
	}
	bad := bytes.Clone(enc)
	bad[len(enc)-infos[len(infos)-1].EncodedLen/2] ^= 0x55 // in the last block
	if err := at(make([]byte, bs), bad); err != nil {
		t.Errorf("a corrupt block after the prefix was read: %v", err)
	}
	if err := at(make([]byte, len(src)), bad); !errors.Is(err, codec.ErrCorrupt) {
		t.Errorf("a corrupt block in the prefix: %v, want ErrCorrupt", err)
	}
	// A stream shorter than it says: its prefix still reads, the rest not.
	short := bytes.NewReader(enc[:len(enc)/2])
	if n, err := codec.RawSizeAt(short, int64(len(enc))); err != nil || n != int64(len(src)) {
		t.Errorf("RawSizeAt = %d, %v; want %d", n, err, len(src))
	}
	if err := c.DecodePrefixAt(make([]byte, 8), short, int64(len(enc))); err != nil {
		t.Errorf("the first bytes of a cut stream: %v", err)
	}
	if err := c.DecodePrefixAt(make([]byte, len(src)), short, int64(len(enc))); !errors.Is(err, codec.ErrCorrupt) {
		t.Errorf("a cut stream: %v, want a truncated stream", err)
	}
	if err := c.DecodePrefixAt(make([]byte, 8), bytes.NewReader(enc), 28); !errors.Is(err, codec.ErrCorrupt) {
		t.Errorf("a size that holds no block: %v, want ErrCorrupt", err)
	}
}
