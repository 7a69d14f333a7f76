package codec

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"testing"
	"testing/iotest"
)

var fuzzDTypes = []string{"", "BF16", "F16", "F32", "F8_E4M3", "U8", "I64", "C64", "F4", "NOT_A_DTYPE"}

// FuzzRoundTrip: whatever the bytes and the dtype, decode(encode(x)) == x.
func FuzzRoundTrip(f *testing.F) {
	c := New(Options{BlockSize: MinBlockSize})
	defer c.Close()
	f.Add([]byte{}, uint8(0))
	f.Add([]byte("hello, hello, hello, hello"), uint8(0))
	f.Add(bytes.Repeat([]byte{0x3c, 0xa4, 0xbc, 0x12}, 5000), uint8(1))
	f.Add(bytes.Repeat([]byte{0, 0, 0x80, 0x3f}, 3000), uint8(3))
	f.Add(bytes.Repeat([]byte{7}, 70000), uint8(4))
	f.Fuzz(func(t *testing.T, src []byte, pick uint8) {
		dtype := fuzzDTypes[int(pick)%len(fuzzDTypes)]
		enc, err := c.Encode(nil, src, dtype)
		if err != nil {
			t.Fatalf("encode: %v", err)
		}
		got := make([]byte, len(src))
		if err := c.DecodeParallel(context.Background(), got, enc, 2); err != nil {
			t.Fatalf("decode: %v", err)
		}
		if !bytes.Equal(got, src) {
			t.Fatalf("round trip of %d bytes of %q differs", len(src), dtype)
		}
	})
}

// FuzzDecode: no input makes Decode panic, hang or allocate without bound;
// every refusal matches ErrCorrupt. Each input is tried as it is and with
// its header checksums recomputed, so that the fuzzer reaches the payloads.
func FuzzDecode(f *testing.F) {
	c := New(Options{BlockSize: MinBlockSize})
	defer c.Close()
	for i, dt := range fuzzDTypes {
		src := make([]byte, 3000+i*1000)
		for j := range src {
			src[j] = byte(j*j>>7) & 0x7f
		}
		enc, _ := c.Encode(nil, src, dt)
		f.Add(enc)
	}
	zs, _ := c.Encode(nil, bytes.Repeat([]byte("zstd wins this one "), 500), "")
	f.Add(zs)
	f.Add([]byte(Magic))
	f.Fuzz(func(t *testing.T, src []byte) {
		decodeAny(t, c, src)
		decodeAny(t, c, fixChecksums(bytes.Clone(src)))
	})
}

func decodeAny(t *testing.T, c *Codec, src []byte) {
	n, err := RawSize(src)
	if err == nil {
		if n > 64<<20 {
			return // the scan refuses it before allocating; no need to try
		}
		err = c.Decode(make([]byte, n), src)
	}
	if err != nil && !errors.Is(err, ErrCorrupt) {
		t.Fatalf("error %v does not match ErrCorrupt", err)
	}
	if n, rerr := RawSize(src); rerr == nil && n <= 64<<20 {
		derr := c.DecodeReader(context.Background(), make([]byte, n), iotest.HalfReader(bytes.NewReader(src)), int64(len(src)), 2)
		if (derr == nil) != (err == nil) || (derr != nil && !errors.Is(derr, ErrCorrupt)) {
			t.Fatalf("DecodeReader says %v, Decode %v", derr, err)
		}
	}
	if err == nil {
		infos, ierr := Info(src)
		if ierr != nil {
			t.Fatalf("Decode accepted a stream Info refuses: %v", ierr)
		}
		var sum int64
		for _, b := range infos {
			sum += int64(b.RawLen)
		}
		if sum != n {
			t.Fatalf("blocks hold %d bytes, RawSize says %d", sum, n)
		}
	}
}

// fixChecksums recomputes the checksums of the stream header and of every
// block header it can find, as a writer would have written them.
func fixChecksums(b []byte) []byte {
	if len(b) < streamHeaderSize {
		return b
	}
	le := binary.LittleEndian
	le.PutUint32(b[24:], checksum(b[:24]))
	off := streamHeaderSize
	for off+blockHeaderSize <= len(b) {
		le.PutUint32(b[off+16:], checksum(b[off:off+16]))
		off += blockHeaderSize + int(le.Uint32(b[off+8:]))
		if off < 0 {
			break
		}
	}
	return b
}
