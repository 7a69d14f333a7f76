// Package safetensors reads and writes the safetensors format
// (https://github.com/huggingface/safetensors) strictly: a file is accepted
// only when the reference Rust parser would accept it, and files are written
// with a generated header that aligns every tensor naturally and starts the
// data section on a 4096-byte boundary.
//
// A safetensors file is an 8-byte little-endian length n, then n bytes of
// JSON header, then the data section. The header maps tensor names to
// {"dtype", "shape", "data_offsets"}; offsets are relative to the start of
// the data section. The optional key "__metadata__" holds a string-to-string
// map.
package safetensors

// DType is the element type of a tensor, spelled as in the header's "dtype".
type DType string

// The dtypes the format knows.
const (
	BOOL        DType = "BOOL"
	U8          DType = "U8"
	I8          DType = "I8"
	I16         DType = "I16"
	U16         DType = "U16"
	I32         DType = "I32"
	U32         DType = "U32"
	I64         DType = "I64"
	U64         DType = "U64"
	F16         DType = "F16"
	BF16        DType = "BF16"
	F32         DType = "F32"
	F64         DType = "F64"
	C64         DType = "C64"
	F8_E4M3     DType = "F8_E4M3"
	F8_E5M2     DType = "F8_E5M2"
	F8_E8M0     DType = "F8_E8M0"
	F8_E4M3FNUZ DType = "F8_E4M3FNUZ"
	F8_E5M2FNUZ DType = "F8_E5M2FNUZ"
	F4          DType = "F4"
	F6_E2M3     DType = "F6_E2M3"
	F6_E3M2     DType = "F6_E3M2"
)

// DTypes lists every known dtype.
var DTypes = []DType{
	BOOL, U8, I8, I16, U16, I32, U32, I64, U64, F16, BF16, F32, F64, C64,
	F8_E4M3, F8_E5M2, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, F4, F6_E2M3, F6_E3M2,
}

// Bits returns the size of one element in bits, or 0 for an unknown dtype.
func (d DType) Bits() int {
	switch d {
	case BOOL, U8, I8, F8_E4M3, F8_E5M2, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ:
		return 8
	case I16, U16, F16, BF16:
		return 16
	case I32, U32, F32:
		return 32
	case I64, U64, F64, C64:
		return 64
	case F4:
		return 4
	case F6_E2M3, F6_E3M2:
		return 6
	}
	return 0
}

// Valid reports whether d is a known dtype.
func (d DType) Valid() bool { return d.Bits() > 0 }

// Alignment returns the natural alignment of an element in bytes:
// max(1, Bits/8). C64 (two float32) is aligned to 8; sub-byte dtypes to 1.
// It is 0 for an unknown dtype.
func (d DType) Alignment() int {
	b := d.Bits()
	switch {
	case b == 0:
		return 0
	case b < 8:
		return 1
	}
	return b / 8
}
