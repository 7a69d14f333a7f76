package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Arena hands out memory-backed files for host images. It prefers a private
// tmpfs mounted with huge=within_size (transparent huge pages without touching
// the system-wide THP settings) and falls back to memfd where mounting is not
// allowed. The tmpfs is detached from the mount tree right after it is
// mounted: it lives exactly as long as the daemon's file descriptors, so a
// killed daemon leaks no memory and leaves no mount behind.
//
// huge=within_size, not huge=always: a huge page is used only where the whole
// 2 MiB lies inside the file, so a file's body is in huge pages and its tail
// (and any file under 2 MiB) in 4 KiB pages. With huge=always every file took
// at least one 2 MiB page: a 100-byte config.json cost 2 MiB, a 759 KiB model
// 14 MiB. A file now costs its size rounded up to 4 KiB, whatever its size.
type Arena struct {
	kind  string // "tmpfs", "memfd" or "state" (named files in a state directory)
	dirFD int    // directory fd of the detached tmpfs or of the images folder; -1 for memfd
	why   string // why the arena is not tmpfs, when it is not
	// page is the page size a file of the arena is predicted to be rounded
	// up to (Cost); the real cost of a buffer is read back from the kernel.
	page int64
	// live is the memory of the buffers open now (their real cost).
	live atomic.Int64
	// seq names the images of a "state" arena, whose folder state owns.
	seq   *imageSeq
	state *StateDir
}

// smallPage is the base page size that tmpfs and memfd files are made of.
const smallPage = 4096

// OpenArena creates the arena. sizeLimit bounds the private tmpfs (0: the
// machine's memory).
func OpenArena(sizeLimit int64) (*Arena, error) {
	a, err := openTmpfsArena(sizeLimit)
	if err == nil {
		return a, nil
	}
	return &Arena{kind: "memfd", dirFD: -1, why: err.Error(), page: memfdPage()}, nil
}

// OpenMemfdArena creates an arena of memfds only (for callers without
// CAP_SYS_ADMIN, and tests of that path).
func OpenMemfdArena() *Arena {
	return &Arena{kind: "memfd", dirFD: -1, why: "requested", page: memfdPage()}
}

// memfdPage is the page a memfd file is rounded up to when it is allocated
// (fallocate, before any mapping exists): memfds live on the kernel's
// internal shmem mount, which follows the system-wide setting
// /sys/kernel/mm/transparent_hugepage/shmem_enabled. "always" and "force"
// put even a tiny file in a huge page; the other settings allocate huge pages
// only within the file's size ("within_size"), for madvised mappings
// ("advise": our mapping comes after the allocation) or never.
//
// Kernels with multi-size THP also have a setting per folio size
// (hugepages-64kB/shmem_enabled, …; "inherit" follows the global one): the
// largest size that is "always" sets the page.
func memfdPage() int64 {
	const thp = "/sys/kernel/mm/transparent_hugepage/"
	forced := func(setting string) bool {
		return strings.Contains(setting, "[always]") || strings.Contains(setting, "[force]")
	}
	global := forced(readString(thp + "shmem_enabled"))
	page := int64(smallPage)
	if global {
		page = hugePage()
	}
	sizes, _ := filepath.Glob(thp + "hugepages-*kB")
	for _, dir := range sizes {
		kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimPrefix(filepath.Base(dir), "hugepages-"), "kB"), 10, 64)
		setting := readString(filepath.Join(dir, "shmem_enabled"))
		if err == nil && (forced(setting) || (global && strings.Contains(setting, "[inherit]"))) {
			page = max(page, kb<<10)
		}
	}
	return page
}

