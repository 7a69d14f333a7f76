package codec

import "encoding/binary"

// split writes the n = len(src)/k whole elements of src as k byte planes
// into planes[:n*k]: plane j (planes[j*n:(j+1)*n]) holds byte j of every
// element, after rotating each element left by one bit when rotate is set.
// The len(src)%k tail bytes are not touched.
func split(planes, src []byte, k int, rotate bool) {
	n := len(src) / k
	switch {
	case k == 2:
		split2(planes[:n], planes[n:2*n], src[:2*n], rotate)
	case k == 4:
		split4(planes[:n], planes[n:2*n], planes[2*n:3*n], planes[3*n:4*n], src[:4*n], rotate)
	default:
		for i := 0; i < n; i++ {
			for j := 0; j < k; j++ {
				planes[j*n+i] = src[i*k+j]
			}
		}
	}
}

// merge is the inverse of split: it interleaves the k planes of n elements
// back into dst[:n*k].
func merge(dst, planes []byte, n, k int, rotate bool) {
	switch {
	case k == 2:
		merge2(dst[:2*n], planes[:n], planes[n:2*n], rotate)
	case k == 4:
		merge4(dst[:4*n], planes[:n], planes[n:2*n], planes[2*n:3*n], planes[3*n:4*n], rotate)
	default:
		for i := 0; i < n; i++ {
			for j := 0; j < k; j++ {
				dst[i*k+j] = planes[j*n+i]
			}
		}
	}
}

// Bit tricks on 64-bit words: four 16-bit or two 32-bit lanes at a time.

func rotl16(x uint64) uint64 { return x<<1&0xFFFEFFFEFFFEFFFE | x>>15&0x0001000100010001 }
func rotr16(x uint64) uint64 { return x>>1&0x7FFF7FFF7FFF7FFF | x<<15&0x8000800080008000 }
func rotl32(x uint64) uint64 { return x<<1&0xFFFFFFFEFFFFFFFE | x>>31&0x0000000100000001 }
func rotr32(x uint64) uint64 { return x>>1&0x7FFFFFFF7FFFFFFF | x<<31&0x8000000080000000 }

// spread2 puts the 4 bytes of a at bytes 0, 2, 4, 6; compact2 undoes it.
func spread2(a uint32) uint64 {
	x := uint64(a)
	x = (x | x<<16) & 0x0000FFFF0000FFFF
	return (x | x<<8) & 0x00FF00FF00FF00FF
}

func compact2(x uint64) uint32 {
	x &= 0x00FF00FF00FF00FF
	x = (x | x>>8) & 0x0000FFFF0000FFFF
	return uint32(x | x>>16)
}

// spread4 puts the 2 bytes of a at bytes 0 and 4; compact4 undoes it.
func spread4(a uint16) uint64 {
	x := uint64(a)
	return (x | x<<24) & 0x000000FF000000FF
}

func compact4(x uint64) uint16 {
	x &= 0x000000FF000000FF
	return uint16(x | x>>24)
}

func split2(p0, p1, src []byte, rotate bool) {
	n := len(p0)
	i := 0
	le := binary.LittleEndian
	for ; i+4 <= n; i += 4 {
		w := le.Uint64(src[2*i:])
		if rotate {
			w = rotl16(w)
		}
		le.PutUint32(p0[i:], compact2(w))
		le.PutUint32(p1[i:], compact2(w>>8))
	}
	for ; i < n; i++ {
		v := uint16(src[2*i]) | uint16(src[2*i+1])<<8
		if rotate {
			v = v<<1 | v>>15
		}
		p0[i], p1[i] = byte(v), byte(v>>8)
	}
}

func merge2(dst, p0, p1 []byte, rotate bool) {
	n := len(p0)
	i := 0
	le := binary.LittleEndian
	for ; i+4 <= n; i += 4 {
		w := spread2(le.Uint32(p0[i:])) | spread2(le.Uint32(p1[i:]))<<8
		if rotate {
			w = rotr16(w)
		}
		le.PutUint64(dst[2*i:], w)
	}
	for ; i < n; i++ {
		v := uint16(p0[i]) | uint16(p1[i])<<8
		if rotate {
			v = v>>1 | v<<15
		}
		dst[2*i], dst[2*i+1] = byte(v), byte(v>>8)
	}
}

func split4(p0, p1, p2, p3, src []byte, rotate bool) {
	n := len(p0)
	i := 0
	le := binary.LittleEndian
	for ; i+2 <= n; i += 2 {
		w := le.Uint64(src[4*i:])
		if rotate {
			w = rotl32(w)
		}
		le.PutUint16(p0[i:], compact4(w))
		le.PutUint16(p1[i:], compact4(w>>8))
		le.PutUint16(p2[i:], compact4(w>>16))
		le.PutUint16(p3[i:], compact4(w>>24))
	}
	for ; i < n; i++ {
		v := le.Uint32(src[4*i:])
		if rotate {
			v = v<<1 | v>>31
		}
		p0[i], p1[i], p2[i], p3[i] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
	}
}

func merge4(dst, p0, p1, p2, p3 []byte, rotate bool) {
	n := len(p0)
	i := 0
	le := binary.LittleEndian
	for ; i+2 <= n; i += 2 {
		w := spread4(le.Uint16(p0[i:])) | spread4(le.Uint16(p1[i:]))<<8 |
			spread4(le.Uint16(p2[i:]))<<16 | spread4(le.Uint16(p3[i:]))<<24
		if rotate {
			w = rotr32(w)
		}
		le.PutUint64(dst[4*i:], w)
	}
	for ; i < n; i++ {
		v := uint32(p0[i]) | uint32(p1[i])<<8 | uint32(p2[i])<<16 | uint32(p3[i])<<24
		if rotate {
			v = v>>1 | v<<31
		}
		le.PutUint32(dst[4*i:], v)
	}
}
