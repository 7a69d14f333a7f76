package safetensors

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// MaxHeaderSize is the largest JSON header the reference parser accepts, in bytes.
const MaxHeaderSize = 100_000_000

// maxDepth is the deepest nesting of JSON arrays and objects that the
// reference parser (serde_json, recursion limit 128) accepts.
const maxDepth = 127

// metadataKey is the header key of the optional string-to-string map.
const metadataKey = "__metadata__"

// Class is the reason a file is refused, one of a small fixed set shared
// with the Python package (integration/python, HeaderError.cls) and the
// conformance corpus (testdata/conformance/cases.json, which documents each
// class). A Class is an error, so errors.Is(err, safetensors.BadDType)
// matches any *FormatError of that class.
type Class string

// The classes of refusal. Each file of the conformance corpus that is
// refused is refused with exactly one of them.
const (
	// Truncated: the file ends before the 8-byte length, before the end of
	// the header it announces, or before the end of the last tensor.
	Truncated Class = "truncated"
	// HeaderTooLarge: the header length is above MaxHeaderSize.
	HeaderTooLarge Class = "header_too_large"
	// InvalidUTF8: the header is not valid UTF-8.
	InvalidUTF8 Class = "invalid_utf8"
	// InvalidJSON: the header is not one JSON object (empty, syntax error,
	// another value, lone UTF-16 surrogate, nesting deeper than 127).
	InvalidJSON Class = "invalid_json"
	// DuplicateField: "__metadata__" twice, or "dtype", "shape" or
	// "data_offsets" twice in one tensor entry.
	DuplicateField Class = "duplicate_field"
	// BadMetadata: "__metadata__" is neither null nor an object of strings.
	BadMetadata Class = "bad_metadata"
	// BadEntry: a tensor's entry is not a JSON object.
	BadEntry Class = "bad_entry"
	// BadDType: "dtype" is missing, not a string, or not a known dtype.
	BadDType Class = "bad_dtype"
	// BadShape: "shape" is missing, not an array of non-negative integers,
	// or its element or bit count overflows.
	BadShape Class = "bad_shape"
	// BadOffsets: "data_offsets" is missing, not two non-negative integers,
	// begins after it ends, or the tensors leave a gap or overlap.
	BadOffsets Class = "bad_offsets"
	// SizeMismatch: a tensor's data_offsets do not span its shape's byte
	// size, or that size is not a whole number of bytes.
	SizeMismatch Class = "size_mismatch"
	// TrailingData: the data section goes on past the end of the last tensor.
	TrailingData Class = "trailing_data"
)

// Classes lists every Class.
var Classes = []Class{
	Truncated, HeaderTooLarge, InvalidUTF8, InvalidJSON, DuplicateField, BadMetadata,
	BadEntry, BadDType, BadShape, BadOffsets, SizeMismatch, TrailingData,
}

func (c Class) Error() string { return "invalid safetensors: " + string(c) }

// FormatError reports a file that is not valid safetensors: the class of the
// problem and a description of it.
type FormatError struct {
	Class   Class
	Problem string
}

func (e *FormatError) Error() string { return "invalid safetensors: " + e.Problem }

// Is reports whether target is e's Class.
func (e *FormatError) Is(target error) bool {
	c, ok := target.(Class)
	return ok && c == e.Class
}

// ClassOf returns the Class of err's *FormatError, or "" when err is nil or
// not a format error (an I/O error, for example).
func ClassOf(err error) Class {
	var fe *FormatError
	if errors.As(err, &fe) {
		return fe.Class
	}
	return ""
}

func formatErr(c Class, format string, args ...any) error {
	return &FormatError{Class: c, Problem: fmt.Sprintf(format, args...)}
}

// TensorInfo describes one tensor of a header.
type TensorInfo struct {
	Name  string
	DType DType
	Shape []int64
	// Begin and End are the header's data_offsets, relative to the start
	// of the data section.
	Begin, End int64
}

// Size returns the tensor's size in bytes (End-Begin).
func (t TensorInfo) Size() int64 { return t.End - t.Begin }

