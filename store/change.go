package store

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"golang.org/x/sys/unix"
)

// errSourceChanged marks a load that saw a source change under it: the load
// is tried once more, then refused (ErrInvalid) naming the file.
var errSourceChanged = errors.New("file changed while loading")

// canceled is why a load was cancelled; errors.Is matches it with
// context.Canceled.
type canceled string

func (c canceled) Error() string      { return string(c) }
func (canceled) Is(target error) bool { return target == context.Canceled }

// errCancelled ends a load cancelled by Store.Cancel (or by its caller).
const errCancelled = canceled("cancelled")

// fileID is what says that a source is still the file it was: the same
// inode, size, modification and change times.
type fileID struct {
	dev, ino     uint64
	size         int64
	mtime, ctime unix.Timespec
}

func idOf(st *unix.Stat_t) fileID {
	return fileID{dev: st.Dev, ino: st.Ino, size: st.Size, mtime: st.Mtim, ctime: st.Ctim}
}

// diff says how b differs from a ("" when it does not).
func (a fileID) diff(b fileID) string {
	switch {
	case a.dev != b.dev || a.ino != b.ino:
		return "it was replaced by another file"
	case a.size != b.size:
		return fmt.Sprintf("its size went from %d to %d bytes", a.size, b.size)
	case a.mtime != b.mtime:
		return "it was modified"
	case a.ctime != b.ctime:
		return "its inode changed"
	}
	return ""
}

// statID is the identity of the file a path names now.
func statID(path string) (fileID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return fileID{}, &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	return idOf(&st), nil
}

// fdID is the identity of an open file.
func fdID(f *os.File) (fileID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return fileID{}, &fs.PathError{Op: "fstat", Path: f.Name(), Err: err}
	}
	return idOf(&st), nil
}

// fileType names a file type that is not a regular file, for people.
func fileType(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFIFO:
		return "a named pipe (FIFO)"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFDIR:
		return "a directory"
	}
	return fmt.Sprintf("a special file (mode %#o)", mode)
}

// specialFile names the type of a file found by the scan that is not a
// regular file.
func specialFile(m fs.FileMode) string {
	switch {
	case m&fs.ModeNamedPipe != 0:
		return "a named pipe (FIFO)"
	case m&fs.ModeCharDevice != 0:
		return "a character device"
	case m&fs.ModeDevice != 0:
		return "a block device"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m.IsDir():
		return "a directory"
	}
	return "not a regular file"
}
