package store

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"

	"github.com/weightfs/weightfs/store/codec"
	"github.com/weightfs/weightfs/store/safetensors"
)

// packedStream owns the codec stream of one file of a version in the
// compressed (or snapshot) tier (docs/ARCHITECTURE.md, "Tiers"). It is
// kept in one of three places:
//
//   - the daemon's heap, when the store has no state directory;
//   - a file in the state directory's images folder (named as host images
//     are), mapped read-only: a killed daemon leaves it for the next one
//     to adopt;
//   - a snapshot's data file (the snapshot tier), read through its
//     descriptor when the version is restored: the page cache holds it,
//     not the daemon.
//
// Its one owner is the File that holds it; close frees it exactly once
// (unmaps, closes, and deletes a state directory's file).
type packedStream struct {
	mu    sync.Mutex
	mem   []byte   // the stream on the heap or mapped; nil for a snapshot's
	file  *os.File // the mapped or snapshot file; nil on the heap
	size  int64    // the stream's length
	image string   // its name in the state directory's images folder ("": none)
	// snapshot is the data file's name in its version's snapshot folder
	// ("": not in the snapshot tier).
	snapshot string
	arena    *Arena // whose live count a state file is in (nil: none)
	cost     int64  // what it added to arena.live
	closed   bool
}

// heapPacked keeps stream (not copied) in the daemon's heap.
func heapPacked(stream []byte) *packedStream {
	return &packedStream{mem: stream, size: int64(len(stream))}
}

// Bytes is the stream in memory (nil in the snapshot tier, or once closed).
func (p *packedStream) Bytes() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.mem
}

// Size is the stream's length.
func (p *packedStream) Size() int64 { return p.size }

// resident: the stream takes the daemon's (or the state directory's
// tmpfs's) memory, charged to the host budget. A snapshot's is in the page
// cache, which the kernel reclaims.
func (p *packedStream) resident() bool { return p.snapshot == "" }

// decode decodes the stream into dst (its raw length) on every core.
func (p *packedStream) decode(ctx context.Context, c *codec.Codec, dst []byte) error {
	p.mu.Lock()
	defer p.mu.Unlock() // close waits: nothing is unmapped under a decode
	switch {
	case p.closed:
		return fmt.Errorf("decode: the stream was freed")
	case p.mem != nil || p.file == nil:
		return c.DecodeParallel(ctx, dst, p.mem, runtime.GOMAXPROCS(0))
	}
	r := io.NewSectionReader(p.file, 0, p.size)
	if err := c.DecodeReader(ctx, dst, r, p.size, runtime.GOMAXPROCS(0)); err != nil {
		return fmt.Errorf("decode %s: %w", p.file.Name(), err)
	}
	return nil
}

// close frees the stream; later calls do nothing.
func (p *packedStream) close() error {
	if p == nil {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	return p.release()
}

// header parses the safetensors header of the weights file of raw bytes
// that the stream holds, reading and decoding only the blocks that hold it.
func (p *packedStream) header(raw int64) (*safetensors.Header, error) {
	c := codec.New(codec.Options{NoZstd: true})
	defer c.Close()
	var r io.ReaderAt = p.file
	if p.mem != nil || p.file == nil {
		r = bytes.NewReader(p.mem)
	}
	return safetensors.ReadHeader(prefixReader{c: c, r: r, size: p.size}, raw)
}

// prefixReader reads a stream's raw bytes by decoding its prefix up to the
// end of each read: for a header's few reads at its start.
type prefixReader struct {
	c    *codec.Codec
	r    io.ReaderAt
	size int64
}

func (pr prefixReader) ReadAt(b []byte, off int64) (int, error) {
	prefix := make([]byte, off+int64(len(b)))
	if err := pr.c.DecodePrefixAt(prefix, pr.r, pr.size); err != nil {
		return 0, err
	}
	return copy(b, prefix[off:]), nil
}