// Elements returns the number of elements: the product of the shape, 1 for
// a 0-rank tensor. It returns -1 when the product, taken left to right in 64
// unsigned bits as the reference does, overflows, or when it does not fit
// int64 or a dimension is negative.
func (t TensorInfo) Elements() int64 {
	n, ok := elements(t.Shape)
	if !ok || n > math.MaxInt64 {
		return -1
	}
	return int64(n)
}

// elements multiplies the shape out, left to right in 64 unsigned bits as
// the reference (usize::checked_mul) does, reporting false on overflow or a
// negative dimension: [2^32, 2^31, 0] has 0 elements, [2^32, 2^32, 0] overflows.
func elements(shape []int64) (uint64, bool) {
	n := uint64(1)
	for _, d := range shape {
		hi, lo := bits.Mul64(n, uint64(d))
		if d < 0 || hi != 0 {
			return 0, false
		}
		n = lo
	}
	return n, true
}

// byteSize returns elements*bits/8, or the class and a description of the
// problem when the tensor's byte size cannot be computed or is not a whole
// number of bytes. Like the reference (usize::checked_mul, left to right) it
// multiplies in 64 unsigned bits and refuses only a product that overflows
// them, so [2^32, 2^31, 0] has 0 elements.
func byteSize(dt DType, shape []int64) (int64, Class, string) {
	width := uint64(dt.Bits())
	if width == 0 {
		return 0, BadDType, fmt.Sprintf("unknown dtype %q", string(dt))
	}
	n, ok := elements(shape)
	if !ok {
		return 0, BadShape, fmt.Sprintf("element count of shape %s overflows", fmtShape(shape))
	}
	hi, nbits := bits.Mul64(n, width)
	if hi != 0 {
		return 0, BadShape, fmt.Sprintf("bit size of shape %s of %s overflows", fmtShape(shape), dt)
	}
	if nbits%8 != 0 {
		return 0, SizeMismatch, fmt.Sprintf("%d elements of %s are %d bits, not a whole number of bytes", n, dt, nbits)
	}
	return int64(nbits / 8), "", ""
}

func fmtShape(shape []int64) string {
	var b strings.Builder
	b.WriteByte('[')
	for i, d := range shape {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.FormatInt(d, 10))
	}
	b.WriteByte(']')
	return b.String()
}

// Header is a parsed and validated safetensors header.
type Header struct {
	// Metadata is the "__metadata__" map, nil when the header has none.
	Metadata map[string]string
	// Tensors in ascending order of Begin; zero-size tensors that share an
	// offset are ordered by name.
	Tensors []TensorInfo
	// HeaderSize is n, the JSON header's length from the 8-byte prefix
	// (padding included).
	HeaderSize int64

	index map[string]int
}

// DataOffset returns the file offset of the data section: 8 + HeaderSize.
func (h *Header) DataOffset() int64 { return 8 + h.HeaderSize }

// DataSize returns the size of the data section: the largest tensor end.
func (h *Header) DataSize() int64 {
	var end int64
	for _, t := range h.Tensors {
		end = max(end, t.End)
	}
	return end
}

// FileSize returns the size of the whole file: DataOffset + DataSize.
func (h *Header) FileSize() int64 { return h.DataOffset() + h.DataSize() }

// Lookup returns the tensor called name.
func (h *Header) Lookup(name string) (TensorInfo, bool) {
	if h.index != nil && len(h.index) == len(h.Tensors) {
		if i, ok := h.index[name]; ok && i < len(h.Tensors) && h.Tensors[i].Name == name {
			return h.Tensors[i], true
		}
		return TensorInfo{}, false
	}
	for _, t := range h.Tensors {
		if t.Name == name {
			return t, true
		}
	}
	return TensorInfo{}, false
}

// Parse validates a whole safetensors file held in memory and returns its
// header. The tensor data of t is file[h.DataOffset()+t.Begin : h.DataOffset()+t.End].
func Parse(file []byte) (*Header, error) {
	return ReadHeader(bytes.NewReader(file), int64(len(file)))
}

