package store

import (
	"errors"
	"fmt"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Arena hands out memory-backed files for host images. It prefers a private
// tmpfs mounted with huge=always (transparent huge pages without touching the
// system-wide THP settings) and falls back to memfd where mounting is not
// allowed. The tmpfs is detached from the mount tree right after it is
// mounted: it lives exactly as long as the daemon's file descriptors, so a
// killed daemon leaks no memory and leaves no mount behind.
type Arena struct {
	kind  string // "tmpfs" or "memfd"
	dirFD int    // directory fd of the detached tmpfs; -1 for memfd
	why   string // why the arena is not tmpfs, when it is not
}

// OpenArena creates the arena. sizeLimit bounds the private tmpfs (0: the
// machine's memory).
func OpenArena(sizeLimit int64) (*Arena, error) {
	a, err := openTmpfsArena(sizeLimit)
	if err == nil {
		return a, nil
	}
	return &Arena{kind: "memfd", dirFD: -1, why: err.Error()}, nil
}

// OpenMemfdArena creates an arena of memfds only (for callers without
// CAP_SYS_ADMIN, and tests of that path).
func OpenMemfdArena() *Arena { return &Arena{kind: "memfd", dirFD: -1, why: "requested"} }

func openTmpfsArena(sizeLimit int64) (*Arena, error) {
	if sizeLimit <= 0 {
		var si unix.Sysinfo_t
		if err := unix.Sysinfo(&si); err != nil {
			return nil, fmt.Errorf("sysinfo: %w", err)
		}
		sizeLimit = int64(si.Totalram) * int64(si.Unit)
	}
	dir, err := os.MkdirTemp("", "weightfs-arena-")
	if err != nil {
		return nil, fmt.Errorf("create arena mount point: %w", err)
	}
	defer os.Remove(dir)
	opts := fmt.Sprintf("huge=always,mode=0700,size=%d", sizeLimit)
	if err := unix.Mount("weightfs-arena", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, opts); err != nil {
		return nil, fmt.Errorf("mount private tmpfs (huge=always): %w", err)
	}
	fd, openErr := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	// Detach at once: the open fd keeps the tmpfs alive, nothing else does.
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && openErr == nil {
		unix.Close(fd)
		return nil, fmt.Errorf("detach private tmpfs: %w", err)
	}
	if openErr != nil {
		return nil, fmt.Errorf("open private tmpfs: %w", openErr)
	}
	return &Arena{kind: "tmpfs", dirFD: fd}, nil
}

// Kind says where host images live: "tmpfs" (private, huge=always) or "memfd".
func (a *Arena) Kind() string { return a.kind }

// FallbackReason says why the arena is not a huge-page tmpfs ("" when it is).
func (a *Arena) FallbackReason() string { return a.why }

// Close releases the arena. Buffers already handed out stay valid until they
// are closed.
func (a *Arena) Close() error {
	if a.dirFD >= 0 {
		err := unix.Close(a.dirFD)
		a.dirFD = -1
		return err
	}
	return nil
}

// NewBuffer creates a memory-backed file of size bytes, mapped shared and
// writable into the daemon.
func (a *Arena) NewBuffer(name string, size int64) (*Buffer, error) {
	if size < 0 {
		return nil, errorf(ErrInvalid, "buffer %s: negative size %d", name, size)
	}
	var fd int
	var err error
	if a.kind == "tmpfs" {
		fd, err = unix.Openat(a.dirFD, ".", unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return nil, fmt.Errorf("create host image for %s in private tmpfs: %w", name, err)
		}
	} else {
		fd, err = unix.MemfdCreate("weightfs:"+name, unix.MFD_CLOEXEC)
		if err != nil {
			return nil, fmt.Errorf("create memfd for %s: %w", name, err)
		}
	}
	f := os.NewFile(uintptr(fd), "weightfs:"+name)
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, fmt.Errorf("size host image for %s to %d bytes: %w", name, size, err)
	}
	b := &Buffer{file: f, size: size}
	if size > 0 {
		// Allocate every page now, in one pass: huge pages come out of one
		// compaction run instead of one per fault, and a machine without the
		// memory says so here rather than with SIGBUS in the middle of a copy.
		if err := unix.Fallocate(fd, 0, 0, size); err != nil {
			f.Close()
			return nil, memError(err, "allocate %d bytes of host memory for %s: %w", size, name, err)
		}
		mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			f.Close()
			return nil, memError(err, "map host image for %s (%d bytes): %w", name, size, err)
		}
		if a.kind == "memfd" {
			// Honoured only where shmem THP is "advise"; harmless elsewhere.
			_ = unix.Madvise(mem, unix.MADV_HUGEPAGE)
		}
		b.mem = mem
	}
	return b, nil
}

// memError is an allocation failure: ErrNoMemory when the machine is out of
// memory (or the tmpfs is full), a plain error otherwise.
func memError(err error, format string, args ...any) error {
	if errors.Is(err, unix.ENOMEM) || errors.Is(err, unix.ENOSPC) {
		return errorf(ErrNoMemory, format, args...)
	}
	return fmt.Errorf(format, args...)
}

// Buffer is one host image: a memory-backed file and the daemon's mapping of
// it. The same pages serve FUSE reads, engines' mmaps and pinned GPU copies.
type Buffer struct {
	mu   sync.Mutex
	file *os.File
	mem  []byte
	size int64
}

// Bytes is the daemon's mapping of the whole image.
func (b *Buffer) Bytes() []byte { return b.mem }

// Size is the image's length in bytes.
func (b *Buffer) Size() int64 { return b.size }

// Fd is the backing file's descriptor (for FUSE passthrough registration).
func (b *Buffer) Fd() int { return int(b.file.Fd()) }

// File is the backing file.
func (b *Buffer) File() *os.File { return b.file }

// Close unmaps and closes the image; its memory returns to the system once no
// one else (an engine's mmap, a passthrough open) holds it.
func (b *Buffer) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	var errs []error
	if b.mem != nil {
		if err := unix.Munmap(b.mem); err != nil {
			errs = append(errs, fmt.Errorf("unmap host image: %w", err))
		}
		b.mem = nil
	}
	if b.file != nil {
		if err := b.file.Close(); err != nil {
			errs = append(errs, err)
		}
		b.file = nil
	}
	return errors.Join(errs...)
}
