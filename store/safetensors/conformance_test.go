package safetensors

// The conformance corpus: safetensors files and the verdict every parser of
// weightfs must reach on them (this package, store.SlabLayout, the Python
// package's weightfs.manifest), with the verdicts confirmed against the
// reference parser on the GPU machine (integration/gpu/gpu_test.py).
//
// The cases are written here, by hand: a header, a data length, and for a
// file that is accepted the tensors expected from it (not what Parse says).
// Regenerate testdata/conformance after changing them with
//
//	go test ./store/safetensors -run TestConformance -update
//
// Without -update the test checks that the committed files are what this
// generator makes, then runs every case through Parse and ReadHeader.

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/conformance from the cases in conformance_test.go")

const conformanceDir = "testdata/conformance"

// confAlign is the slab layout rule's alignment (store.SlabAlign, which this
// package cannot import); the store package's test checks they agree.
const confAlign = 256

// Where the reference's verdicts come from: safetensors/src/tensor.rs of
// github.com/huggingface/safetensors (read at 24b0b2857fef, 0.8.0-dev.0).
const (
	refCommit      = "huggingface/safetensors@24b0b2857fef49be734b9ab72ce97c09bb25f5b9 safetensors/src/tensor.rs"
	srcAccept      = "read_metadata: from_utf8, serde_json::from_str::<HashMetadata>, Metadata::validate and buffer_end + N_LEN + n == buffer.len() all pass"
	srcTooSmall    = "read_metadata: buffer.get(..N_LEN) is None -> HeaderTooSmall"
	srcTooLarge    = "read_metadata: n > MAX_HEADER_SIZE (100_000_000) -> HeaderTooLarge"
	srcHeaderLen   = "read_metadata: buffer.get(N_LEN..n+N_LEN) is None -> InvalidHeaderLength"
	srcUTF8        = "read_metadata: core::str::from_utf8 fails -> InvalidHeader"
	srcJSON        = "read_metadata: serde_json::from_str fails (syntax, trailing characters, not a map, lone surrogate, recursion limit 128) -> InvalidHeaderDeserialization"
	srcWhitespace  = "serde_json::from_str skips JSON whitespace before the value and Deserializer::end allows only whitespace after it"
	srcUnknown     = "struct TensorInfo has no #[serde(deny_unknown_fields)]: unknown fields are ignored"
	srcMetaOption  = "struct HashMetadata: metadata: Option<HashMap<String, String>>, so null is None"
	srcMetaBad     = "struct HashMetadata: metadata: Option<HashMap<String, String>>: anything but null or an object of strings -> InvalidHeaderDeserialization"
	srcDupName     = "struct HashMetadata: #[serde(flatten)] tensors: HashMap<String, TensorInfo>: a repeated name is inserted again, the last entry counts"
	srcDupMetaKey  = "HashMap<String, String> of __metadata__: a repeated key is inserted again, the last value counts"
	srcDupField    = "#[derive(Deserialize)] refuses a repeated field of a struct (duplicate_field): __metadata__ of HashMetadata, dtype/shape/data_offsets of TensorInfo -> InvalidHeaderDeserialization"
	srcEntry       = "TensorInfo from a value that is not a map -> InvalidHeaderDeserialization"
	srcDType       = "enum Dtype (derive Deserialize): a missing, non-string or unknown dtype -> InvalidHeaderDeserialization"
	srcShape       = "TensorInfo.shape: Vec<usize>: missing, not an array, or an element that is not an integer in 0..2^64 -> InvalidHeaderDeserialization"
	srcOverflow    = "Metadata::validate: shape product or bit size overflows usize (checked_mul) -> ValidationOverflow"
	srcZeroProduct = "Metadata::validate: shape product by usize::checked_mul left to right; 2^63 fits, times 0 is 0"
	srcOffsetsType = "TensorInfo.data_offsets: (usize, usize): missing, not an array of two integers in 0..2^64 -> InvalidHeaderDeserialization"
	srcOffsets     = "Metadata::validate, tensors sorted by data_offsets: s != start || e < s -> InvalidOffset"
	srcSize        = "Metadata::validate: e - s != nbits / 8 -> TensorInvalidInfo"
	srcMisaligned  = "Metadata::validate: nbits % 8 != 0 -> MisalignedSlice"
	srcIncomplete  = "read_metadata: buffer_end + N_LEN + n != buffer.len() -> MetadataIncompleteBuffer"
	srcTies        = "try_from(HashMetadata): tensors.sort_by_key(data_offsets), so at equal begin the zero-size tensors (smaller end) come first; the slab rule orders equal (begin, end) by name"
)

