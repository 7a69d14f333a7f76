package safetensors

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	nlp "github.com/nlpodyssey/safetensors"
)

// file builds a safetensors file from a raw header and dataLen bytes of data.
func file(header string, dataLen int) []byte {
	b := binary.LittleEndian.AppendUint64(nil, uint64(len(header)))
	b = append(b, header...)
	for i := range dataLen {
		b = append(b, byte(i))
	}
	return b
}

func randBytes(r *rand.Rand, n int64) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// sampleTensors returns tensors of every dtype, in several shapes.
func sampleTensors(seed uint64) []Tensor {
	r := rand.New(rand.NewPCG(seed, 1))
	var ts []Tensor
	for _, dt := range DTypes {
		shapes := [][]int64{{2, 4}, {0}, {3, 0, 5}, {16}}
		if dt.Bits()%8 == 0 {
			shapes = append(shapes, []int64{}, []int64{3}, []int64{1, 1, 7})
		}
		for i, shape := range shapes {
			size, _, problem := byteSize(dt, shape)
			if problem != "" {
				panic(problem)
			}
			ts = append(ts, Tensor{
				Name:  fmt.Sprintf("t.%s.%d", strings.ToLower(string(dt)), i),
				DType: dt,
				Shape: shape,
				Data:  randBytes(r, size),
			})
		}
	}
	return ts
}

func writeBytes(t testing.TB, ts []Tensor, md map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := Write(&buf, ts, md); err != nil {
		t.Fatalf("Write: %v", err)
	}
	return buf.Bytes()
}

func tensorData(file []byte, h *Header, t TensorInfo) []byte {
	return file[h.DataOffset()+t.Begin : h.DataOffset()+t.End]
}

func TestDTypes(t *testing.T) {
	want := map[DType][2]int{ // bits, alignment
		BOOL: {8, 1}, U8: {8, 1}, I8: {8, 1}, I16: {16, 2}, U16: {16, 2}, F16: {16, 2}, BF16: {16, 2},
		I32: {32, 4}, U32: {32, 4}, F32: {32, 4}, I64: {64, 8}, U64: {64, 8}, F64: {64, 8}, C64: {64, 8},
		F8_E4M3: {8, 1}, F8_E5M2: {8, 1}, F8_E8M0: {8, 1}, F8_E4M3FNUZ: {8, 1}, F8_E5M2FNUZ: {8, 1},
		F4: {4, 1}, F6_E2M3: {6, 1}, F6_E3M2: {6, 1},
	}
	if len(want) != len(DTypes) {
		t.Fatalf("DTypes has %d entries, test knows %d", len(DTypes), len(want))
	}
	for _, dt := range DTypes {
		if got := [2]int{dt.Bits(), dt.Alignment()}; got != want[dt] || !dt.Valid() {
			t.Errorf("%s: bits, alignment = %v, want %v", dt, got, want[dt])
		}
	}
	for _, dt := range []DType{"", "F12", "f32", "BOOL "} {
		if dt.Valid() || dt.Bits() != 0 || dt.Alignment() != 0 {
			t.Errorf("%q reported valid", dt)
		}
	}
}

