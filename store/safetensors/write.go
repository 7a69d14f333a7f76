package safetensors

import (
	"cmp"
	"encoding/binary"
	"fmt"
	"io"
	"slices"
	"strconv"
	"unicode/utf8"
)

// DataAlign is the boundary the writer starts the data section on.
const DataAlign = 4096

// Tensor is a tensor to write: its name, dtype, shape and raw little-endian
// data of exactly Elements*Bits/8 bytes.
type Tensor struct {
	Name  string
	DType DType
	Shape []int64
	Data  []byte
}

// Write writes a complete safetensors file: the header EncodeHeader makes,
// then each tensor's data in the header's order. Tensors are sorted by dtype
// alignment (largest first), then by name, so every tensor is naturally
// aligned in the file; the data section starts on a 4096-byte boundary.
// metadata may be nil (no "__metadata__" key).
func Write(w io.Writer, tensors []Tensor, metadata map[string]string) error {
	infos := make([]TensorInfo, len(tensors))
	data := make(map[string][]byte, len(tensors))
	for i, t := range tensors {
		infos[i] = TensorInfo{Name: t.Name, DType: t.DType, Shape: t.Shape}
		data[t.Name] = t.Data
	}
	prefix, placed, err := EncodeHeader(infos, metadata)
	if err != nil {
		return err
	}
	for _, t := range tensors {
		if want, _, _ := byteSize(t.DType, t.Shape); int64(len(t.Data)) != want {
			return fmt.Errorf("safetensors: tensor %q: shape %s of %s needs %d bytes, data has %d", t.Name, fmtShape(t.Shape), t.DType, want, len(t.Data))
		}
	}
	if _, err := w.Write(prefix); err != nil {
		return err
	}
	for _, p := range placed {
		if _, err := w.Write(data[p.Name]); err != nil {
			return err
		}
	}
	return nil
}

// EncodeHeader returns the 8-byte length prefix followed by the JSON header,
// padded with spaces so that the data section starts at a multiple of 4096,
// and the tensors in file order with their offsets set. The Begin and End of
// the given tensors are ignored; their sizes follow from dtype and shape.
// A caller that writes the data itself writes tensor placed[i]'s bytes at
// file offset len(prefix)+placed[i].Begin.
func EncodeHeader(tensors []TensorInfo, metadata map[string]string) (prefix []byte, placed []TensorInfo, err error) {
	placed = make([]TensorInfo, len(tensors))
	sizes := make(map[string]int64, len(tensors))
	for i, t := range tensors {
		if err := checkString("tensor name", t.Name); err != nil {
			return nil, nil, err
		}
		if t.Name == metadataKey {
			return nil, nil, fmt.Errorf("safetensors: %q cannot be a tensor name", metadataKey)
		}
		if _, dup := sizes[t.Name]; dup {
			return nil, nil, fmt.Errorf("safetensors: duplicate tensor name %q", t.Name)
		}
		size, _, problem := byteSize(t.DType, t.Shape)
		if problem != "" {
			return nil, nil, fmt.Errorf("safetensors: tensor %q: %s", t.Name, problem)
		}
		sizes[t.Name] = size
		placed[i] = TensorInfo{Name: t.Name, DType: t.DType, Shape: slices.Clone(t.Shape)}
		if placed[i].Shape == nil {
			placed[i].Shape = []int64{}
		}
	}
	for k, v := range metadata {
		if err := checkString("metadata key", k); err != nil {
			return nil, nil, err
		}
		if err := checkString("metadata value", v); err != nil {
			return nil, nil, err
		}
	}
	slices.SortFunc(placed, func(a, b TensorInfo) int {
		if c := cmp.Compare(b.DType.Alignment(), a.DType.Alignment()); c != 0 {
			return c
		}
		return cmp.Compare(a.Name, b.Name)
	})
	var off int64
	for i := range placed {
		size := sizes[placed[i].Name]
		if off > (1<<62)-size {
			return nil, nil, fmt.Errorf("safetensors: data section too large")
		}
		placed[i].Begin, placed[i].End = off, off+size
		off += size
	}

	buf := make([]byte, 8, 8+64*len(placed)+64)
	buf = append(buf, '{')
	first := true
	if metadata != nil {
		buf = appendString(buf, metadataKey)
		buf = append(buf, ':', '{')
		keys := make([]string, 0, len(metadata))
		for k := range metadata {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for i, k := range keys {
			if i > 0 {
				buf = append(buf, ',')
			}
			buf = appendString(buf, k)
			buf = append(buf, ':')
			buf = appendString(buf, metadata[k])
		}
		buf = append(buf, '}')
		first = false
	}
	for _, t := range placed {
		if !first {
			buf = append(buf, ',')
		}
		first = false
		buf = appendString(buf, t.Name)
		buf = append(buf, `:{"dtype":`...)
		buf = appendString(buf, string(t.DType))
		buf = append(buf, `,"shape":[`...)
		for i, d := range t.Shape {
			if i > 0 {
				buf = append(buf, ',')
			}
			buf = strconv.AppendInt(buf, d, 10)
		}
		buf = append(buf, `],"data_offsets":[`...)
		buf = strconv.AppendInt(buf, t.Begin, 10)
		buf = append(buf, ',')
		buf = strconv.AppendInt(buf, t.End, 10)
		buf = append(buf, ']', '}')
	}
	buf = append(buf, '}')
	for len(buf)%DataAlign != 0 {
		buf = append(buf, ' ')
	}
	n := len(buf) - 8
	if n > MaxHeaderSize {
		return nil, nil, fmt.Errorf("safetensors: header of %d bytes exceeds the maximum of %d", n, MaxHeaderSize)
	}
	binary.LittleEndian.PutUint64(buf[:8], uint64(n))
	return buf, placed, nil
}

func checkString(what, s string) error {
	if !utf8.ValidString(s) {
		return fmt.Errorf("safetensors: %s %q is not valid UTF-8", what, s)
	}
	return nil
}

// appendString appends s, valid UTF-8, as a JSON string. Only '"', '\\' and
// control characters are escaped.
func appendString(buf []byte, s string) []byte {
	const hex = "0123456789abcdef"
	buf = append(buf, '"')
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"' || c == '\\':
			buf = append(buf, '\\', c)
		case c == '\n':
			buf = append(buf, '\\', 'n')
		case c == '\r':
			buf = append(buf, '\\', 'r')
		case c == '\t':
			buf = append(buf, '\\', 't')
		case c < 0x20:
			buf = append(buf, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		default:
			buf = append(buf, c)
		}
	}
	return append(buf, '"')
}

// ByteSize returns the size in bytes of a tensor of dtype dt and shape
// shape, checked as the parser checks a header entry: an unknown dtype
// (BadDType), a negative dimension or an element or bit count that overflows
// 64 bits (BadShape), or a size that is not a whole number of bytes
// (SizeMismatch) is a *FormatError of that Class.
func ByteSize(dt DType, shape []int64) (int64, error) {
	for _, d := range shape {
		if d < 0 {
			return 0, formatErr(BadShape, "shape %s has a negative dimension", fmtShape(shape))
		}
	}
	size, class, problem := byteSize(dt, shape)
	if problem != "" {
		return 0, formatErr(class, "%s", problem)
	}
	return size, nil
}