// classDocs documents every Class, for cases.json.
var classDocs = map[Class]string{
	Truncated:      "the file ends before the 8-byte header length, before the end of the header that length announces, or before the end of the last tensor",
	HeaderTooLarge: "the header length is above 100,000,000 bytes",
	InvalidUTF8:    "the header is not valid UTF-8",
	InvalidJSON:    "the header is not exactly one JSON object with optional whitespace around it: empty, a syntax error, another kind of value, a lone UTF-16 surrogate in a \\u escape, or nesting deeper than 127 arrays and objects",
	DuplicateField: "\"__metadata__\" appears twice, or \"dtype\", \"shape\" or \"data_offsets\" appears twice in one tensor entry (a repeated tensor name, metadata key or unknown field is accepted: the last one counts)",
	BadMetadata:    "\"__metadata__\" is neither null nor an object whose values are all strings",
	BadEntry:       "the value of a tensor name is not a JSON object",
	BadDType:       "\"dtype\" is missing, not a string, or not one of the known dtypes",
	BadShape:       "\"shape\" is missing, not an array of integers in 0..2^63-1, or its element count or bit size overflows 64 unsigned bits",
	BadOffsets:     "\"data_offsets\" is missing, not two integers in 0..2^63-1, or begins after it ends; or, taken in ascending order of data_offsets, the tensors do not start at 0 or leave a gap or overlap",
	SizeMismatch:   "a tensor's data_offsets do not span shape x dtype bits / 8 bytes, or that is not a whole number of bytes",
	TrailingData:   "the data section is longer than the end of the last tensor",
}

type confTensor struct {
	Name        string   `json:"name"`
	DType       DType    `json:"dtype"`
	Shape       []uint64 `json:"shape"`
	DataOffsets [2]int64 `json:"data_offsets"`
	SlabOffset  int64    `json:"slab_offset"`
}

type confCase struct {
	File        string            `json:"file"`
	Verdict     string            `json:"verdict"` // "accept" or "refuse"
	Class       Class             `json:"class,omitempty"`
	Description string            `json:"description"`
	Reference   string            `json:"reference"` // where the reference decides
	DataOffset  int64             `json:"data_offset,omitempty"`
	Metadata    map[string]string `json:"metadata,omitempty"`
	// Tensors in slab order (the layout rule's order), with their slab offsets.
	Tensors  []confTensor `json:"tensors,omitempty"`
	SlabSize int64        `json:"slab_size,omitempty"`

	bytes []byte
}

// MarshalJSON writes metadata as null when the file has none, and leaves the
// accept-only fields out of refused cases.
func (c confCase) MarshalJSON() ([]byte, error) {
	type plain confCase
	if c.Verdict == "refuse" {
		return marshal(plain(c)), nil
	}
	return marshal(struct {
		plain
		Metadata   map[string]string `json:"metadata"`
		Tensors    []confTensor      `json:"tensors"`
		SlabSize   int64             `json:"slab_size"`
		DataOffset int64             `json:"data_offset"`
	}{plain(c), c.Metadata, c.Tensors, c.SlabSize, c.DataOffset}), nil
}

type corpus struct {
	Schema    int              `json:"schema"`
	About     string           `json:"about"`
	Generator string           `json:"generator"`
	Reference string           `json:"reference"`
	Align     int64            `json:"align"`
	Classes   map[Class]string `json:"classes"`
	Cases     []confCase       `json:"cases"`
}

// T is an expected tensor: name, dtype, shape, data_offsets.
func T(name string, dt DType, shape []uint64, begin, end int64) confTensor {
	return confTensor{Name: name, DType: dt, Shape: shape, DataOffsets: [2]int64{begin, end}}
}

func dims(d ...uint64) []uint64 { return append([]uint64{}, d...) }

// stdHeader writes the tensors as a compact JSON header, in the order given.
func stdHeader(md map[string]string, ts ...confTensor) string {
	var b strings.Builder
	b.WriteByte('{')
	if md != nil {
		m, _ := json.Marshal(md)
		fmt.Fprintf(&b, `"__metadata__":%s`, m)
	}
	for i, t := range ts {
		if i > 0 || md != nil {
			b.WriteByte(',')
		}
		name, _ := json.Marshal(t.Name)
		shape, _ := json.Marshal(t.Shape)
		fmt.Fprintf(&b, `%s:{"dtype":%q,"shape":%s,"data_offsets":[%d,%d]}`, name, t.DType, shape, t.DataOffsets[0], t.DataOffsets[1])
	}
	b.WriteByte('}')
	return b.String()
}

// confFile is an 8-byte length, the header and dataLen bytes of data.
func confFile(header string, dataLen int64) []byte {
	b := binary.LittleEndian.AppendUint64(nil, uint64(len(header)))
	b = append(b, header...)
	for i := range dataLen {
		b = append(b, byte(i*7+3))
	}
	return b
}