func TestRoundTrip(t *testing.T) {
	ts := sampleTensors(1)
	md := map[string]string{"format": "pt", "quote\"\\\n\x01": "ünïcode ✓ <&>"}
	b := writeBytes(t, ts, md)
	h, err := Parse(b)
	if err != nil {
		t.Fatalf("Parse of written file: %v", err)
	}
	if !equalMaps(h.Metadata, md) {
		t.Errorf("metadata = %v, want %v", h.Metadata, md)
	}
	if len(h.Tensors) != len(ts) {
		t.Fatalf("%d tensors, want %d", len(h.Tensors), len(ts))
	}
	if h.FileSize() != int64(len(b)) {
		t.Errorf("FileSize %d, file is %d", h.FileSize(), len(b))
	}
	for _, want := range ts {
		got, ok := h.Lookup(want.Name)
		if !ok {
			t.Errorf("%s missing", want.Name)
			continue
		}
		if got.DType != want.DType || !slices.Equal(got.Shape, want.Shape) {
			t.Errorf("%s: got %s %v, want %s %v", want.Name, got.DType, got.Shape, want.DType, want.Shape)
		}
		if !bytes.Equal(tensorData(b, h, got), want.Data) {
			t.Errorf("%s: data differs", want.Name)
		}
		if got.Elements()*int64(want.DType.Bits())/8 != got.Size() {
			t.Errorf("%s: Elements %d, Size %d", want.Name, got.Elements(), got.Size())
		}
	}
	if _, ok := h.Lookup("nope"); ok {
		t.Error("Lookup of a missing name succeeded")
	}
	// A header built by hand (no index) still answers Lookup.
	h2 := &Header{Tensors: h.Tensors}
	if _, ok := h2.Lookup(ts[3].Name); !ok {
		t.Error("Lookup without index failed")
	}

	// Each dtype on its own, without metadata.
	for _, dt := range DTypes {
		t.Run(string(dt), func(t *testing.T) {
			var one []Tensor
			for _, x := range ts {
				if x.DType == dt {
					one = append(one, x)
				}
			}
			b := writeBytes(t, one, nil)
			h, err := Parse(b)
			if err != nil {
				t.Fatal(err)
			}
			if h.Metadata != nil {
				t.Errorf("metadata %v, want nil", h.Metadata)
			}
			for _, want := range one {
				got, _ := h.Lookup(want.Name)
				if got.DType != dt || !slices.Equal(got.Shape, want.Shape) || !bytes.Equal(tensorData(b, h, got), want.Data) {
					t.Errorf("%s does not round-trip", want.Name)
				}
			}
		})
	}
}

func equalMaps(a, b map[string]string) bool {
	if (a == nil) != (b == nil) || len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func TestWriteLayout(t *testing.T) {
	for seed := range uint64(5) {
		ts := sampleTensors(seed)
		rand.New(rand.NewPCG(seed, 2)).Shuffle(len(ts), func(i, j int) { ts[i], ts[j] = ts[j], ts[i] })
		b := writeBytes(t, ts, map[string]string{"format": "pt"})
		h, err := Parse(b)
		if err != nil {
			t.Fatal(err)
		}
		if h.DataOffset()%4096 != 0 {
			t.Errorf("data offset %d not a multiple of 4096", h.DataOffset())
		}
		if !bytes.Equal(bytes.TrimRight(b[8:h.DataOffset()], " "), b[8:8+bytes.LastIndexByte(b[8:h.DataOffset()], '}')+1]) {
			t.Error("header padding is not trailing spaces")
		}
		for i, x := range h.Tensors {
			if abs := h.DataOffset() + x.Begin; abs%int64(x.DType.Alignment()) != 0 {
				t.Errorf("%s (%s) at file offset %d, not aligned to %d", x.Name, x.DType, abs, x.DType.Alignment())
			}
			if i > 0 {
				p := h.Tensors[i-1]
				if p.DType.Alignment() < x.DType.Alignment() ||
					(p.DType.Alignment() == x.DType.Alignment() && p.Begin == x.Begin && p.Name > x.Name) {
					t.Errorf("order: %s (%s) before %s (%s)", p.Name, p.DType, x.Name, x.DType)
				}
			}
		}
		// Deterministic: same input in another order gives the same bytes.
		slices.Reverse(ts)
		if !bytes.Equal(b, writeBytes(t, ts, map[string]string{"format": "pt"})) {
			t.Error("output depends on input order")
		}
	}
}

func TestEncodeHeader(t *testing.T) {
	infos := []TensorInfo{
		{Name: "b", DType: BF16, Shape: []int64{3}, Begin: 99, End: 5},
		{Name: "a", DType: F32, Shape: []int64{2, 2}},
		{Name: "s", DType: U8},
	}
	prefix, placed, err := EncodeHeader(infos, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(prefix)%4096 != 0 {
		t.Errorf("prefix is %d bytes", len(prefix))
	}
	want := []TensorInfo{
		{Name: "a", DType: F32, Shape: []int64{2, 2}, Begin: 0, End: 16},
		{Name: "b", DType: BF16, Shape: []int64{3}, Begin: 16, End: 22},
		{Name: "s", DType: U8, Shape: []int64{}, Begin: 22, End: 23},
	}
	if fmt.Sprint(placed) != fmt.Sprint(want) {
		t.Errorf("placed = %v, want %v", placed, want)
	}
	full := append(slices.Clone(prefix), make([]byte, 23)...)
	h, err := Parse(full)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(h.Tensors) != fmt.Sprint(want) || h.DataOffset() != int64(len(prefix)) {
		t.Errorf("parsed %v at %d", h.Tensors, h.DataOffset())
	}
}

func TestWriteRejects(t *testing.T) {
	cases := []struct {
		name    string
		tensors []Tensor
		md      map[string]string
		want    string
	}{
		{"unknown dtype", []Tensor{{Name: "x", DType: "F12", Shape: []int64{1}, Data: []byte{0}}}, nil, `tensor "x": unknown dtype "F12"`},
		{"short data", []Tensor{{Name: "x", DType: F32, Shape: []int64{2}, Data: make([]byte, 7)}}, nil, `needs 8 bytes, data has 7`},
		{"long data", []Tensor{{Name: "x", DType: U8, Shape: []int64{}, Data: make([]byte, 2)}}, nil, `needs 1 bytes, data has 2`},
		{"duplicate", []Tensor{{Name: "w", DType: U8, Shape: []int64{0}}, {Name: "w", DType: U8, Shape: []int64{0}}}, nil, `duplicate tensor name "w"`},
		{"negative dim", []Tensor{{Name: "x", DType: U8, Shape: []int64{-1}}}, nil, `element count of shape [-1] overflows`},
		{"overflow", []Tensor{{Name: "x", DType: U8, Shape: []int64{1 << 32, 1 << 32}}}, nil, `overflows`},
		{"sub-byte", []Tensor{{Name: "x", DType: F4, Shape: []int64{3}, Data: make([]byte, 2)}}, nil, `not a whole number of bytes`},
		{"metadata name", []Tensor{{Name: "__metadata__", DType: U8, Shape: []int64{0}}}, nil, `cannot be a tensor name`},
		{"bad utf8 name", []Tensor{{Name: "\xff", DType: U8, Shape: []int64{0}}}, nil, `not valid UTF-8`},
		{"bad utf8 metadata", nil, map[string]string{"k": "\xfe"}, `not valid UTF-8`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := Write(io.Discard, c.tensors, c.md)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Write error %v, want one mentioning %q", err, c.want)
			}
		})
	}
}