// ReadHeader reads the 8-byte prefix and the JSON header of a safetensors
// file of fileSize bytes from r, and validates them as the reference parser
// does, including that the tensors exactly tile the data section up to the
// end of the file. Format problems are returned as *FormatError; read errors
// are wrapped.
//
// It accepts what the reference (the Rust safetensors crate, checked against
// version 0.8, safetensors/src/tensor.rs) accepts. Like the reference it
// accepts whitespace before and after the JSON object, "__metadata__": null
// (as absent), unknown fields in tensor entries (repeated or not), and a
// repeated tensor name or metadata key (the last one counts); it refuses a
// repeated "__metadata__", "dtype", "shape" or "data_offsets", lone UTF-16
// surrogates in \u escapes and nesting deeper than 127. One known
// difference: a shape dimension of 2^63 or more is refused (BadShape) even in
// a tensor with another dimension 0, which the reference accepts.
// The conformance corpus (testdata/conformance) pins every verdict and the
// Class of every refusal.
func ReadHeader(r io.ReaderAt, fileSize int64) (*Header, error) {
	if fileSize < 8 {
		return nil, formatErr(Truncated, "file is %d bytes, shorter than the 8-byte header length", fileSize)
	}
	var prefix [8]byte
	if err := readFull(r, prefix[:], 0); err != nil {
		return nil, fmt.Errorf("reading safetensors header length: %w", err)
	}
	n := binary.LittleEndian.Uint64(prefix[:])
	if n > MaxHeaderSize {
		return nil, formatErr(HeaderTooLarge, "header length %d exceeds the maximum of %d bytes", n, MaxHeaderSize)
	}
	if int64(n) > fileSize-8 {
		return nil, formatErr(Truncated, "header length %d exceeds file size %d", n, fileSize)
	}
	// Read in chunks, so that a reader shorter than fileSize claims fails
	// before a large buffer is allocated.
	const chunk = 1 << 20
	buf := make([]byte, 0, min(n, chunk))
	for uint64(len(buf)) < n {
		part := min(n-uint64(len(buf)), chunk)
		start := len(buf)
		buf = append(buf, make([]byte, part)...)
		if err := readFull(r, buf[start:], 8+int64(start)); err != nil {
			return nil, fmt.Errorf("reading safetensors header: %w", err)
		}
	}
	return parseHeader(buf, fileSize-8-int64(n))
}

