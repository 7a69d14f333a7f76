package store

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/store/codec"
)

// newPacked keeps a file's stream where the arena keeps host images: in a
// state arena, a new file of the images folder (written, then mapped
// read-only), which a killed daemon leaves behind; elsewhere on the heap,
// at its exact size. stream is not kept.
func (a *Arena) newPacked(path string, stream []byte) (*packedStream, error) {
	if a.kind != "state" {
		return heapPacked(bytes.Clone(stream)), nil
	}
	fd, image, err := a.createImage()
	if err != nil {
		return nil, fmt.Errorf("create the compressed stream of %s in %s: %w", path, filepath.Join(a.state.path, imagesDir), err)
	}
	f := os.NewFile(uintptr(fd), "weightfs:"+path)
	p := &packedStream{file: f, size: int64(len(stream)), image: image}
	p.account(a)
	fail := func(err error) (*packedStream, error) {
		p.close()
		return nil, err
	}
	if _, err := f.Write(stream); err != nil {
		return fail(memError(err, "write the compressed stream of %s (%d bytes) to image %s: %w", path, len(stream), image, err))
	}
	if err := p.mapFile(); err != nil {
		return fail(fmt.Errorf("compressed stream of %s: %w", path, err))
	}
	return p, nil
}

// adoptPacked maps the stream of a compressed file an earlier daemon left
// in the images folder, which must be a regular file of size bytes, and
// checks it cheaply: the stream's header and every block header are valid
// and it decodes to raw bytes. Each block's payload is checked when it is
// decoded, and the whole file's XXH3 when it is restored.
func (a *Arena) adoptPacked(image, path string, size, raw int64) (*packedStream, error) {
	if a.kind != "state" {
		return nil, fmt.Errorf("adopt stream %s: the arena has no state directory", image)
	}
	f, got, err := openRegular(a.dirFD, image, "weightfs:"+path)
	if err != nil {
		return nil, fmt.Errorf("compressed stream %s: %w", image, err)
	}
	p := &packedStream{file: f, size: size, image: image}
	p.account(a)
	fail := func(err error) (*packedStream, error) {
		p.image = "" // not ours to delete: unreferenced images go at the end of Adopt
		p.close()
		return nil, fmt.Errorf("compressed stream %s: %w", image, err)
	}
	if got != size {
		return fail(fmt.Errorf("it is %d bytes, the manifest says %d", got, size))
	}
	if err := p.mapFile(); err != nil {
		return fail(err)
	}
	if _, err := codec.Info(p.mem); err != nil {
		return fail(err)
	}
	if n, err := codec.RawSize(p.mem); err != nil || n != raw {
		return fail(fmt.Errorf("it decodes to %d bytes, the manifest says %d (%v)", n, raw, err))
	}
	return p, nil
}

// account counts a state file's pages in the arena's live memory.
func (p *packedStream) account(a *Arena) {
	p.arena, p.cost = a, a.Cost(p.size)
	a.live.Add(p.cost)
}

// mapFile maps p.file read-only as p.mem.
func (p *packedStream) mapFile() error {
	if p.size == 0 {
		return nil
	}
	ptr, err := unix.MmapPtr(int(p.file.Fd()), 0, nil, uintptr(p.size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return memError(err, "map %d bytes read-only: %w", p.size, err)
	}
	p.mem = unsafe.Slice((*byte)(ptr), p.size)
	return nil
}

// openSnapshotPacked opens the data file name (a codec stream of size
// bytes) in a version's snapshot folder dirFD for the snapshot tier. Its
// blocks are checked when they are decoded, the whole file's XXH3 when it
// is restored.
func openSnapshotPacked(dirFD int, name, display string, size int64) (*packedStream, error) {
	f, got, err := openRegular(dirFD, name, display)
	if err != nil {
		return nil, err
	}
	if got != size {
		f.Close()
		return nil, fmt.Errorf("%s is %d bytes, not the %d recorded", display, got, size)
	}
	return &packedStream{file: f, size: size, snapshot: name}, nil
}

// release unmaps, closes and deletes what p holds; p.mu is held.
func (p *packedStream) release() error {
	what, mapped := "a compressed stream", []byte(nil) // a stream on the heap is not mapped
	if p.file != nil {
		what, mapped = "the compressed stream "+p.file.Name(), p.mem
	}
	err := releaseFile(what, mapped, p.file, p.arena, p.cost, p.image)
	p.mem, p.file = nil, nil
	return err
}