type acceptCase struct {
	name   string
	file   []byte
	names  []string // in file order
	md     map[string]string
	offset int64
}

func acceptCases() []acceptCase {
	return []acceptCase{
		{"empty", file(`{}`, 0), nil, nil, 10},
		{"leading whitespace", file(" \t\r\n{}", 0), nil, nil, 14},
		{"metadata null", file(`{"__metadata__":null}`, 0), nil, nil, 0},
		{"empty metadata", file(`{"__metadata__":{}}`, 0), nil, map[string]string{}, 27},
		{"padding", file(`{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}   `+"\t\n\r", 2), []string{"a"}, nil, 0},
		{"scalar", file(`{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}`, 4), []string{"s"}, nil, 0},
		{"zero-size ties by name", file(`{"z":{"dtype":"F32","shape":[0],"data_offsets":[2,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"y":{"dtype":"I64","shape":[4,0],"data_offsets":[2,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}`, 3), []string{"a", "y", "z", "b"}, nil, 0},
		{"only zero-size", file(`{"z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}`, 0), []string{"z"}, nil, 0},
		{"unknown fields ignored", file(`{"a":{"extra":[1,{"x":null}],"dtype":"U8","shape":[1],"data_offsets":[0,1],"more":"x"}}`, 1), []string{"a"}, nil, 0},
		{"metadata", file(`{"__metadata__":{"format":"pt","e":""},"a":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}}`, 1), []string{"a"}, map[string]string{"format": "pt", "e": ""}, 0},
		{"F4 pair", file(`{"a":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]}}`, 3), []string{"a"}, nil, 0},
		{"F6 four", file(`{"a":{"dtype":"F6_E3M2","shape":[4],"data_offsets":[0,3]}}`, 3), []string{"a"}, nil, 0},
		{"escaped name", file(`{"a\u00e9\ud83d\ude00\"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1), []string{"a\u00e9\U0001F600\""}, nil, 0},
		{"huge dim times zero", file(`{"a":{"dtype":"F64","shape":[0,9223372036854775807],"data_offsets":[0,0]}}`, 0), []string{"a"}, nil, 0},
		{"repeated tensor: the last counts", file(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}`, 2), []string{"w"}, nil, 0},
		{"repeated metadata key: the last counts", file(`{"__metadata__":{"k":"1","k":"2"}}`, 0), nil, map[string]string{"k": "2"}, 0},
		{"repeated unknown field", file(`{"w":{"x":1,"x":2,"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1), []string{"w"}, nil, 0},
		{"deepest nesting", file(`{"a":{"dtype":"U8","x":`+strings.Repeat("[", 125)+strings.Repeat("]", 125)+`,"shape":[],"data_offsets":[0,1]}}`, 1), []string{"a"}, nil, 0},
	}
}

func TestParseAccepts(t *testing.T) {
	for _, c := range acceptCases() {
		t.Run(c.name, func(t *testing.T) {
			h, err := Parse(c.file)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			var names []string
			for _, x := range h.Tensors {
				names = append(names, x.Name)
			}
			if !slices.Equal(names, c.names) {
				t.Errorf("tensors %q, want %q", names, c.names)
			}
			if !equalMaps(h.Metadata, c.md) {
				t.Errorf("metadata %v, want %v", h.Metadata, c.md)
			}
			if c.offset != 0 && h.DataOffset() != c.offset {
				t.Errorf("data offset %d, want %d", h.DataOffset(), c.offset)
			}
		})
	}
}

type rejectCase struct {
	name string
	file []byte
	want string
}

func rejectCases() []rejectCase {
	const a = `"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}`
	lenPrefix := func(n uint64, rest string) []byte {
		return append(binary.LittleEndian.AppendUint64(nil, n), rest...)
	}
	return []rejectCase{
		{"empty file", nil, "file is 0 bytes, shorter than the 8-byte header length"},
		{"short file", []byte{1, 0, 0}, "file is 3 bytes"},
		{"header too large", lenPrefix(MaxHeaderSize+1, "{}"), "header length 100000001 exceeds the maximum of 100000000 bytes"},
		{"header past end", lenPrefix(123, "{}"), "header length 123 exceeds file size 10"},
		{"huge length", lenPrefix(1<<63, "{}"), "header length 9223372036854775808 exceeds the maximum"},
		{"zero length", lenPrefix(0, ""), "header is empty"},
		{"bad utf8", file("{\"\xff\":1}", 0), "header is not valid UTF-8"},
		{"array", file(`[]`, 0), "header is not a JSON object"},
		{"string", file(` "{}"`, 0), "header is not a JSON object"},
		{"whitespace only", file(`   `, 0), "header is not valid JSON"},
		{"byte order mark", file("\ufeff{}", 0), "header is not valid JSON"},
		{"truncated", file(`{"a":`, 0), "header is not valid JSON"},
		{"two values", file(`{} {}`, 0), "header is not valid JSON"},
		{"trailing garbage", file(`{}x`, 0), "header is not valid JSON"},
		{"nul padding", file("{}\x00", 0), "header is not valid JSON"},
		{"trailing comma", file(`{"a":1,}`, 0), "header is not valid JSON"},
		{"lone leading surrogate", file(`{"\ud800":{}}`, 0), `lone leading surrogate \uD800`},
		{"lone trailing surrogate", file(`{"__metadata__":{"k":"\udc00x"}}`, 0), `lone trailing surrogate \uDC00`},
		{"surrogate pair reversed", file(`{"\ude00\ud83d":{}}`, 0), `lone trailing surrogate`},
		{"too deep", file(`{"a":{"dtype":"U8","x":`+strings.Repeat("[", 126)+strings.Repeat("]", 126)+`}}`, 0), "nests deeper than 127 levels"},
		{"metadata not object", file(`{"__metadata__":["x"]}`, 0), `"__metadata__" is an array, not a JSON object`},
		{"metadata number value", file(`{"__metadata__":{"format":1}}`, 0), `metadata value for "format" is not a string but a number`},
		{"metadata null value", file(`{"__metadata__":{"format":null}}`, 0), `metadata value for "format" is not a string but null`},
		{"metadata object value", file(`{"__metadata__":{"format":{}}}`, 0), `metadata value for "format" is not a string but an object`},
		{"duplicate metadata", file(`{"__metadata__":{},"__metadata__":{}}`, 0), `duplicate "__metadata__" key`},
		{"duplicate tensor, the last leaves a gap", file(`{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}`, 2), `tensor "w": data_offsets [1,2] leave a gap of 1 bytes at the start`},
		{"duplicate tensor, the first is invalid", file(`{"w":{"dtype":"F12","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1), `tensor "w": unknown dtype "F12"`},
		{"duplicate field", file(`{"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1), `tensor "w": duplicate field "dtype"`},
		{"tensor not object", file(`{"w":[1]}`, 0), `tensor "w": entry is an array, not a JSON object`},
		{"tensor string", file(`{"w":"U8"}`, 0), `tensor "w": entry is a string, not a JSON object`},
		{"dtype not string", file(`{"x":{"dtype":8,"shape":[1],"data_offsets":[0,1]}}`, 1), `tensor "x": dtype is a number, not a string`},
		{"unknown dtype", file(`{"x":{"dtype":"F12","shape":[1],"data_offsets":[0,1]}}`, 1), `tensor "x": unknown dtype "F12"`},
		{"lowercase dtype", file(`{"x":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}`, 4), `tensor "x": unknown dtype "f32"`},
		{"missing dtype", file(`{"x":{"shape":[1],"data_offsets":[0,1]}}`, 1), `tensor "x": missing field "dtype"`},
		{"missing shape", file(`{"x":{"dtype":"U8","data_offsets":[0,1]}}`, 1), `tensor "x": missing field "shape"`},
		{"missing offsets", file(`{"x":{"dtype":"U8","shape":[1]}}`, 1), `tensor "x": missing field "data_offsets"`},
		{"shape not array", file(`{"x":{"dtype":"U8","shape":1,"data_offsets":[0,1]}}`, 1), `tensor "x": shape is a number, not an array`},
		{"shape null", file(`{"x":{"dtype":"U8","shape":null,"data_offsets":[0,0]}}`, 0), `tensor "x": shape is null, not an array`},
		{"shape negative", file(`{"x":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}`, 1), `tensor "x": shape element 0 is -1, a negative number`},
		{"shape minus zero", file(`{"x":{"dtype":"U8","shape":[-0],"data_offsets":[0,1]}}`, 1), `tensor "x": shape element 0 is -0, a negative number`},
		{"shape float", file(`{"x":{"dtype":"U8","shape":[1,2.0],"data_offsets":[0,2]}}`, 2), `tensor "x": shape element 1 is 2.0, not an integer`},
		{"shape exponent", file(`{"x":{"dtype":"U8","shape":[1e0],"data_offsets":[0,1]}}`, 1), `tensor "x": shape element 0 is 1e0, not an integer`},
		{"shape string", file(`{"x":{"dtype":"U8","shape":["1"],"data_offsets":[0,1]}}`, 1), `tensor "x": shape element 0 is a string`},
		{"shape nested", file(`{"x":{"dtype":"U8","shape":[[1]],"data_offsets":[0,1]}}`, 1), `tensor "x": shape element 0 is an array`},
		{"shape too large", file(`{"x":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,1]}}`, 1), `tensor "x": shape element 0 is 18446744073709551616, too large`},
		{"offsets three", file(`{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1,1]}}`, 1), `tensor "x": data_offsets has 3 elements, not 2`},
		{"offsets one", file(`{"x":{"dtype":"U8","shape":[0],"data_offsets":[0]}}`, 0), `tensor "x": data_offsets has 1 elements, not 2`},
		{"offsets object", file(`{"x":{"dtype":"U8","shape":[0],"data_offsets":{"0":0}}}`, 0), `tensor "x": data_offsets is an object, not an array`},
		{"offsets negative", file(`{"x":{"dtype":"U8","shape":[0],"data_offsets":[-1,0]}}`, 0), `tensor "x": data_offsets element 0 is -1, a negative number`},
		{"offsets reversed", file(`{"x":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}}`, 1), `tensor "x": data_offsets [1,0] begin after end`},
		{"elements overflow", file(`{"x":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}`, 0), `tensor "x": element count of shape [4294967296,4294967296] overflows`},
		{"overflow before zero", file(`{"x":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}`, 0), `element count of shape [4294967296,4294967296,0] overflows`},
		{"bits overflow", file(`{"x":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]}}`, 0), `tensor "x": bit size of shape [2305843009213693952] of F64 overflows`},
		{"F4 odd", file(`{"x":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}`, 1), `tensor "x": 3 elements of F4 are 12 bits, not a whole number of bytes`},
		{"F6 odd", file(`{"x":{"dtype":"F6_E2M3","shape":[2],"data_offsets":[0,1]}}`, 1), `not a whole number of bytes`},
		{"size mismatch", file(`{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}`, 4), `tensor "x": shape [2] of F32 needs 8 bytes but data_offsets [0,4] span 4`},
		{"gap at start", file(`{"x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}`, 2), `tensor "x": data_offsets [1,2] leave a gap of 1 bytes at the start of the data section`},
		{"gap between", file(`{"b":{"dtype":"U8","shape":[1],"data_offsets":[3,4]},`+a+`}`, 4), `tensor "b": data_offsets [3,4] leave a gap of 1 bytes after previous tensor "a" ending at 2`},
		{"overlap", file(`{"a.weight":{"dtype":"U8","shape":[10],"data_offsets":[10,20]},"b":{"dtype":"U8","shape":[12],"data_offsets":[0,12]}}`, 20), `tensor "a.weight": data_offsets [10,20] overlap previous tensor "b" ending at 12`},
		{"same start", file(`{"a":{"dtype":"U8","shape":[10],"data_offsets":[0,10]},"b":{"dtype":"U8","shape":[12],"data_offsets":[0,12]}}`, 12), `tensor "b": data_offsets [0,12] overlap previous tensor "a" ending at 10`},
		{"zero-size inside", file(`{"b":{"dtype":"U8","shape":[0],"data_offsets":[1,1]},`+a+`}`, 2), `tensor "b": data_offsets [1,1] overlap previous tensor "a" ending at 2`},
		{"past end", file(`{`+a+`}`, 1), `tensor "a": data_offsets [0,2] extend past the end of the file (data section is 1 bytes)`},
		{"trailing data", file(`{`+a+`}`, 3), `data section is 3 bytes but the tensors end at 2: 1 trailing bytes`},
		{"no tensors with data", file(`{"__metadata__":{}}`, 5), `header has no tensors but the data section is 5 bytes`},
	}
}

func TestParseRejects(t *testing.T) {
	for _, c := range rejectCases() {
		t.Run(c.name, func(t *testing.T) {
			h, err := Parse(c.file)
			if err == nil {
				t.Fatalf("Parse accepted it: %+v", h)
			}
			var fe *FormatError
			if !errors.As(err, &fe) {
				t.Errorf("error %T %v is not a *FormatError", err, err)
			}
			if cl := ClassOf(err); !slices.Contains(Classes, cl) || !errors.Is(err, cl) || errors.Is(err, Class("other")) {
				t.Errorf("error %v has class %q", err, cl)
			}
			if !strings.HasPrefix(err.Error(), "invalid safetensors: ") || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q does not mention %q", err, c.want)
			}
			// ReadHeader says the same.
			if _, err2 := ReadHeader(bytes.NewReader(c.file), int64(len(c.file))); err2 == nil || err2.Error() != err.Error() {
				t.Errorf("ReadHeader error %v differs from Parse's %v", err2, err)
			}
		})
	}
}

type errReaderAt struct{ err error }

func (e errReaderAt) ReadAt(p []byte, off int64) (int, error) { return 0, e.err }

func TestReadHeaderIO(t *testing.T) {
	good := writeBytes(t, sampleTensors(3), nil)
	h, err := ReadHeader(bytes.NewReader(good), int64(len(good)))
	if err != nil {
		t.Fatal(err)
	}
	if h.DataOffset()+h.DataSize() != int64(len(good)) {
		t.Errorf("data ends at %d, file is %d", h.DataOffset()+h.DataSize(), len(good))
	}
	// ReadHeader reads only the header: the data may be absent from r.
	if _, err := ReadHeader(bytes.NewReader(good[:h.DataOffset()]), int64(len(good))); err != nil {
		t.Errorf("ReadHeader needed the data: %v", err)
	}
	// A wrong file size is a format error.
	_, err = ReadHeader(bytes.NewReader(good), int64(len(good))+1)
	var fe *FormatError
	if !errors.As(err, &fe) || !strings.Contains(err.Error(), "1 trailing bytes") {
		t.Errorf("file size+1: %v", err)
	}
	// A reader shorter than the claimed size: unexpected EOF, not a format error.
	_, err = ReadHeader(bytes.NewReader(good[:100]), int64(len(good)))
	if !errors.Is(err, io.ErrUnexpectedEOF) || errors.As(err, &fe) {
		t.Errorf("short reader: %v", err)
	}
	boom := errors.New("boom")
	_, err = ReadHeader(errReaderAt{boom}, 1<<20)
	if !errors.Is(err, boom) || errors.As(err, &fe) {
		t.Errorf("failing reader: %v", err)
	}
}

// TestCrossCheckNLP checks the writer's output with an independent parser.
func TestCrossCheckNLP(t *testing.T) {
	var ts []Tensor
	for _, x := range sampleTensors(7) {
		if _, err := nlp.ParseDType(string(x.DType)); err == nil {
			ts = append(ts, x)
		}
	}
	if len(ts) < 13*5 {
		t.Fatalf("only %d tensors of dtypes nlpodyssey knows", len(ts))
	}
	md := map[string]string{"format": "pt", "x": "y"}
	b := writeBytes(t, ts, md)
	n, meta, err := nlp.ReadMetadata(b)
	if err != nil {
		t.Fatalf("nlpodyssey ReadMetadata: %v", err)
	}
	h, err := Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	if int64(n) != h.HeaderSize {
		t.Errorf("header size %d, nlpodyssey says %d", h.HeaderSize, n)
	}
	if !equalMaps(meta.Metadata(), md) {
		t.Errorf("nlpodyssey metadata %v", meta.Metadata())
	}
	infos := meta.Tensors()
	st, err := nlp.Deserialize(b)
	if err != nil {
		t.Fatalf("nlpodyssey Deserialize: %v", err)
	}
	if st.Len() != len(ts) {
		t.Fatalf("nlpodyssey sees %d tensors, want %d", st.Len(), len(ts))
	}
	for _, want := range ts {
		v, ok := st.Tensor(want.Name)
		if !ok {
			t.Errorf("nlpodyssey lacks %s", want.Name)
			continue
		}
		shape := make([]int64, len(v.Shape()))
		for i, d := range v.Shape() {
			shape[i] = int64(d)
		}
		if v.DType().String() != string(want.DType) || !slices.Equal(shape, want.Shape) || !bytes.Equal(v.Data(), want.Data) {
			t.Errorf("%s: nlpodyssey sees %s %v %d bytes, want %s %v %d bytes", want.Name, v.DType(), shape, len(v.Data()), want.DType, want.Shape, len(want.Data))
		}
		mine, _ := h.Lookup(want.Name)
		if off := infos[want.Name].DataOffsets; int64(off[0]) != mine.Begin || int64(off[1]) != mine.End {
			t.Errorf("%s: nlpodyssey offsets %v, mine [%d,%d]", want.Name, off, mine.Begin, mine.End)
		}
	}
}

// TestCrossCheckNLPReadsOurs checks Parse on a file the other parser's writer made.
func TestCrossCheckNLPWriter(t *testing.T) {
	data := map[string]nlp.TensorView{}
	r := rand.New(rand.NewPCG(9, 9))
	for _, name := range []string{"BF16", "F32", "U8", "I64", "BOOL"} {
		dt, _ := nlp.ParseDType(name)
		v, err := nlp.NewTensorView(dt, []uint64{3, 2}, randBytes(r, int64(6*dt.Size())))
		if err != nil {
			t.Fatal(err)
		}
		data["t."+name] = v
	}
	b, err := nlp.Serialize(data, map[string]string{"format": "pt"})
	if err != nil {
		t.Fatal(err)
	}
	h, err := Parse(b)
	if err != nil {
		t.Fatalf("Parse of nlpodyssey's output: %v", err)
	}
	for name, v := range data {
		got, ok := h.Lookup(name)
		if !ok || string(got.DType) != v.DType().String() || !bytes.Equal(tensorData(b, h, got), v.Data()) {
			t.Errorf("%s differs", name)
		}
	}
}

func TestByteSize(t *testing.T) {
	for _, c := range []struct {
		dt    DType
		shape []int64
		size  int64
		class Class
	}{
		{BF16, []int64{3, 5}, 30, ""},
		{F32, nil, 4, ""},
		{F4, []int64{4}, 2, ""},
		{F4, []int64{3}, 0, SizeMismatch},
		{"F128", []int64{1}, 0, BadDType},
		{U8, []int64{2, -1}, 0, BadShape},
		{U8, []int64{1 << 32, 1 << 32}, 0, BadShape},
		{F64, []int64{1 << 61}, 0, BadShape},
	} {
		size, err := ByteSize(c.dt, c.shape)
		if size != c.size || ClassOf(err) != c.class {
			t.Errorf("ByteSize(%s, %v) = %d, %v; want %d, class %q", c.dt, c.shape, size, err, c.size, c.class)
		}
	}
}
