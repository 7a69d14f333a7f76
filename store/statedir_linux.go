package store

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The state directory (--state-dir, DefaultStateDir) is where a daemon keeps
// what must outlive it when it is killed: its host images, in a huge-page
// tmpfs mounted on DIR/images, and the manifest DIR/state.json that says
// which versions they are (docs/ARCHITECTURE.md, "State directory"). It is
// a privilege boundary: a folder of root's (or of the daemon's uid), 0700,
// that others cannot write; nothing in it is reached through a symlink.

// DefaultStateDir is --state-dir's default.
const DefaultStateDir = "/run/weightfs"

const (
	imagesDir    = "images"
	manifestName = "state.json"
	tmpfsMagic   = 0x01021994
)

// StateDir is an open state directory. The store that receives it (Options)
// owns it from then on.
type StateDir struct {
	path     string
	dirFD    int  // the state directory
	imagesFD int  // DIR/images
	mounted  bool // DIR/images is a tmpfs this daemon mounted
}

// ErrStateNotMemory: the images folder is not memory-backed and no tmpfs
// could be mounted on it; the daemon then keeps its host images as before
// (a private, detached arena) and nothing survives it.
var ErrStateNotMemory = errors.New("the images folder is not memory-backed")

// OpenStateDir opens (creating it, 0700) the state directory at dir and
// mounts a tmpfs (huge=within_size, mode 0700) on DIR/images unless one is
// there. fresh deletes whatever an earlier daemon left there. A folder that
// is not a directory, is a symlink, belongs to another user or that others
// can write is refused (ErrInvalid); a second daemon on the same folder is
// ErrBusy.
func OpenStateDir(dir string, fresh bool) (_ *StateDir, err error) {
	dir, fd, err := openPrivateDir("--state-dir", dir)
	if err != nil {
		return nil, err
	}
	sd := &StateDir{path: dir, dirFD: fd, imagesFD: -1}
	defer func() {
		if err != nil {
			sd.closeFDs()
		}
	}()
	if err := unix.Mkdirat(fd, imagesDir, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, fmt.Errorf("--state-dir %s: create %s: %w", dir, imagesDir, err)
	}
	if sd.imagesFD, err = openDirBeneath(fd, imagesDir); err != nil {
		return nil, fmt.Errorf("--state-dir %s: %s: %w", dir, imagesDir, err)
	}
	if err := checkPrivate(sd.imagesFD, filepath.Join(dir, imagesDir)); err != nil {
		return nil, err
	}
	if !isMountPoint(fd, sd.imagesFD) || !onTmpfs(sd.imagesFD) {
		if err := sd.mountImages(); err != nil && !onTmpfs(sd.imagesFD) {
			return nil, fmt.Errorf("--state-dir %s: %w: %w", dir, ErrStateNotMemory, err)
		}
	}
	if fresh {
		sd.removeAll()
	}
	return sd, nil
}

// openPrivateDir opens (creating it, 0700) the folder of the flag named
// flag and locks it: a folder that is not a directory, is a symlink,
// belongs to another user or that others can write is refused (ErrInvalid),
// one another daemon holds is ErrBusy. It returns the absolute path and the
// folder's descriptor, which holds the lock.
func openPrivateDir(flag, dir string) (string, int, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", -1, errorf(ErrInvalid, "%s %s: %w", flag, dir, err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return "", -1, fmt.Errorf("%s %s: create: %w", flag, dir, unwrapPath(err))
	}
	fd, err := unix.Open(dir, unix.O_DIRECTORY|unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ELOOP) || errors.Is(err, unix.ENOTDIR) {
			return "", -1, errorf(ErrInvalid, "%s %s: not a directory (a symlink is refused)", flag, dir)
		}
		return "", -1, fmt.Errorf("%s %s: open: %w", flag, dir, err)
	}
	if err := checkPrivateFor(flag, fd, dir); err != nil {
		unix.Close(fd)
		return "", -1, err
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		unix.Close(fd)
		return "", -1, errorf(ErrBusy, "%s %s: another daemon uses it (%v)", flag, dir, err)
	}
	return dir, fd, nil
}

// checkPrivate refuses a folder of another user, or one that others can write.
func checkPrivate(fd int, name string) error { return checkPrivateFor("--state-dir", fd, name) }