func dataEnd(ts []confTensor) int64 {
	var end int64
	for _, t := range ts {
		end = max(end, t.DataOffsets[1])
	}
	return end
}

// ruleLayout is the slab layout rule of docs/PROTOCOL.md, written out again
// here so that the corpus does not come from the code it checks.
func ruleLayout(ts []confTensor) ([]confTensor, int64) {
	out := slices.Clone(ts)
	slices.SortStableFunc(out, func(a, b confTensor) int {
		if a.DataOffsets[0] != b.DataOffsets[0] {
			return int(a.DataOffsets[0] - b.DataOffsets[0])
		}
		if a.DataOffsets[1] != b.DataOffsets[1] {
			return int(a.DataOffsets[1] - b.DataOffsets[1])
		}
		return strings.Compare(a.Name, b.Name)
	})
	up := func(n int64) int64 { return (n + confAlign - 1) / confAlign * confAlign }
	var end int64
	for i := range out {
		if i > 0 {
			out[i].SlabOffset = up(end)
		}
		end = out[i].SlabOffset + out[i].DataOffsets[1] - out[i].DataOffsets[0]
	}
	return out, max(up(end), confAlign)
}

func confCases() []confCase {
	var cases []confCase
	// accept adds a file that is accepted with tensors ts and metadata md.
	accept := func(name, desc, ref, header string, md map[string]string, ts ...confTensor) {
		lay, size := ruleLayout(ts)
		if lay == nil {
			lay = []confTensor{}
		}
		cases = append(cases, confCase{
			File: "accept-" + name + ".safetensors", Verdict: "accept", Description: desc, Reference: ref,
			DataOffset: 8 + int64(len(header)), Metadata: md, Tensors: lay, SlabSize: size,
			bytes: confFile(header, dataEnd(ts)),
		})
	}
	std := func(name, desc string, md map[string]string, ts ...confTensor) {
		accept(name, desc, srcAccept, stdHeader(md, ts...), md, ts...)
	}
	refuseBytes := func(name string, class Class, desc, ref string, b []byte) {
		cases = append(cases, confCase{File: "refuse-" + name + ".safetensors", Verdict: "refuse", Class: class, Description: desc, Reference: ref, bytes: b})
	}
	refuse := func(name string, class Class, desc, ref, header string, dataLen int64) {
		refuseBytes(name, class, desc, ref, confFile(header, dataLen))
	}
	lenPrefix := func(n uint64, rest string) []byte {
		return append(binary.LittleEndian.AppendUint64(nil, n), rest...)
	}
	u8 := func(name string, begin, end int64) confTensor {
		return T(name, U8, dims(uint64(end-begin)), begin, end)
	}
	const a2 = `"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}`
	entry := func(fields string) string { return `{"x":{` + fields + `}}` }

	// --- accepted ---
	std("minimal", "one F32 tensor", nil, T("a", F32, dims(2), 0, 8))
	accept("empty-header", "the header {} and no data", srcAccept, `{}`, nil)
	accept("leading-whitespace", "space, tab, CR and LF before the JSON object", srcWhitespace,
		" \t\r\n"+stdHeader(nil, u8("a", 0, 2)), nil, u8("a", 0, 2))
	accept("trailing-whitespace", "whitespace of all four kinds after the JSON object", srcWhitespace,
		stdHeader(nil, u8("a", 0, 2))+" \t\r\n", nil, u8("a", 0, 2))
	{
		ts := []confTensor{T("w", BF16, dims(2, 3), 0, 12), T("b", F32, dims(3), 12, 24)}
		h := stdHeader(map[string]string{"format": "pt"}, ts...)
		h += strings.Repeat(" ", 4096-8-len(h))
		accept("space-padding", "header padded with spaces so that the data starts at 4096, as weightfs writes files", srcWhitespace,
			h, map[string]string{"format": "pt"}, ts...)
	}
	accept("unknown-fields", "unknown fields in a tensor entry, of every JSON kind, one of them repeated", srcUnknown,
		`{"a":{"extra":[1,{"x":null}],"dtype":"U8","n":1.5e3,"shape":[2],"t":true,"data_offsets":[0,2],"more":"x","more":{}}}`, nil, u8("a", 0, 2))
	accept("metadata-null", `"__metadata__": null is the same as no metadata`, srcMetaOption,
		`{"__metadata__":null,`+a2+`}`, nil, u8("a", 0, 2))
	accept("metadata-empty", `"__metadata__": {}`, srcAccept, `{"__metadata__":{}}`, map[string]string{})
	std("metadata-strings", "metadata with several keys, one of them an empty string", map[string]string{"format": "pt", "e": "", "x": "\u00e9\U0001F600"}, T("t", I64, dims(1), 0, 8))
	accept("metadata-last", `"__metadata__" after the tensors`, srcAccept,
		`{`+a2+`,"__metadata__":{"k":"v"}}`, map[string]string{"k": "v"}, u8("a", 0, 2))
	std("zero-size", "zero-size tensors at the start, the middle and the end", nil,
		T("s", F32, dims(0), 0, 0), T("m", U8, dims(3), 0, 3), T("e", F16, dims(2, 0), 3, 3), T("n", BF16, dims(1), 3, 5), T("z", I64, dims(0, 4), 5, 5))
	std("only-zero-size", "one zero-size tensor and no data", nil, T("z", F32, dims(0), 0, 0))
	std("scalar", "0-rank tensors (shape [])", nil, T("s", F64, dims(), 0, 8), T("t", BF16, dims(), 8, 10))
	std("bool", "BOOL", nil, T("mask", BOOL, dims(3), 0, 3))
	std("fp8", "the five 8-bit float dtypes", nil,
		T("e4m3", F8_E4M3, dims(4), 0, 4), T("e5m2", F8_E5M2, dims(2, 2), 4, 8), T("e8m0", F8_E8M0, dims(3), 8, 11),
		T("e4m3fnuz", F8_E4M3FNUZ, dims(1), 11, 12), T("e5m2fnuz", F8_E5M2FNUZ, dims(5), 12, 17))
	std("sub-byte", "F4 and the 6-bit floats, whole bytes", nil,
		T("f4", F4, dims(2, 3), 0, 3), T("f6a", F6_E2M3, dims(4), 3, 6), T("f6b", F6_E3M2, dims(8), 6, 12))
	{
		var ts []confTensor
		var off int64
		for i, dt := range DTypes {
			n := uint64(i%3 + 1)
			if dt.Bits() < 8 {
				n = 8
			}
			size := int64(n) * int64(dt.Bits()) / 8
			ts = append(ts, T(strings.ToLower(string(dt)), dt, dims(n), off, off+size))
			off += size
		}
		std("every-dtype", "one tensor of every dtype the format knows", nil, ts...)
	}
	{
		ts := []confTensor{T("z", U8, dims(300), 0, 300), T("a", U8, dims(1), 300, 301), T("m", F32, dims(1), 301, 305)}
		h := stdHeader(nil, ts[2], ts[0], ts[1])
		accept("out-of-order", "JSON order m, z, a; data order z, a, m: the slab follows the data", srcAccept, h, nil, ts...)
	}
	std("unaligned", "BF16[3] then F32[5] then I64[3]: data offsets 0, 6, 26; the example of docs/PROTOCOL.md", nil,
		T("a", BF16, dims(3), 0, 6), T("b", F32, dims(5), 6, 26), T("c", I64, dims(3), 26, 50))
	withRef := func(name, desc, ref string, ts ...confTensor) {
		accept(name, desc, ref, stdHeader(nil, ts...), nil, ts...)
	}
	withRef("ties", "tensors with equal begin: zero-size ones (smaller end) first, equal (begin, end) by name", srcTies,
		T("b", U8, dims(3), 2, 5), T("zz", F32, dims(0), 2, 2), T("a", U8, dims(2), 0, 2), T("c", I64, dims(0), 2, 2),
		T("y", F16, dims(0), 0, 0), T("x", F16, dims(0), 0, 0), T("q", U8, dims(0), 5, 5), T("p", U8, dims(0), 5, 5))
	accept("duplicate-name", `a tensor name twice: the last entry counts`, srcDupName,
		`{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}`, nil, u8("w", 0, 2))
	accept("duplicate-metadata-key", `a metadata key twice: the last value counts`, srcDupMetaKey,
		`{"__metadata__":{"k":"1","k":"2"},`+a2+`}`, map[string]string{"k": "2"}, u8("a", 0, 2))
	accept("escaped-names", `names with \u escapes, a surrogate pair, a quote, and the empty name`, srcAccept,
		`{"a\u00e9\ud83d\ude00\"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}`, nil,
		u8("a\u00e9\U0001F600\"", 0, 1), u8("", 1, 2))
	accept("deepest-nesting", "an unknown field nested 127 levels deep in all", srcAccept,
		`{"a":{"x":`+strings.Repeat("[", 125)+strings.Repeat("]", 125)+`,"dtype":"U8","shape":[2],"data_offsets":[0,2]}}`, nil, u8("a", 0, 2))
	accept("numbers-in-range", "large, tiny and negative numbers in an unknown field, all within float64", srcUnknown,
		`{"a":{"v":[123456789012345678901234567890,1e-400,-1.5e308,1.7976931348623157e308,-0.0],"dtype":"U8","shape":[2],"data_offsets":[0,2]}}`, nil, u8("a", 0, 2))
	std("huge-dim-times-zero", "shape [0, 2^63-1]: zero elements", nil, T("a", F64, dims(0, 1<<63-1), 0, 0))
	withRef("big-product-times-zero", "shape [2^32, 2^31, 0]: the product 2^63 fits 64 unsigned bits before the 0", srcZeroProduct,
		T("a", U8, dims(1<<32, 1<<31, 0), 0, 0), T("b", U8, dims(1), 0, 1))

	// --- refused ---
	refuseBytes("empty-file", Truncated, "a file of 0 bytes", srcTooSmall, nil)
	refuseBytes("short-file", Truncated, "a file of 3 bytes", srcTooSmall, []byte{2, 0, 0})
	refuseBytes("header-past-end", Truncated, "the header length runs past the end of the file", srcHeaderLen, lenPrefix(123, "{}"))
	refuse("tensor-past-end", Truncated, "the file ends inside the last tensor", srcIncomplete, `{`+a2+`}`, 1)
	refuseBytes("header-too-large", HeaderTooLarge, "header length 100,000,001", srcTooLarge, lenPrefix(MaxHeaderSize+1, "{}"))
	refuseBytes("header-length-2p63", HeaderTooLarge, "header length 2^63", srcTooLarge, lenPrefix(1<<63, "{}"))
	refuse("invalid-utf8", InvalidUTF8, "a 0xff byte in a name", srcUTF8, "{\"\xff\":{}}", 0)
	refuse("utf8-surrogate", InvalidUTF8, "a UTF-16 surrogate encoded in UTF-8 (ED A0 80)", srcUTF8, "{\"__metadata__\":{\"k\":\"\xed\xa0\x80\"}}", 0)
	refuse("utf8-overlong", InvalidUTF8, "an overlong encoding of '/' (C0 AF)", srcUTF8, "{\"\xc0\xaf\":{}}", 0)
	refuseBytes("zero-length-header", InvalidJSON, "header length 0", srcJSON, lenPrefix(0, ""))
	refuse("whitespace-only", InvalidJSON, "a header of spaces", srcJSON, "    ", 0)
	refuse("array", InvalidJSON, "the header is an array", srcJSON, `[]`, 0)
	refuse("string", InvalidJSON, "the header is a string", srcJSON, ` "{}"`, 0)
	refuse("byte-order-mark", InvalidJSON, "a UTF-8 byte order mark before the object", srcJSON, "\ufeff{}", 0)
	refuse("nul-padding", InvalidJSON, "the header padded with a NUL byte", srcJSON, "{}\x00", 0)
	refuse("trailing-garbage", InvalidJSON, "a character after the object", srcJSON, `{}x`, 0)
	refuse("two-objects", InvalidJSON, "two JSON objects", srcJSON, `{} {}`, 0)
	refuse("trailing-comma", InvalidJSON, "a comma before }", srcJSON, `{`+a2+`,}`, 2)
	refuse("unterminated", InvalidJSON, "the object is cut short", srcJSON, `{"a":`, 0)
	refuse("nan", InvalidJSON, "NaN in an unknown field", srcJSON, entry(`"v":NaN,"dtype":"U8","shape":[0],"data_offsets":[0,0]`), 0)
	refuse("number-out-of-range", InvalidJSON, "1e400 in an unknown field: beyond float64", srcJSON, entry(`"v":1e400,"dtype":"U8","shape":[0],"data_offsets":[0,0]`), 0)
	refuse("integer-out-of-range", InvalidJSON, "an integer of 400 digits in an unknown field: beyond float64", srcJSON, entry(`"v":1`+strings.Repeat("0", 400)+`,"dtype":"U8","shape":[0],"data_offsets":[0,0]`), 0)
	refuse("lone-surrogate", InvalidJSON, `a lone leading surrogate \ud800 in a name`, srcJSON, `{"\ud800":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}`, 0)
	refuse("lone-trailing-surrogate", InvalidJSON, `a lone trailing surrogate \udc00 in a metadata value`, srcJSON, `{"__metadata__":{"k":"\udc00x"}}`, 0)
	refuse("lone-surrogate-unknown-field", InvalidJSON, `a lone surrogate in the value of an unknown field`, srcJSON, entry(`"v":"\ud800","dtype":"U8","shape":[0],"data_offsets":[0,0]`), 0)
	refuse("too-deep", InvalidJSON, "an unknown field nested 128 levels deep in all", srcJSON,
		`{"a":{"x":`+strings.Repeat("[", 126)+strings.Repeat("]", 126)+`,"dtype":"U8","shape":[2],"data_offsets":[0,2]}}`, 2)
	refuse("duplicate-metadata", DuplicateField, `"__metadata__" twice`, srcDupField, `{"__metadata__":{},"__metadata__":{}}`, 0)
	refuse("duplicate-metadata-null", DuplicateField, `"__metadata__" twice, both null`, srcDupField, `{"__metadata__":null,"__metadata__":null}`, 0)
	refuse("duplicate-dtype", DuplicateField, `"dtype" twice in one entry`, srcDupField, entry(`"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]`), 1)
	refuse("duplicate-offsets", DuplicateField, `"data_offsets" twice in one entry`, srcDupField, entry(`"dtype":"U8","shape":[1],"data_offsets":[0,1],"data_offsets":[0,1]`), 1)
	refuse("metadata-array", BadMetadata, `"__metadata__" is an array`, srcMetaBad, `{"__metadata__":["x"]}`, 0)
	refuse("metadata-string", BadMetadata, `"__metadata__" is a string`, srcMetaBad, `{"__metadata__":"x"}`, 0)
	refuse("metadata-number-value", BadMetadata, "a metadata value is a number", srcMetaBad, `{"__metadata__":{"format":1}}`, 0)
	refuse("metadata-null-value", BadMetadata, "a metadata value is null", srcMetaBad, `{"__metadata__":{"format":null}}`, 0)
	refuse("entry-array", BadEntry, "a tensor's value is an array", srcEntry, `{"w":[1]}`, 0)
	refuse("entry-null", BadEntry, "a tensor's value is null", srcEntry, `{"w":null}`, 0)
	refuse("duplicate-name-first-invalid", BadDType, "a tensor name twice, the first entry has an unknown dtype: every entry must be valid", srcDType,
		`{"w":{"dtype":"F12","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1)
	refuse("unknown-dtype", BadDType, `dtype "F12"`, srcDType, entry(`"dtype":"F12","shape":[1],"data_offsets":[0,1]`), 1)
	refuse("lowercase-dtype", BadDType, `dtype "f32"`, srcDType, entry(`"dtype":"f32","shape":[1],"data_offsets":[0,4]`), 4)
	refuse("dtype-number", BadDType, "dtype is a number", srcDType, entry(`"dtype":8,"shape":[1],"data_offsets":[0,1]`), 1)
	refuse("missing-dtype", BadDType, "no dtype", srcDType, entry(`"shape":[1],"data_offsets":[0,1]`), 1)
	refuse("missing-shape", BadShape, "no shape", srcShape, entry(`"dtype":"U8","data_offsets":[0,1]`), 1)
	refuse("shape-not-array", BadShape, "shape is a number", srcShape, entry(`"dtype":"U8","shape":1,"data_offsets":[0,1]`), 1)
	refuse("shape-null", BadShape, "shape is null", srcShape, entry(`"dtype":"U8","shape":null,"data_offsets":[0,0]`), 0)
	refuse("shape-negative", BadShape, "shape [-1]", srcShape, entry(`"dtype":"U8","shape":[-1],"data_offsets":[0,1]`), 1)
	refuse("shape-minus-zero", BadShape, "shape [-0] (serde_json reads -0 as a float)", srcShape, entry(`"dtype":"U8","shape":[-0],"data_offsets":[0,0]`), 0)
	refuse("shape-float", BadShape, "shape [1, 2.0]", srcShape, entry(`"dtype":"U8","shape":[1,2.0],"data_offsets":[0,2]`), 2)
	refuse("shape-exponent", BadShape, "shape [1e0]", srcShape, entry(`"dtype":"U8","shape":[1e0],"data_offsets":[0,1]`), 1)
	refuse("shape-string", BadShape, `shape ["1"]`, srcShape, entry(`"dtype":"U8","shape":["1"],"data_offsets":[0,1]`), 1)
	refuse("shape-nested", BadShape, "shape [[1]]", srcShape, entry(`"dtype":"U8","shape":[[1]],"data_offsets":[0,1]`), 1)
	refuse("shape-bool", BadShape, "shape [true]", srcShape, entry(`"dtype":"U8","shape":[true],"data_offsets":[0,1]`), 1)
	refuse("shape-2p64", BadShape, "shape [2^64]", srcShape, entry(`"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,1]`), 1)
	refuse("elements-overflow", BadShape, "shape [2^32, 2^32]: 2^64 elements", srcOverflow, entry(`"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]`), 0)
	refuse("overflow-before-zero", BadShape, "shape [2^32, 2^32, 0]: the product overflows before the 0", srcOverflow, entry(`"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]`), 0)
	refuse("bits-overflow", BadShape, "F64 of shape [2^61]: 2^67 bits", srcOverflow, entry(`"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,0]`), 0)
	refuse("missing-offsets", BadOffsets, "no data_offsets", srcOffsetsType, entry(`"dtype":"U8","shape":[1]`), 1)
	refuse("offsets-three", BadOffsets, "data_offsets [0,1,1]", srcOffsetsType, entry(`"dtype":"U8","shape":[1],"data_offsets":[0,1,1]`), 1)
	refuse("offsets-one", BadOffsets, "data_offsets [0]", srcOffsetsType, entry(`"dtype":"U8","shape":[0],"data_offsets":[0]`), 0)
	refuse("offsets-object", BadOffsets, "data_offsets is an object", srcOffsetsType, entry(`"dtype":"U8","shape":[0],"data_offsets":{"0":0}`), 0)
	refuse("offsets-negative", BadOffsets, "data_offsets [-1, 0]", srcOffsetsType, entry(`"dtype":"U8","shape":[0],"data_offsets":[-1,0]`), 0)
	refuse("offsets-float", BadOffsets, "data_offsets [0, 1.0]", srcOffsetsType, entry(`"dtype":"U8","shape":[1],"data_offsets":[0,1.0]`), 1)
	refuse("offsets-reversed", BadOffsets, "data_offsets [1, 0]", srcOffsets, entry(`"dtype":"U8","shape":[1],"data_offsets":[1,0]`), 1)
	refuse("gap-at-start", BadOffsets, "the first tensor starts at 1", srcOffsets, entry(`"dtype":"U8","shape":[1],"data_offsets":[1,2]`), 2)
	refuse("gap-between", BadOffsets, "one byte between two tensors", srcOffsets, `{"b":{"dtype":"U8","shape":[1],"data_offsets":[3,4]},`+a2+`}`, 4)
	refuse("overlap", BadOffsets, "two tensors overlap", srcOffsets,
		`{"a.weight":{"dtype":"U8","shape":[10],"data_offsets":[10,20]},"b":{"dtype":"U8","shape":[12],"data_offsets":[0,12]}}`, 20)
	refuse("same-start", BadOffsets, "two non-empty tensors start at 0", srcOffsets,
		`{"a":{"dtype":"U8","shape":[10],"data_offsets":[0,10]},"b":{"dtype":"U8","shape":[12],"data_offsets":[0,12]}}`, 12)
	refuse("zero-size-inside", BadOffsets, "a zero-size tensor inside another one", srcOffsets,
		`{"b":{"dtype":"U8","shape":[0],"data_offsets":[1,1]},`+a2+`}`, 2)
	refuse("duplicate-name-gap", BadOffsets, "a tensor name twice: the last entry, [1,2], leaves a gap", srcOffsets,
		`{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}`, 2)
	refuse("size-mismatch", SizeMismatch, "F32 [2] in 4 bytes", srcSize, entry(`"dtype":"F32","shape":[2],"data_offsets":[0,4]`), 4)
	refuse("size-mismatch-scalar", SizeMismatch, "F32 [] in 0 bytes", srcSize, entry(`"dtype":"F32","shape":[],"data_offsets":[0,0]`), 0)
	refuse("f4-odd", SizeMismatch, "F4 [3]: 12 bits", srcMisaligned, entry(`"dtype":"F4","shape":[3],"data_offsets":[0,1]`), 1)
	refuse("f6-odd", SizeMismatch, "F6_E2M3 [2]: 12 bits", srcMisaligned, entry(`"dtype":"F6_E2M3","shape":[2],"data_offsets":[0,1]`), 1)
	refuse("trailing-data", TrailingData, "one byte after the last tensor", srcIncomplete, `{`+a2+`}`, 3)
	refuse("no-tensors-with-data", TrailingData, "no tensors but 5 bytes of data", srcIncomplete, `{"__metadata__":{}}`, 5)
	return cases
}

func buildCorpus() (corpus, map[string][]byte) {
	classes := map[Class]string{}
	for _, c := range Classes {
		classes[c] = classDocs[c]
	}
	c := corpus{
		Schema: 1,
		About: "Safetensors files and the verdict every weightfs parser reaches on them: accept (tensors in slab order, " +
			"with the slab offset and slab size of the layout rule of docs/PROTOCOL.md) or refuse (with a class). " +
			"Each verdict is the reference parser's; \"reference\" says where in its source it is decided.",
		Generator: "go test ./store/safetensors -run TestConformance -update",
		Reference: refCommit,
		Align:     confAlign,
		Classes:   classes,
	}
	files := map[string][]byte{}
	for _, k := range confCases() {
		if _, dup := files[k.File]; dup {
			panic("two cases write " + k.File)
		}
		files[k.File] = k.bytes
		c.Cases = append(c.Cases, k)
	}
	return c, files
}

// marshal is json.Marshal without HTML escaping.
func marshal(v any) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		panic(err)
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

func marshalCorpus(c corpus) []byte {
	var buf bytes.Buffer
	buf.WriteString("{\n")
	head := marshal(struct {
		Schema    int              `json:"schema"`
		About     string           `json:"about"`
		Generator string           `json:"generator"`
		Reference string           `json:"reference"`
		Align     int64            `json:"align"`
		Classes   map[Class]string `json:"classes"`
	}{c.Schema, c.About, c.Generator, c.Reference, c.Align, c.Classes})
	var indented bytes.Buffer
	json.Indent(&indented, head, "", "  ")
	body := bytes.TrimSuffix(bytes.TrimPrefix(indented.Bytes(), []byte("{\n")), []byte("\n}"))
	buf.Write(body)
	buf.WriteString(",\n  \"cases\": [\n")
	for i, k := range c.Cases {
		line := marshal(k)
		buf.WriteString("    ")
		buf.Write(line)
		if i < len(c.Cases)-1 {
			buf.WriteByte(',')
		}
		buf.WriteByte('\n')
	}
	buf.WriteString("  ]\n}\n")
	return buf.Bytes()
}

func TestConformance(t *testing.T) {
	c, files := buildCorpus()
	manifest := marshalCorpus(c)
	if *update {
		old, _ := filepath.Glob(filepath.Join(conformanceDir, "*.safetensors"))
		for _, p := range old {
			if err := os.Remove(p); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.MkdirAll(conformanceDir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, b := range files {
			if err := os.WriteFile(filepath.Join(conformanceDir, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(conformanceDir, "cases.json"), manifest, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The committed corpus is what the generator makes.
	const regen = "; regenerate with: go test ./store/safetensors -run TestConformance -update"
	got, err := os.ReadFile(filepath.Join(conformanceDir, "cases.json"))
	if err != nil || !bytes.Equal(got, manifest) {
		t.Fatalf("testdata/conformance/cases.json is not what the generator makes (%v)%s", err, regen)
	}
	onDisk, _ := filepath.Glob(filepath.Join(conformanceDir, "*.safetensors"))
	if len(onDisk) != len(files) {
		t.Errorf("%d .safetensors files in %s, the generator makes %d%s", len(onDisk), conformanceDir, len(files), regen)
	}
	var accepted, refused int
	for _, k := range c.Cases {
		t.Run(strings.TrimSuffix(k.File, ".safetensors"), func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join(conformanceDir, k.File))
			if err != nil || !bytes.Equal(b, files[k.File]) {
				t.Fatalf("%s is not what the generator makes (%v)%s", k.File, err, regen)
			}
			h, err := Parse(b)
			h2, err2 := ReadHeader(bytes.NewReader(b), int64(len(b)))
			if fmt.Sprint(err) != fmt.Sprint(err2) {
				t.Errorf("ReadHeader says %v, Parse %v", err2, err)
			}
			if k.Verdict == "refuse" {
				refused++
				if err == nil {
					t.Fatalf("accepted, want refused (%s)", k.Class)
				}
				if !errors.Is(err, k.Class) || ClassOf(err) != k.Class {
					t.Errorf("refused as %q (%v), want %q", ClassOf(err), err, k.Class)
				}
				return
			}
			accepted++
			if err != nil {
				t.Fatalf("refused (%s: %v), want accepted", ClassOf(err), err)
			}
			if h.DataOffset() != k.DataOffset || h2.DataOffset() != k.DataOffset {
				t.Errorf("data offset %d, want %d", h.DataOffset(), k.DataOffset)
			}
			if (h.Metadata == nil) != (k.Metadata == nil) || !equalMaps(h.Metadata, k.Metadata) {
				t.Errorf("metadata %#v, want %#v", h.Metadata, k.Metadata)
			}
			// h.Tensors is in the layout rule's order too.
			if len(h.Tensors) != len(k.Tensors) {
				t.Fatalf("%d tensors, want %d", len(h.Tensors), len(k.Tensors))
			}
			for i, w := range k.Tensors {
				g := h.Tensors[i]
				shape := make([]uint64, len(g.Shape))
				for j, d := range g.Shape {
					shape[j] = uint64(d)
				}
				if g.Name != w.Name || g.DType != w.DType || !slices.Equal(shape, w.Shape) || g.Begin != w.DataOffsets[0] || g.End != w.DataOffsets[1] {
					t.Errorf("tensor %d: %+v, want %+v", i, g, w)
				}
			}
		})
	}
	if accepted < 25 || refused < 60 {
		t.Errorf("%d accepted and %d refused cases: the corpus shrank", accepted, refused)
	}
	// Every class is exercised.
	for _, cl := range Classes {
		if !slices.ContainsFunc(c.Cases, func(k confCase) bool { return k.Class == cl }) {
			t.Errorf("no case of class %s", cl)
		}
	}
}
