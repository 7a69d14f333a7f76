package store

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"

	"golang.org/x/sys/unix"
)

// The snapshot directory (--snapshot-dir) holds pushed versions on disk, in
// the compressed format, so that they outlive a reboot (docs/ARCHITECTURE.md,
// "Snapshots"): DIR/NAME/N/ is version N of model NAME, written as
// DIR/NAME/.tmp-N-… and renamed. Like the state directory it is a privilege
// boundary: a folder of root's (or of the daemon's uid), 0700, that others
// cannot write; everything in it is opened relative to its folder's
// descriptor, without following a symlink.

// SnapshotDir is an open snapshot directory. The store that receives it
// (Options) owns it from then on.
type SnapshotDir struct {
	path  string
	dirFD int
}

// OpenSnapshotDir opens (creating it, 0700) the snapshot directory at dir. A
// folder that is not a directory, is a symlink, belongs to another user or
// that others can write is refused (ErrInvalid); a second daemon on the same
// folder is ErrBusy.
func OpenSnapshotDir(dir string) (*SnapshotDir, error) {
	dir, fd, err := openPrivateDir("--snapshot-dir", dir)
	if err != nil {
		return nil, err
	}
	return &SnapshotDir{path: dir, dirFD: fd}, nil
}

// Path is the snapshot directory.
func (sd *SnapshotDir) Path() string { return sd.path }

func (sd *SnapshotDir) close() error {
	if sd.dirFD < 0 {
		return nil
	}
	err := unix.Close(sd.dirFD) // releases the flock
	sd.dirFD = -1
	return err
}

// listDir lists the entries of the folder dirFD.
func listDir(dirFD int, name string) ([]string, error) {
	fd, err := unix.Openat(dirFD, ".", unix.O_DIRECTORY|unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", name, err)
	}
	return names, nil
}

// modelDir opens DIR/name (creating it, 0700, when create is set). The
// caller closes the descriptor.
func (sd *SnapshotDir) modelDir(name string, create bool) (int, error) {
	p := filepath.Join(sd.path, name)
	if create {
		if err := unix.Mkdirat(sd.dirFD, name, 0o700); err != nil && !errors.Is(err, unix.EEXIST) {
			return -1, fmt.Errorf("create %s: %w", p, err)
		}
	}
	fd, err := openDirBeneath(sd.dirFD, name)
	if err != nil {
		return -1, fmt.Errorf("open %s (a symlink is refused): %w", p, err)
	}
	if err := checkPrivateFor("--snapshot-dir", fd, p); err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// removeTree deletes the folder name inside dirFD and what it holds,
// without following a symlink (one is deleted, not its target).
func removeTree(dirFD int, name, display string) error {
	fd, err := openDirBeneath(dirFD, name)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ELOOP) {
			return unlinkAt(dirFD, name, 0, display)
		}
		return fmt.Errorf("delete %s: %w", display, err)
	}
	names, err := listDir(fd, display)
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	for _, n := range names {
		err := unix.Unlinkat(fd, n, 0)
		if errors.Is(err, unix.EISDIR) {
			err = removeTree(fd, n, filepath.Join(display, n))
		}
		if err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete %s: %w", filepath.Join(display, n), err))
		}
	}
	unix.Close(fd)
	errs = append(errs, unlinkAt(dirFD, name, unix.AT_REMOVEDIR, display))
	return errors.Join(errs...)
}

func unlinkAt(dirFD int, name string, flags int, display string) error {
	if err := unix.Unlinkat(dirFD, name, flags); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("delete %s: %w", display, err)
	}
	return nil
}

// createFile creates name in dirFD (0600, it must not exist), writes data
// with write, and fsyncs it.
func createFile(dirFD int, name, display string, write func(io.Writer) error) (err error) {
	fd, err := unix.Openat(dirFD, name, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return fmt.Errorf("create %s: %w", display, err)
	}
	f := os.NewFile(uintptr(fd), display)
	defer func() {
		if cerr := f.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("close %s: %w", display, cerr)
		}
	}()
	if err := write(f); err != nil {
		return fmt.Errorf("write %s: %w", display, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", display, err)
	}
	return nil
}

// openRegular opens name in dirFD for reading: a regular file, not
// reached through a symlink. It returns the file and its size.
func openRegular(dirFD int, name, display string) (*os.File, int64, error) {
	fd, err := unix.Openat(dirFD, name, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, 0, fmt.Errorf("open %s: %w", display, err)
	}
	f := os.NewFile(uintptr(fd), display)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("stat %s: %w", display, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		f.Close()
		return nil, 0, fmt.Errorf("%s is not a regular file (mode %#o)", display, st.Mode)
	}
	return f, st.Size, nil
}

// readFileAt reads name in dirFD (a regular file, not through a symlink) of
// at most limit bytes.
func readFileAt(dirFD int, name, display string, limit int64) ([]byte, error) {
	f, size, err := openRegular(dirFD, name, display)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if size > limit {
		return nil, fmt.Errorf("%s is %d bytes, more than the %d expected", display, size, limit)
	}
	b := make([]byte, size)
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("read %s: %w", display, err)
	}
	return b, nil
}

// readFileInto reads name in dirFD, which must be exactly len(dst) bytes,
// into dst; decode, if set, decodes from the file instead (it must be
// exactly size bytes).
func readFileInto(dirFD int, name, display string, dst []byte, size int64, decode func(r io.Reader) error) error {
	f, got, err := openRegular(dirFD, name, display)
	if err != nil {
		return err
	}
	defer f.Close()
	if got != size {
		return fmt.Errorf("%s is %d bytes, not the %d recorded", display, got, size)
	}
	// Read front to back once: a larger readahead window (advice only, so
	// its failure changes nothing).
	_ = unix.Fadvise(int(f.Fd()), 0, size, unix.FADV_SEQUENTIAL)
	if decode != nil {
		return decode(f)
	}
	if _, err := io.ReadFull(f, dst); err != nil {
		return fmt.Errorf("read %s: %w", display, err)
	}
	return nil
}

// versionNumbers are the entries of a model folder that name a version
// ("1", "2", …, no leading zeros), newest first.
func versionNumbers(names []string) []int {
	var out []int
	for _, n := range names {
		if i, err := strconv.Atoi(n); err == nil && i > 0 && strconv.Itoa(i) == n {
			out = append(out, i)
		}
	}
	sort.Sort(sort.Reverse(sort.IntSlice(out)))
	return out
}
