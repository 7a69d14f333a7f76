package cuda

import (
	"errors"
	"fmt"
)

// DefaultChunk is the copy size Upload uses when given 0.
const DefaultChunk = 64 << 20

// Slab is one cuMemAlloc_v2 allocation meant for export by IPC handle.
type Slab struct {
	ctx  *Context
	Ptr  DevicePtr
	Size uint64
}

// NewSlab allocates size bytes (at least 1) on c's device.
func (c *Context) NewSlab(size uint64) (*Slab, error) {
	p, err := c.Alloc(max(size, 1))
	if err != nil {
		return nil, fmt.Errorf("slab of %d bytes on %s: %w", size, c.dev.UUID, err)
	}
	return &Slab{ctx: c, Ptr: p, Size: size}, nil
}

// Context is the context the slab was allocated in.
func (s *Slab) Context() *Context { return s.ctx }

// Upload enqueues src to the slab at byte offset off, in chunks of chunk
// bytes (0: DefaultChunk) spread round-robin over streams. It does not
// synchronize: call Synchronize on every stream before reading or exporting.
func (s *Slab) Upload(off uint64, src []byte, streams []*Stream, chunk uint64) error {
	if off > s.Size || uint64(len(src)) > s.Size-off {
		return fmt.Errorf("slab upload: [%d, %d) outside slab of %d bytes", off, off+uint64(len(src)), s.Size)
	}
	return CopyChunked(streams, s.Ptr+DevicePtr(off), src, chunk)
}

// IPCHandle exports the slab.
func (s *Slab) IPCHandle() (IPCHandle, error) { return s.ctx.IPCHandle(s.Ptr) }

// Free frees the slab's memory. Importers that still map it keep it alive.
func (s *Slab) Free() error { return s.ctx.Free(s.Ptr) }

// CopyChunked enqueues src to dst in chunks of chunk bytes (0: DefaultChunk),
// round-robin over streams, without synchronizing.
func CopyChunked(streams []*Stream, dst DevicePtr, src []byte, chunk uint64) error {
	if len(streams) == 0 {
		return errors.New("cuda: CopyChunked needs at least one stream")
	}
	if chunk == 0 {
		chunk = DefaultChunk
	}
	for i, off := 0, uint64(0); off < uint64(len(src)); i++ {
		n := min(chunk, uint64(len(src))-off)
		if err := streams[i%len(streams)].CopyHtoD(dst+DevicePtr(off), src[off:off+n]); err != nil {
			return fmt.Errorf("copy of [%d, %d): %w", off, off+n, err)
		}
		off += n
	}
	return nil
}

// SynchronizeAll synchronizes every stream and returns the first error.
func SynchronizeAll(streams []*Stream) error {
	var first error
	for _, s := range streams {
		if err := s.Synchronize(); err != nil && first == nil {
			first = err
		}
	}
	return first
}
