// Package codectest makes deterministic, trained-like weights for the
// codec's tests and benchmarks: not uniform random bytes, but values drawn
// as real checkpoints hold them, so that compression ratios mean something.
package codectest

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
)

// Kind is the kind of tensor to imitate.
type Kind int

const (
	// Linear: a linear layer's weight, normal with std 0.02 times a
	// per-row scale drawn uniformly from [0.5, 2].
	Linear Kind = iota
	// Embedding: rows of a token embedding, normal with a per-row std
	// spread over [0.005, 0.05] and a few outlier dimensions.
	Embedding
	// LayerNorm: a norm's weight, values near 1.0 (1 + N(0, 0.05)).
	LayerNorm
)

// ElemSize returns the element size in bytes of the dtypes Tensor makes
// (BF16, F16, F32), or 0 for another dtype.
func ElemSize(dtype string) int {
	switch dtype {
	case "BF16", "F16":
		return 2
	case "F32":
		return 4
	}
	return 0
}

// Tensor returns rows*cols elements of the kind in dtype (BF16, F16 or
// F32), little-endian, from seed.
func Tensor(kind Kind, dtype string, rows, cols int, seed uint64) ([]byte, error) {
	es := ElemSize(dtype)
	if es == 0 {
		return nil, fmt.Errorf("codectest: dtype %q: want BF16, F16 or F32", dtype)
	}
	r := rand.New(rand.NewPCG(seed, uint64(kind)<<32|uint64(es)))
	out := make([]byte, rows*cols*es)
	put := putter(dtype)
	outliers := map[int]float64{}
	if kind == Embedding {
		for range max(cols/256, 1) {
			outliers[r.IntN(cols)] = 4 + 4*r.Float64()
		}
	}
	i := 0
	for range rows {
		var std, mean float64
		switch kind {
		case Linear:
			std = 0.02 * (0.5 + 1.5*r.Float64())
		case Embedding:
			std = 0.005 + 0.045*r.Float64()
		case LayerNorm:
			std, mean = 0.05, 1
		}
		for c := range cols {
			v := mean + std*r.NormFloat64()
			if m, ok := outliers[c]; ok {
				v *= m
			}
			put(out[i:], float32(v))
			i += es
		}
	}
	return out, nil
}

// Model returns size bytes (rounded down to whole elements) of a
// checkpoint-like mix in dtype: mostly linear layers (rows of 4096), one
// embedding of an eighth of the size, and a layer norm per layer.
func Model(dtype string, size int, seed uint64) ([]byte, error) {
	es := ElemSize(dtype)
	if es == 0 {
		return nil, fmt.Errorf("codectest: dtype %q: want BF16, F16 or F32", dtype)
	}
	const cols = 4096
	row := cols * es
	out := make([]byte, 0, size)
	add := func(kind Kind, rows int) error {
		if rows <= 0 {
			return nil
		}
		t, err := Tensor(kind, dtype, rows, cols, seed)
		seed++
		out = append(out, t...)
		return err
	}
	if err := add(Embedding, size/8/row); err != nil {
		return nil, err
	}
	for len(out)+row <= size {
		rows := min(1024, (size-len(out))/row-1)
		if err := add(Linear, rows); err != nil {
			return nil, err
		}
		if err := add(LayerNorm, 1); err != nil {
			return nil, err
		}
	}
	if tail := (size - len(out)) / es; tail > 0 {
		t, err := Tensor(Linear, dtype, 1, tail, seed)
		if err != nil {
			return nil, err
		}
		out = append(out, t...)
	}
	return out, nil
}

func putter(dtype string) func([]byte, float32) {
	switch dtype {
	case "BF16":
		return func(b []byte, f float32) { binary.LittleEndian.PutUint16(b, BF16(f)) }
	case "F16":
		return func(b []byte, f float32) { binary.LittleEndian.PutUint16(b, F16(f)) }
	}
	return func(b []byte, f float32) { binary.LittleEndian.PutUint32(b, math.Float32bits(f)) }
}

// BF16 rounds f to bfloat16 (to nearest, ties to even).
func BF16(f float32) uint16 {
	b := math.Float32bits(f)
	if f != f { // NaN: keep it a NaN
		return uint16(b>>16) | 0x40
	}
	b += 0x7FFF + (b>>16)&1
	return uint16(b >> 16)
}

// F16 rounds f to IEEE half precision (to nearest, ties to even), with
// subnormals, infinities and NaN.
func F16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int(b>>23&0xFF) - 127 + 15
	mant := b & 0x7FFFFF
	switch {
	case b&0x7FFFFFFF > 0x7F800000: // NaN
		return sign | 0x7E00
	case exp >= 0x1F: // overflow or infinity
		return sign | 0x7C00
	case exp <= 0: // subnormal or zero in half precision
		if exp < -10 {
			return sign
		}
		mant |= 0x800000
		shift := uint(14 - exp)
		h := mant >> shift
		rem := mant & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && h&1 == 1) {
			h++
		}
		return sign | uint16(h)
	}
	h := uint32(exp)<<10 | mant>>13
	rem := mant & 0x1FFF
	if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++ // may carry into the exponent, up to infinity: right
	}
	return sign | uint16(h)
}