// checkPrivateFor is checkPrivate for the folder of the flag named flag.
func checkPrivateFor(flag string, fd int, name string) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("%s %s: %w", flag, name, err)
	}
	return CheckPrivateFolder(flag+" "+name, st.Uid, st.Mode)
}

// openDirBeneath opens the directory name inside dirFD without following a
// symlink or leaving dirFD.
func openDirBeneath(dirFD int, name string) (int, error) {
	how := &unix.OpenHow{Flags: unix.O_DIRECTORY | unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS}
	fd, err := unix.Openat2(dirFD, name, how)
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		fd, err = unix.Openat(dirFD, name, int(how.Flags), 0)
	}
	return fd, err
}

// isMountPoint: the folder (fd) is on another file system than its parent.
func isMountPoint(parentFD, fd int) bool {
	var a, b unix.Stat_t
	return unix.Fstat(parentFD, &a) == nil && unix.Fstat(fd, &b) == nil && a.Dev != b.Dev
}

func onTmpfs(fd int) bool {
	var fs unix.Statfs_t
	return unix.Fstatfs(fd, &fs) == nil && fs.Type == tmpfsMagic
}

// mountImages mounts a tmpfs (huge=within_size, as the private arena)
// sized to the machine's memory on DIR/images, through the folder's fd so
// that no symlink swapped in meanwhile is followed.
func (sd *StateDir) mountImages() error {
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return fmt.Errorf("sysinfo: %w", err)
	}
	opts := fmt.Sprintf("huge=within_size,mode=0700,size=%d", int64(si.Totalram)*int64(si.Unit))
	target := "/proc/self/fd/" + strconv.Itoa(sd.imagesFD)
	if err := unix.Mount("weightfs-images", target, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, opts); err != nil {
		return fmt.Errorf("mount a tmpfs (huge=within_size) on %s: %w", filepath.Join(sd.path, imagesDir), err)
	}
	fd, err := openDirBeneath(sd.dirFD, imagesDir)
	if err != nil {
		return fmt.Errorf("open the tmpfs mounted on %s: %w", filepath.Join(sd.path, imagesDir), err)
	}
	unix.Close(sd.imagesFD)
	sd.imagesFD, sd.mounted = fd, true
	return nil
}

// Path is the state directory.
func (sd *StateDir) Path() string { return sd.path }

// imageNames lists the files in DIR/images.
func (sd *StateDir) imageNames() ([]string, error) {
	fd, err := unix.Openat(sd.imagesFD, ".", unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	f := os.NewFile(uintptr(fd), filepath.Join(sd.path, imagesDir))
	defer f.Close()
	return f.Readdirnames(-1)
}

// removeImage deletes one image file (a name without '/').
func (sd *StateDir) removeImage(name string) error {
	if err := unix.Unlinkat(sd.imagesFD, name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete image %s in %s: %w", name, filepath.Join(sd.path, imagesDir), err)
	}
	return nil
}

// removeAll deletes every image and the manifest.
func (sd *StateDir) removeAll() error {
	names, err := sd.imageNames()
	var errs []error
	if err != nil {
		errs = append(errs, fmt.Errorf("list %s: %w", filepath.Join(sd.path, imagesDir), err))
	}
	for _, n := range names {
		errs = append(errs, sd.removeImage(n))
	}
	errs = append(errs, sd.removeManifest())
	return errors.Join(errs...)
}

func (sd *StateDir) removeManifest() error {
	if err := unix.Unlinkat(sd.dirFD, manifestName, 0); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete %s: %w", filepath.Join(sd.path, manifestName), err)
	}
	return nil
}