// hugePage is the size of a PMD huge page (2 MiB on x86-64).
func hugePage() int64 {
	b, err := os.ReadFile("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
	if err != nil {
		return 2 << 20
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || n < smallPage {
		return 2 << 20
	}
	return n
}

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
	opts := fmt.Sprintf("huge=within_size,mode=0700,size=%d", sizeLimit)
	if err := unix.Mount("weightfs-arena", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, opts); err != nil {
		return nil, fmt.Errorf("mount private tmpfs (huge=within_size): %w", err)
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
	return &Arena{kind: "tmpfs", dirFD: fd, page: smallPage}, nil
}

// Kind says where host images live: "tmpfs" (private, huge=within_size),
// "memfd", or "state" (named files in the state directory's images folder).
func (a *Arena) Kind() string { return a.kind }

// FallbackReason says why the arena is not a huge-page tmpfs ("" when it is).
func (a *Arena) FallbackReason() string { return a.why }

// Cost is the host memory a file of size bytes is predicted to take in this
// arena: its size rounded up to the page the arena allocates it in (4 KiB on
// the tmpfs; on memfds, 2 MiB where the system-wide shmem_enabled is "always"
// or "force"). Buffer.Cost is what a buffer really took.
func (a *Arena) Cost(size int64) int64 {
	if size <= 0 {
		return 0
	}
	return (size + a.page - 1) / a.page * a.page
}

// Allocated is the memory of the arena's buffers open now: committed
// versions, draining ones and loads in progress alike.
func (a *Arena) Allocated() int64 { return a.live.Load() }

// Close releases the arena. Buffers already handed out stay valid until they
// are closed.
func (a *Arena) Close() error {
	if a.kind == "state" {
		return nil // the StateDir owns the folder
	}
	if a.dirFD >= 0 {
		err := unix.Close(a.dirFD)
		a.dirFD = -1
		return err
	}
	return nil
}

// NewBuffer creates a memory-backed file of size bytes, mapped shared and
// writable into the daemon, with every page allocated.
func (a *Arena) NewBuffer(name string, size int64) (*Buffer, error) {
	return a.newBuffer(name, size, true)
}

// NewLazyBuffer is NewBuffer without allocating the pages: Allocate does
// that later, off the critical path (a push's host image, filled after its
// commit: allocating 16 GB took 50 ms of a push's staging on the H200).
// Until then the buffer costs what Arena.Cost says, so that budgets hold.
func (a *Arena) NewLazyBuffer(name string, size int64) (*Buffer, error) {
	return a.newBuffer(name, size, false)
}

func (a *Arena) newBuffer(name string, size int64, allocate bool) (*Buffer, error) {
	if size < 0 {
		return nil, errorf(ErrInvalid, "buffer %s: negative size %d", name, size)
	}
	var fd int
	var err error
	var image string
	if a.kind == "state" {
		fd, image, err = a.createImage()
		if err != nil {
			return nil, fmt.Errorf("create host image for %s in %s: %w", name, filepath.Join(a.state.path, imagesDir), err)
		}
	} else if a.kind == "tmpfs" {
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
	b := &Buffer{file: f, name: name, image: image, size: size, arena: a}
	if err := f.Truncate(size); err != nil {
		b.Close()
		return nil, fmt.Errorf("size host image for %s to %d bytes: %w", name, size, err)
	}
	if size == 0 {
		return b, nil
	}
	b.cost.Store(a.Cost(size))
	a.live.Add(b.cost.Load())
	if allocate {
		if err := b.Allocate(); err != nil {
			b.Close()
			return nil, err
		}
	}
	// MmapPtr, not Mmap: Close unmaps in pieces, which x/sys's Munmap
	// (whole mappings it made itself) cannot.
	ptr, err := unix.MmapPtr(fd, 0, nil, uintptr(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	var mem []byte
	if err == nil {
		mem = unsafe.Slice((*byte)(ptr), size)
	}
	if err != nil {
		b.Close()
		return nil, memError(err, "map host image for %s (%d bytes): %w", name, size, err)
	}
	if a.kind == "memfd" {
		// Honoured only where shmem THP is "advise"; harmless elsewhere.
		_ = unix.Madvise(mem, unix.MADV_HUGEPAGE)
	}
	b.mem = mem
	return b, nil
}

// Allocate allocates every page of the buffer now, in one pass: huge pages
// come out of one compaction run instead of one per fault, and a machine
// without the memory says so here rather than with SIGBUS in the middle of a
// copy. Only the first call allocates; later ones answer its error.
func (b *Buffer) Allocate() error {
	b.alloc.Do(func() { b.allocErr = b.allocate() })
	return b.allocErr
}

func (b *Buffer) allocate() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.size == 0 {
		return nil
	}
	if b.file == nil {
		return fmt.Errorf("allocate host image for %s: it was freed", b.name)
	}
	fd := int(b.file.Fd())
	if err := unix.Fallocate(fd, 0, 0, b.size); err != nil {
		return memError(err, "allocate %d bytes of host memory for %s: %w", b.size, b.name, err)
	}
	// The real cost: the blocks the kernel allocated (huge pages count
	// whole), which is what Shmem in /proc/meminfo grows by.
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("stat host image for %s: %w", b.name, err)
	}
	if cost := st.Blocks * 512; cost > 0 { // 0: a file system that does not count blocks
		b.arena.live.Add(cost - b.cost.Swap(cost))
	}
	return nil
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
	mu    sync.Mutex
	file  *os.File
	name  string
	image string // its file's name in a "state" arena's folder ("" elsewhere)
	mem   []byte
	size  int64
	cost  atomic.Int64 // host memory taken, from the kernel's block count once allocated
	arena *Arena

	alloc    sync.Once
	allocErr error
}

// Bytes is the daemon's mapping of the whole image.
func (b *Buffer) Bytes() []byte { return b.mem }

// Size is the image's length in bytes.
func (b *Buffer) Size() int64 { return b.size }

// Cost is the host memory the image takes: its size rounded up to the pages
// the kernel allocated it in.
func (b *Buffer) Cost() int64 { return b.cost.Load() }

// Fd is the backing file's descriptor (for FUSE passthrough registration).
func (b *Buffer) Fd() int { return int(b.file.Fd()) }

// File is the backing file.
func (b *Buffer) File() *os.File { return b.file }

// Close unmaps and closes the image; its memory returns to the system once no
// one else (an engine's mmap, a passthrough open) holds it.
func (b *Buffer) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	err := releaseFile("host image", b.mem, b.file, b.arena, b.cost.Load(), b.image)
	b.mem, b.file = nil, nil
	return err
}

// releaseFile frees a memory-backed file: unmaps mapped (if not nil),
// closes file and, if there is one, takes cost off arena's live memory and
// deletes image (a name in the state directory's images folder, or "").
// what names the file in errors.
func releaseFile(what string, mapped []byte, file *os.File, arena *Arena, cost int64, image string) error {
	var errs []error
	if mapped != nil {
		if err := unmapInPieces(mapped); err != nil {
			errs = append(errs, fmt.Errorf("unmap %s: %w", what, err))
		}
	}
	if file == nil {
		return errors.Join(errs...)
	}
	if err := file.Close(); err != nil {
		errs = append(errs, err)
	}
	if arena != nil {
		arena.live.Add(-cost)
		if image != "" && arena.state != nil {
			errs = append(errs, arena.state.removeImage(image))
		}
	}
	return errors.Join(errs...)
}

// unmapPiece is how much of a host image one munmap call tears down.
const unmapPiece = 1 << 30

// unmapInPieces unmaps mem a piece at a time: one munmap of tens of GB holds
// the process's mmap lock while its page tables go, stalling every mmap and
// page fault of the daemon meanwhile (a push being staged while a 16 GB
// version was freed waited 0.2-0.6 s on the H200).
func unmapInPieces(mem []byte) error {
	for off := 0; off < len(mem); off += unmapPiece {
		n := min(unmapPiece, len(mem)-off)
		if err := unix.MunmapPtr(unsafe.Pointer(&mem[off]), uintptr(n)); err != nil {
			return fmt.Errorf("bytes %d to %d: %w", off, off+n, err)
		}
	}
	return nil
}
