package safetensors

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// compact returns the file Write makes, less the header's padding. Seeds
// stay small: the fuzzer's minimization is quadratic in the input's size, and
// a 4 KiB padded header stalls it for its whole -fuzzminimizetime.
func compact(ts []Tensor, md map[string]string) []byte {
	var w bytes.Buffer
	if err := Write(&w, ts, md); err != nil {
		panic(err)
	}
	b := w.Bytes()
	h, err := Parse(b)
	if err != nil {
		panic(err)
	}
	header := bytes.TrimRight(b[8:h.DataOffset()], " ")
	return append(file(string(header), 0)[:8+len(header)], b[h.DataOffset():]...)
}

func fuzzSeeds() [][]byte {
	ts := sampleTensors(1)
	var mixed []Tensor
	for i := 0; i < len(ts); i += 23 {
		mixed = append(mixed, ts[i])
	}
	seeds := [][]byte{
		compact(ts[:3], map[string]string{"format": "pt"}),
		compact(mixed, nil),
		file(`{}`, 0),
		file(`{"__metadata__":{"a":"b"}}`, 0),
		file(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}  `, 2),
		file(`{"a":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]},"z":{"dtype":"F32","shape":[0],"data_offsets":[3,3]}}`, 3),
		file(`{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[4,8]}}`, 8),
		file(`{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}`, 2),
		file(`{"x":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}`, 0),
		file(`{"\ud800":{}}`, 0),
		file(`{"x":{"dtype":"F12","shape":[1],"data_offsets":[0,1]}}`, 1),
		{1, 2, 3},
	}
	// Every file of the conformance corpus.
	corpus, _ := filepath.Glob(filepath.Join(conformanceDir, "*.safetensors"))
	for _, p := range corpus {
		b, err := os.ReadFile(p)
		if err != nil {
			panic(err)
		}
		seeds = append(seeds, b)
	}
	return seeds
}

func FuzzParse(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := Parse(b)
		if err != nil {
			var fe *FormatError
			if !errors.As(err, &fe) {
				t.Fatalf("Parse returned a non-format error: %v", err)
			}
			return
		}
		checkHeader(t, h, int64(len(b)))
		// Write what was parsed; it must parse to the same tensors.
		ts := make([]Tensor, len(h.Tensors))
		for i, x := range h.Tensors {
			ts[i] = Tensor{Name: x.Name, DType: x.DType, Shape: x.Shape, Data: tensorData(b, h, x)}
		}
		var buf bytes.Buffer
		if err := Write(&buf, ts, h.Metadata); err != nil {
			t.Fatalf("Write of parsed tensors: %v", err)
		}
		b2 := buf.Bytes()
		h2, err := Parse(b2)
		if err != nil {
			t.Fatalf("Parse of rewritten file: %v", err)
		}
		if h2.DataOffset()%DataAlign != 0 {
			t.Fatalf("rewritten data offset %d", h2.DataOffset())
		}
		if !equalMaps(h.Metadata, h2.Metadata) {
			t.Fatalf("metadata %v became %v", h.Metadata, h2.Metadata)
		}
		if len(h2.Tensors) != len(h.Tensors) {
			t.Fatalf("%d tensors became %d", len(h.Tensors), len(h2.Tensors))
		}
		for _, x := range h.Tensors {
			y, ok := h2.Lookup(x.Name)
			if !ok || y.DType != x.DType || !slices.Equal(y.Shape, x.Shape) || y.Size() != x.Size() ||
				!bytes.Equal(tensorData(b, h, x), tensorData(b2, h2, y)) {
				t.Fatalf("tensor %q: %+v became %+v", x.Name, x, y)
			}
			if (h2.DataOffset()+y.Begin)%int64(y.DType.Alignment()) != 0 {
				t.Fatalf("tensor %q misaligned", y.Name)
			}
		}
	})
}

// checkHeader checks the invariants of an accepted header.
func checkHeader(t *testing.T, h *Header, fileSize int64) {
	t.Helper()
	if h.FileSize() != fileSize {
		t.Fatalf("header covers %d bytes of a %d-byte file", h.FileSize(), fileSize)
	}
	var end int64
	for i, x := range h.Tensors {
		if x.Begin != end || !x.DType.Valid() || x.Elements() < 0 ||
			x.Elements()*int64(x.DType.Bits()) != x.Size()*8 {
			t.Fatalf("tensor %d %+v after end %d", i, x, end)
		}
		if y, ok := h.Lookup(x.Name); !ok || fmt.Sprint(y) != fmt.Sprint(x) {
			t.Fatalf("Lookup(%q) = %+v", x.Name, y)
		}
		end = x.End
	}
}

// shortReaderAt serves only the first n bytes of b.
type shortReaderAt struct {
	b []byte
}

func (r shortReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(r.b)) {
		return 0, io.EOF
	}
	n := copy(p, r.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func FuzzReadHeader(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s, int64(0))
		f.Add(s, int64(7))
	}
	f.Fuzz(func(t *testing.T, b []byte, extra int64) {
		// The claimed file size may differ from what the reader holds.
		size := int64(len(b)) + extra
		h, err := ReadHeader(shortReaderAt{b}, size)
		if err != nil {
			var fe *FormatError
			if !errors.As(err, &fe) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("unexpected error: %v", err)
			}
			return
		}
		checkHeader(t, h, size)
		if h.DataOffset() > int64(len(b)) {
			t.Fatalf("accepted a header the reader did not hold")
		}
		if extra == 0 {
			if _, err := Parse(b); err != nil {
				t.Fatalf("ReadHeader accepted, Parse rejected: %v", err)
			}
		}
	})
}