// writeManifest replaces DIR/state.json atomically: a temporary file,
// fsync, rename, fsync of the folder.
func (sd *StateDir) writeManifest(data []byte) error {
	name := filepath.Join(sd.path, manifestName)
	tmp := manifestName + ".tmp"
	fd, err := unix.Openat(sd.dirFD, tmp, unix.O_CREAT|unix.O_TRUNC|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("write %s: create the temporary file: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name+".tmp")
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = unix.Renameat(sd.dirFD, tmp, sd.dirFD, manifestName)
	}
	if err == nil {
		err = unix.Fsync(sd.dirFD)
	}
	if err != nil {
		unix.Unlinkat(sd.dirFD, tmp, 0)
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

// maxManifest bounds what is read of a manifest.
const maxManifest = 256 << 20

// readManifest reads DIR/state.json (nil, nil when there is none).
func (sd *StateDir) readManifest() ([]byte, error) {
	fd, err := unix.Openat(sd.dirFD, manifestName, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	name := filepath.Join(sd.path, manifestName)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxManifest+1))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", name, err)
	}
	if len(b) > maxManifest {
		return nil, fmt.Errorf("%s is larger than %d bytes", name, maxManifest)
	}
	return b, nil
}

// close releases the folder; clean (a clean stop) deletes every image and
// the manifest first and unmounts the tmpfs this daemon mounted.
func (sd *StateDir) close(clean bool) error {
	var errs []error
	if clean {
		errs = append(errs, sd.removeAll())
		if sd.mounted {
			if err := unix.Unmount(filepath.Join(sd.path, imagesDir), unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil {
				errs = append(errs, fmt.Errorf("unmount %s: %w", filepath.Join(sd.path, imagesDir), err))
			}
		}
	}
	sd.closeFDs()
	return errors.Join(errs...)
}

func (sd *StateDir) closeFDs() {
	if sd.imagesFD >= 0 {
		unix.Close(sd.imagesFD)
		sd.imagesFD = -1
	}
	if sd.dirFD >= 0 {
		unix.Close(sd.dirFD) // releases the flock
		sd.dirFD = -1
	}
}

// imageSeq makes image names unique within a daemon; the start time makes
// them unique across daemons (O_EXCL refuses a clash all the same).
type imageSeq struct {
	prefix string
	n      atomic.Uint64
}

func newImageSeq() *imageSeq {
	return &imageSeq{prefix: strconv.FormatInt(time.Now().UnixNano(), 36)}
}

func (q *imageSeq) next() string { return q.prefix + "-" + strconv.FormatUint(q.n.Add(1), 10) }

// OpenStateArena is an arena whose host images are named files in the state
// directory's images folder: a killed daemon leaves them there for the next
// one to adopt. The arena does not own sd.
func OpenStateArena(sd *StateDir) *Arena {
	page := int64(smallPage)
	return &Arena{kind: "state", dirFD: sd.imagesFD, page: page, seq: newImageSeq(), state: sd}
}

// createImage creates a new, empty image file (mode 0600) and returns its
// descriptor and name.
func (a *Arena) createImage() (int, string, error) {
	for range 100 {
		name := a.seq.next()
		fd, err := unix.Openat(a.dirFD, name, unix.O_CREAT|unix.O_EXCL|unix.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if errors.Is(err, unix.EEXIST) {
			continue
		}
		return fd, name, err
	}
	return -1, "", errors.New("no free image name")
}

// adoptBuffer maps an image an earlier daemon left, which must be a regular
// file of size bytes.
func (a *Arena) adoptBuffer(image, path string, size int64) (*Buffer, error) {
	if a.kind != "state" {
		return nil, fmt.Errorf("adopt image %s: the arena has no state directory", image)
	}
	fd, err := unix.Openat(a.dirFD, image, unix.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open image %s: %w", image, err)
	}
	f := os.NewFile(uintptr(fd), "weightfs:"+path)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("stat image %s: %w", image, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Size != size {
		f.Close()
		return nil, fmt.Errorf("image %s is not a regular file of %d bytes (mode %#o, %d bytes)", image, size, st.Mode, st.Size)
	}
	b := &Buffer{file: f, name: path, image: image, size: size, arena: a}
	b.alloc.Do(func() {}) // allocated (or not) as the earlier daemon left it
	if size == 0 {
		return b, nil
	}
	b.cost.Store(max(st.Blocks*512, a.Cost(size)))
	a.live.Add(b.cost.Load())
	ptr, err := unix.MmapPtr(fd, 0, nil, uintptr(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		b.Close()
		return nil, memError(err, "map image %s (%d bytes): %w", image, size, err)
	}
	b.mem = unsafe.Slice((*byte)(ptr), size)
	return b, nil
}
