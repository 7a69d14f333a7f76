package codec

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// The stream format, version 1. docs/CODEC.md describes it; this file is
// the code that writes and reads its headers. All integers are little-endian.
const (
	// Magic opens every stream.
	Magic = "WFSC"
	// Version is the format version this package writes and reads.
	Version = 1

	streamHeaderSize = 28
	blockHeaderSize  = 20
	chunkHeaderSize  = 4

	// MaxBlockSize bounds the raw length of one block, so that a decoder
	// never allocates more than this per worker whatever the input says.
	MaxBlockSize = 16 << 20
	// MinBlockSize is the smallest block size Options accepts.
	MinBlockSize = 64 << 10
	// DefaultBlockSize is the block size when Options leaves it zero.
	DefaultBlockSize = 1 << 20
	// ChunkSize is the most bytes of one plane that one huff0 chunk codes
	// (huff0 codes at most 256 KiB - 1 at a time).
	ChunkSize = 128 << 10
)

// Block methods.
const (
	methodRaw    = 0
	methodPlanes = 1
	methodZstd   = 2
)

// Chunk kinds inside a planes payload.
const (
	chunkRaw  = 0
	chunkRLE  = 1
	chunkHuff = 2
)

// Block flags.
const (
	// flagRotate: each element was rotated left by one bit (sign bit to
	// bit 0) before the split, which puts a BF16 or F32 exponent wholly in
	// the top byte.
	flagRotate = 1
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func checksum(b []byte) uint32 { return crc32.Checksum(b, castagnoli) }

// ErrCorrupt is matched (errors.Is) by every error about a malformed,
// truncated or corrupted stream.
var ErrCorrupt = errors.New("codec: corrupt stream")

// CorruptError says what is wrong with a stream and where.
type CorruptError struct {
	// Block is the index of the block at fault, -1 for the stream header.
	Block int
	// Offset is the byte of the stream where the problem was found.
	Offset int64
	// Problem describes it, e.g. "checksum mismatch".
	Problem string
	// Err is the underlying cause, if any (a huff0 or zstd error).
	Err error
	// Truncated is set when the stream ends early, at Offset.
	Truncated bool
}

func (e *CorruptError) Error() string {
	msg := e.Problem
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	where := "codec: "
	if e.Block >= 0 {
		where = fmt.Sprintf("codec: block %d: ", e.Block)
	}
	if e.Truncated {
		return fmt.Sprintf("%struncated stream at byte %d: %s", where, e.Offset, msg)
	}
	return fmt.Sprintf("%s%s (stream byte %d)", where, msg, e.Offset)
}

func (e *CorruptError) Is(target error) bool { return target == ErrCorrupt }
func (e *CorruptError) Unwrap() error        { return e.Err }

func truncated(block int, off int64, format string, args ...any) *CorruptError {
	return &CorruptError{Block: block, Offset: off, Problem: fmt.Sprintf(format, args...), Truncated: true}
}

func corrupt(block int, off int64, format string, args ...any) *CorruptError {
	return &CorruptError{Block: block, Offset: off, Problem: fmt.Sprintf(format, args...)}
}

// dtypes maps the safetensors spelling of a dtype to its code in the
// format; code 0 is "bytes" (unknown dtype, or a stream of several).
// The codes are part of the format: append, never renumber.
var dtypes = []string{
	"", "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64",
	"F16", "BF16", "F32", "F64", "C64", "F8_E4M3", "F8_E5M2", "F8_E8M0",
	"F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4", "F6_E2M3", "F6_E3M2",
}

// layout is how a dtype's blocks are split into byte planes.
type layout struct {
	code   byte
	planes int  // element size in bytes: one plane per byte; 0: no split
	rotate bool // rotate each element left by one bit before the split
}

func layoutOf(dtype string) layout {
	for i, d := range dtypes {
		if d == dtype {
			return layout{code: byte(i), planes: planesOf(dtype), rotate: dtype == "BF16" || dtype == "F32" || dtype == "C64"}
		}
	}
	return layout{}
}

func planesOf(dtype string) int {
	switch dtype {
	case "BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4", "F6_E2M3", "F6_E3M2":
		return 1
	case "I16", "U16", "F16", "BF16":
		return 2
	case "I32", "U32", "F32", "C64": // C64: two F32, split as F32
		return 4
	case "I64", "U64", "F64":
		return 8
	}
	return 0
}

// DTypeName returns the safetensors spelling of a dtype code ("" for
// bytes), and false for a code the format does not define.
func DTypeName(code byte) (string, bool) {
	if int(code) >= len(dtypes) {
		return "", false
	}
	return dtypes[code], true
}

type streamHeader struct {
	dtype     byte
	blockSize uint32
	blocks    uint32
	rawLen    uint64
}

func (h streamHeader) append(dst []byte) []byte {
	var b [streamHeaderSize]byte
	copy(b[:4], Magic)
	b[4] = Version
	b[5] = h.dtype
	binary.LittleEndian.PutUint32(b[8:], h.blockSize)
	binary.LittleEndian.PutUint32(b[12:], h.blocks)
	binary.LittleEndian.PutUint64(b[16:], h.rawLen)
	binary.LittleEndian.PutUint32(b[24:], checksum(b[:24]))
	return append(dst, b[:]...)
}

func parseStreamHeader(src []byte) (streamHeader, error) {
	return parseStreamHeaderOf(src, int64(len(src)))
}

// parseStreamHeaderOf parses the header at the start of src, of a stream of
// size bytes.
func parseStreamHeaderOf(src []byte, size int64) (streamHeader, error) {
	var h streamHeader
	if len(src) < streamHeaderSize || size < streamHeaderSize {
		return h, truncated(-1, min(int64(len(src)), size), "the stream header is %d bytes", streamHeaderSize)
	}
	if string(src[:4]) != Magic {
		return h, corrupt(-1, 0, "bad magic %q, want %q", src[:4], Magic)
	}
	if got, want := binary.LittleEndian.Uint32(src[24:]), checksum(src[:24]); got != want {
		return h, corrupt(-1, 24, "stream header checksum mismatch")
	}
	if src[4] != Version {
		return h, corrupt(-1, 4, "unsupported version %d, want %d", src[4], Version)
	}
	h.dtype = src[5]
	if _, ok := DTypeName(h.dtype); !ok {
		return h, corrupt(-1, 5, "unknown dtype code %d", h.dtype)
	}
	h.blockSize = binary.LittleEndian.Uint32(src[8:])
	h.blocks = binary.LittleEndian.Uint32(src[12:])
	h.rawLen = binary.LittleEndian.Uint64(src[16:])
	if h.rawLen > uint64(h.blocks)*MaxBlockSize {
		return h, corrupt(-1, 16, "raw length %d does not fit %d blocks", h.rawLen, h.blocks)
	}
	// Every block takes at least a header, so the count cannot exceed what
	// the stream can hold: this bounds what a decoder allocates for it.
	if uint64(h.blocks) > uint64(size-streamHeaderSize)/blockHeaderSize {
		return h, truncated(-1, size, "%d blocks announced, room for at most %d", h.blocks, (size-streamHeaderSize)/blockHeaderSize)
	}
	return h, nil
}

type blockHeader struct {
	method   byte
	dtype    byte
	elemSize byte
	flags    byte
	rawLen   uint32
	encLen   uint32
	sum      uint32
}

func (h blockHeader) append(dst []byte) []byte {
	var b [blockHeaderSize]byte
	b[0], b[1], b[2], b[3] = h.method, h.dtype, h.elemSize, h.flags
	binary.LittleEndian.PutUint32(b[4:], h.rawLen)
	binary.LittleEndian.PutUint32(b[8:], h.encLen)
	binary.LittleEndian.PutUint32(b[12:], h.sum)
	binary.LittleEndian.PutUint32(b[16:], checksum(b[:16]))
	return append(dst, b[:]...)
}

func parseBlockHeader(src []byte, i int, off int64) (blockHeader, error) {
	var h blockHeader
	if len(src) < blockHeaderSize {
		return h, truncated(i, off+int64(len(src)), "in the block header")
	}
	if got, want := binary.LittleEndian.Uint32(src[16:]), checksum(src[:16]); got != want {
		return h, corrupt(i, off, "block header checksum mismatch")
	}
	h.method, h.dtype, h.elemSize, h.flags = src[0], src[1], src[2], src[3]
	h.rawLen = binary.LittleEndian.Uint32(src[4:])
	h.encLen = binary.LittleEndian.Uint32(src[8:])
	h.sum = binary.LittleEndian.Uint32(src[12:])
	if _, ok := DTypeName(h.dtype); !ok {
		return h, corrupt(i, off+1, "unknown dtype code %d", h.dtype)
	}
	if h.rawLen > MaxBlockSize {
		return h, corrupt(i, off+4, "raw length %d over the limit %d", h.rawLen, MaxBlockSize)
	}
	switch h.method {
	case methodRaw:
		if h.encLen != h.rawLen {
			return h, corrupt(i, off+8, "raw block of %d bytes stores %d", h.rawLen, h.encLen)
		}
	case methodPlanes:
		if p := h.elemSize; p != 1 && p != 2 && p != 4 && p != 8 {
			return h, corrupt(i, off+2, "element size %d cannot be split into planes", p)
		}
		if h.flags&^flagRotate != 0 || (h.flags&flagRotate != 0 && h.elemSize != 2 && h.elemSize != 4) {
			return h, corrupt(i, off+3, "bad flags %#x for element size %d", h.flags, h.elemSize)
		}
	case methodZstd:
	default:
		return h, corrupt(i, off, "unknown method %d", h.method)
	}
	return h, nil
}

// blockAt parses the header of block i, at stream offset off (src holds
// its bytes), of a stream of size bytes, and returns it with the offset of
// its payload, checked to lie inside the stream.
func blockAt(src []byte, i int, off, size int64) (blockHeader, int64, error) {
	bh, err := parseBlockHeader(src, i, off)
	if err != nil {
		return bh, 0, err
	}
	start := off + blockHeaderSize
	if int64(bh.encLen) > size-start {
		return bh, 0, truncated(i, size, "payload of %d bytes from byte %d", bh.encLen, start)
	}
	return bh, start, nil
}

// block is one block found by scanning a stream.
type block struct {
	blockHeader
	index   int
	off     int64 // stream offset of the block header
	payload []byte
	rawOff  int64 // where its raw bytes go
}

// scan validates the stream header and every block header, and returns the
// blocks in order with their payloads and raw offsets.
func scan(src []byte) (streamHeader, []block, error) {
	h, err := parseStreamHeader(src)
	if err != nil {
		return h, nil, err
	}
	blocks := make([]block, 0, h.blocks)
	off := int64(streamHeaderSize)
	var raw int64
	for i := 0; i < int(h.blocks); i++ {
		bh, start, err := blockAt(src[off:], i, off, int64(len(src)))
		if err != nil {
			return h, nil, err
		}
		blocks = append(blocks, block{blockHeader: bh, index: i, off: off, payload: src[start : start+int64(bh.encLen)], rawOff: raw})
		raw += int64(bh.rawLen)
		off = start + int64(bh.encLen)
	}
	if uint64(raw) != h.rawLen {
		return h, nil, corrupt(-1, off, "blocks hold %d raw bytes, the header says %d", raw, h.rawLen)
	}
	if off != int64(len(src)) {
		return h, nil, corrupt(-1, off, "%d trailing bytes after the last block", int64(len(src))-off)
	}
	return h, blocks, nil
}

// BlockInfo describes one block of a stream.
type BlockInfo struct {
	Index      int
	RawOffset  int64  // where its bytes start in the decoded buffer
	RawLen     int    // its decoded length
	EncodedLen int    // its payload's length, header excluded
	Method     string // "raw", "planes" or "zstd"
	DType      string // safetensors spelling, "" for bytes
}

// Info validates the headers of the stream src (not the payloads) and
// describes its blocks.
func Info(src []byte) ([]BlockInfo, error) {
	_, blocks, err := scan(src)
	if err != nil {
		return nil, err
	}
	infos := make([]BlockInfo, len(blocks))
	for i, b := range blocks {
		dt, _ := DTypeName(b.dtype)
		infos[i] = BlockInfo{Index: i, RawOffset: b.rawOff, RawLen: int(b.rawLen), EncodedLen: int(b.encLen),
			Method: [...]string{"raw", "planes", "zstd"}[b.method], DType: dt}
	}
	return infos, nil
}