// readFull reads len(p) bytes at off; a short read is io.ErrUnexpectedEOF.
func readFull(r io.ReaderAt, p []byte, off int64) error {
	got, err := r.ReadAt(p, off)
	if got == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// parseHeader validates the JSON header buf for a data section of dataSize bytes.
func parseHeader(buf []byte, dataSize int64) (*Header, error) {
	if len(buf) == 0 {
		return nil, formatErr(InvalidJSON, "header is empty")
	}
	if !utf8.Valid(buf) {
		return nil, formatErr(InvalidUTF8, "header is not valid UTF-8")
	}
	if !json.Valid(buf) {
		err := json.Unmarshal(buf, new(json.RawMessage))
		var se *json.SyntaxError
		if errors.As(err, &se) {
			return nil, formatErr(InvalidJSON, "header is not valid JSON: %v (at byte %d)", se, se.Offset)
		}
		return nil, formatErr(InvalidJSON, "header is not valid JSON: %v", err)
	}
	// The reference (safetensors 0.8) lets JSON whitespace precede the
	// object: it has no check that the header starts with '{'.
	if first := bytes.TrimLeft(buf, " \t\r\n"); first[0] != '{' {
		return nil, formatErr(InvalidJSON, "header is not a JSON object")
	}
	if err := checkStrictJSON(buf); err != nil {
		return nil, err
	}

	h := &Header{HeaderSize: int64(len(buf))}
	if err := walkHeader(buf, h); err != nil {
		return nil, err
	}
	slices.SortFunc(h.Tensors, func(a, b TensorInfo) int {
		if a.Begin != b.Begin {
			return cmpInt(a.Begin, b.Begin)
		}
		if a.End != b.End {
			return cmpInt(a.End, b.End)
		}
		return strings.Compare(a.Name, b.Name)
	})
	if err := checkLayout(h.Tensors, dataSize); err != nil {
		return nil, err
	}
	h.index = make(map[string]int, len(h.Tensors))
	for i, t := range h.Tensors {
		h.index[t.Name] = i
	}
	return h, nil
}

func cmpInt(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// checkLayout checks, in the reference's order, that the tensors sorted by
// offsets tile [0, end) with each one's size matching its shape, and then
// that end is the end of the file.
func checkLayout(tensors []TensorInfo, dataSize int64) error {
	var end int64
	prev, last := "", TensorInfo{}
	for i, t := range tensors {
		switch {
		case t.Begin < end:
			return formatErr(BadOffsets, "tensor %q: data_offsets [%d,%d] overlap previous tensor %q ending at %d", t.Name, t.Begin, t.End, prev, end)
		case t.Begin > end && i == 0:
			return formatErr(BadOffsets, "tensor %q: data_offsets [%d,%d] leave a gap of %d bytes at the start of the data section", t.Name, t.Begin, t.End, t.Begin)
		case t.Begin > end:
			return formatErr(BadOffsets, "tensor %q: data_offsets [%d,%d] leave a gap of %d bytes after previous tensor %q ending at %d", t.Name, t.Begin, t.End, t.Begin-end, prev, end)
		}
		size, class, problem := byteSize(t.DType, t.Shape)
		if problem != "" {
			return formatErr(class, "tensor %q: %s", t.Name, problem)
		}
		if size != t.End-t.Begin {
			return formatErr(SizeMismatch, "tensor %q: shape %s of %s needs %d bytes but data_offsets [%d,%d] span %d", t.Name, fmtShape(t.Shape), t.DType, size, t.Begin, t.End, t.End-t.Begin)
		}
		end, prev, last = t.End, t.Name, t
	}
	switch {
	case end > dataSize:
		return formatErr(Truncated, "tensor %q: data_offsets [%d,%d] extend past the end of the file (data section is %d bytes)", last.Name, last.Begin, last.End, dataSize)
	case end < dataSize && len(tensors) == 0:
		return formatErr(TrailingData, "header has no tensors but the data section is %d bytes", dataSize)
	case end < dataSize:
		return formatErr(TrailingData, "data section is %d bytes but the tensors end at %d: %d trailing bytes", dataSize, end, dataSize-end)
	}
	return nil
}

// checkStrictJSON checks what encoding/json lets through but the reference
// parser (serde_json) rejects: lone UTF-16 surrogates in \u escapes (Go
// silently turns them into U+FFFD), nesting deeper than its recursion limit,
// and numbers beyond the range of float64 (serde_json reads a number that is
// not a 64-bit integer as an f64 and refuses infinity). buf must be valid JSON.
func checkStrictJSON(buf []byte) error {
	depth := 0
	inString := false
	for i := 0; i < len(buf); i++ {
		c := buf[i]
		if !inString {
			switch c {
			case '-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9':
				j := i
				for j < len(buf) && strings.IndexByte("+-.0123456789eE", buf[j]) >= 0 {
					j++
				}
				if f, err := strconv.ParseFloat(string(buf[i:j]), 64); err != nil && math.IsInf(f, 0) {
					return formatErr(InvalidJSON, "header is not valid JSON: number %.40s is out of range (at byte %d)", buf[i:j], i)
				}
				i = j - 1
			case '"':
				inString = true
			case '{', '[':
				depth++
				if depth > maxDepth {
					return formatErr(InvalidJSON, "header JSON nests deeper than %d levels", maxDepth)
				}
			case '}', ']':
				depth--
			}
			continue
		}
		switch c {
		case '"':
			inString = false
		case '\\':
			i++
			if i >= len(buf) || buf[i] != 'u' {
				continue
			}
			r, ok := hex4(buf, i+1)
			if !ok {
				continue // cannot happen in valid JSON
			}
			i += 4
			switch {
			case r >= 0xDC00 && r <= 0xDFFF:
				return formatErr(InvalidJSON, "header is not valid JSON: lone trailing surrogate \\u%04X in a string (at byte %d)", r, i-5)
			case r >= 0xD800 && r <= 0xDBFF:
				if i+6 < len(buf) && buf[i+1] == '\\' && buf[i+2] == 'u' {
					if lo, ok := hex4(buf, i+3); ok && lo >= 0xDC00 && lo <= 0xDFFF {
						i += 6
						continue
					}
				}
				return formatErr(InvalidJSON, "header is not valid JSON: lone leading surrogate \\u%04X in a string (at byte %d)", r, i-5)
			}
		}
	}
	return nil
}

func hex4(b []byte, at int) (rune, bool) {
	if at+4 > len(b) {
		return 0, false
	}
	var r rune
	for _, c := range b[at : at+4] {
		switch {
		case c >= '0' && c <= '9':
			r = r<<4 | rune(c-'0')
		case c >= 'a' && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		case c >= 'A' && c <= 'F':
			r = r<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}
	return r, true
}

// walkHeader fills h from the JSON object buf, which is known to be valid
// JSON, seeing repeated keys that encoding/json would silently merge.
func walkHeader(buf []byte, h *Header) error {
	dec := json.NewDecoder(bytes.NewReader(buf))
	dec.UseNumber()
	if _, err := dec.Token(); err != nil { // '{'
		return formatErr(InvalidJSON, "header is not valid JSON: %v", err)
	}
	seen := make(map[string]int) // tensor name -> index in h.Tensors
	haveMetadata := false
	for dec.More() {
		key, err := nextString(dec)
		if err != nil {
			return err
		}
		if key == metadataKey {
			if haveMetadata {
				return formatErr(DuplicateField, "duplicate %q key", metadataKey)
			}
			haveMetadata = true
			if h.Metadata, err = readMetadata(dec); err != nil {
				return err
			}
			continue
		}
		t, err := readTensor(dec, key)
		if err != nil {
			return err
		}
		// Like the reference (a serde HashMap), a repeated tensor name
		// keeps the last entry; every entry must be valid.
		if i, dup := seen[key]; dup {
			h.Tensors[i] = t
			continue
		}
		seen[key] = len(h.Tensors)
		h.Tensors = append(h.Tensors, t)
	}
	return nil
}

func nextString(dec *json.Decoder) (string, error) {
	tok, err := dec.Token()
	if err != nil {
		return "", formatErr(InvalidJSON, "header is not valid JSON: %v", err)
	}
	s, ok := tok.(string)
	if !ok {
		return "", formatErr(InvalidJSON, "header is not valid JSON: expected a string, found %v", tok)
	}
	return s, nil
}

func readMetadata(dec *json.Decoder) (map[string]string, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, formatErr(InvalidJSON, "header is not valid JSON: %v", err)
	}
	if tok == nil {
		// The reference reads "__metadata__" as an optional map: null is
		// the same as absent.
		return nil, nil
	}
	if tok != json.Delim('{') {
		return nil, formatErr(BadMetadata, "%q is %s, not a JSON object", metadataKey, describe(tok))
	}
	md := make(map[string]string)
	for dec.More() {
		key, err := nextString(dec)
		if err != nil {
			return nil, err
		}
		// A repeated key keeps the last value, as in the reference.
		tok, err := dec.Token()
		if err != nil {
			return nil, formatErr(InvalidJSON, "header is not valid JSON: %v", err)
		}
		v, ok := tok.(string)
		if !ok {
			return nil, formatErr(BadMetadata, "metadata value for %q is not a string but %s", key, describe(tok))
		}
		md[key] = v
	}
	if _, err := dec.Token(); err != nil { // '}'
		return nil, formatErr(InvalidJSON, "header is not valid JSON: %v", err)
	}
	return md, nil
}

// describe names the kind of JSON value that starts with tok.
func describe(tok json.Token) string {
	switch v := tok.(type) {
	case json.Delim:
		if v == '{' {
			return "an object"
		}
		return "an array"
	case string:
		return "a string"
	case json.Number:
		return "a number"
	case bool:
		return "a boolean"
	case nil:
		return "null"
	}
	return fmt.Sprintf("%v", tok)
}

func readTensor(dec *json.Decoder, name string) (TensorInfo, error) {
	t := TensorInfo{Name: name}
	tok, err := dec.Token()
	if err != nil {
		return t, formatErr(InvalidJSON, "header is not valid JSON: %v", err)
	}
	if tok != json.Delim('{') {
		return t, formatErr(BadEntry, "tensor %q: entry is %s, not a JSON object", name, describe(tok))
	}
	var haveDType, haveShape, haveOffsets bool
	seen := make(map[string]struct{})
	for dec.More() {
		key, err := nextString(dec)
		if err != nil {
			return t, err
		}
		switch key {
		case "dtype", "shape", "data_offsets":
			// The reference refuses a repeated known field (serde's
			// duplicate_field) and ignores repeated unknown ones.
			if _, dup := seen[key]; dup {
				return t, formatErr(DuplicateField, "tensor %q: duplicate field %q", name, key)
			}
			seen[key] = struct{}{}
		}
		switch key {
		case "dtype":
			haveDType = true
			tok, err := dec.Token()
			if err != nil {
				return t, formatErr(InvalidJSON, "header is not valid JSON: %v", err)
			}
			s, ok := tok.(string)
			if !ok {
				return t, formatErr(BadDType, "tensor %q: dtype is %s, not a string", name, describe(tok))
			}
			t.DType = DType(s)
			if !t.DType.Valid() {
				return t, formatErr(BadDType, "tensor %q: unknown dtype %q", name, s)
			}
		case "shape":
			haveShape = true
			shape, problem := readInts(dec)
			if problem != "" {
				return t, formatErr(BadShape, "tensor %q: shape %s", name, problem)
			}
			t.Shape = shape
		case "data_offsets":
			haveOffsets = true
			offs, problem := readInts(dec)
			if problem != "" {
				return t, formatErr(BadOffsets, "tensor %q: data_offsets %s", name, problem)
			}
			if len(offs) != 2 {
				return t, formatErr(BadOffsets, "tensor %q: data_offsets has %d elements, not 2", name, len(offs))
			}
			t.Begin, t.End = offs[0], offs[1]
			if t.Begin > t.End {
				return t, formatErr(BadOffsets, "tensor %q: data_offsets [%d,%d] begin after end", name, t.Begin, t.End)
			}
		default:
			// The reference ignores unknown fields.
			var skip json.RawMessage
			if err := dec.Decode(&skip); err != nil {
				return t, formatErr(InvalidJSON, "header is not valid JSON: %v", err)
			}
		}
	}
	if _, err := dec.Token(); err != nil { // '}'
		return t, formatErr(InvalidJSON, "header is not valid JSON: %v", err)
	}
	switch {
	case !haveDType:
		return t, formatErr(BadDType, "tensor %q: missing field \"dtype\"", name)
	case !haveShape:
		return t, formatErr(BadShape, "tensor %q: missing field \"shape\"", name)
	case !haveOffsets:
		return t, formatErr(BadOffsets, "tensor %q: missing field \"data_offsets\"", name)
	}
	return t, nil
}

// readInts reads a JSON array of non-negative integers that fit in int64.
// On failure it returns a description of the problem.
func readInts(dec *json.Decoder) ([]int64, string) {
	tok, err := dec.Token()
	if err != nil {
		return nil, "is not valid JSON: " + err.Error()
	}
	if tok != json.Delim('[') {
		return nil, "is " + describe(tok) + ", not an array"
	}
	out := []int64{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, "is not valid JSON: " + err.Error()
		}
		num, ok := tok.(json.Number)
		if !ok {
			return nil, fmt.Sprintf("element %d is %s, not a non-negative integer", len(out), describe(tok))
		}
		s := string(num)
		if strings.ContainsAny(s, ".eE") {
			return nil, fmt.Sprintf("element %d is %s, not an integer", len(out), s)
		}
		if strings.HasPrefix(s, "-") {
			return nil, fmt.Sprintf("element %d is %s, a negative number", len(out), s)
		}
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil || v > math.MaxInt64 {
			return nil, fmt.Sprintf("element %d is %s, too large", len(out), s)
		}
		out = append(out, int64(v))
	}
	if _, err := dec.Token(); err != nil { // ']'
		return nil, "is not valid JSON: " + err.Error()
	}
	return out, ""
}
