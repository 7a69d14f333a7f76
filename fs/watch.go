package fs

import (
	"context"
	"encoding/binary"
	"strconv"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// .weightfs/versions/NAME tells any reader of the mount the current version
// of NAME and wakes it at each change (docs/PROTOCOL.md, "Watching
// versions"): a read at offset 0 answers "N\n" at once; a read at any other
// offset blocks until the current version differs from the one this handle
// last answered, then answers the new line; 0 bytes (EOF) once the model is
// gone or the mount is going away. A FUSE INTERRUPT (a signal, a killed
// reader) ends a blocked read with EINTR.
const (
	versionsDirName = "versions"
	versionsDirIno  = 4
	// versionsFileBit marks the inode of versions/NAME: the model's own
	// inode number (small, handed out by the store) with this bit set.
	versionsFileBit = 1 << 62
)

// IoctlWatchTimeout is _IOW('W', 2, uint32): the milliseconds a blocked read
// of this handle of .weightfs/versions/NAME waits before failing with
// ETIMEDOUT (0: no limit, the default). Readers that need a timeout use it
// instead of a thread or a signal.
const IoctlWatchTimeout = iocWrite<<30 | 4<<16 | 'W'<<8 | 2

const iocWrite = 1

type versionsDir struct {
	gofs.Inode
	m *mount
}

var (
	_ gofs.NodeLookuper  = (*versionsDir)(nil)
	_ gofs.NodeReaddirer = (*versionsDir)(nil)
	_ gofs.NodeGetattrer = (*versionsDir)(nil)
	_ gofs.NodeStatfser  = (*versionsDir)(nil)
)

func (d *versionsDir) fill(a *fuse.Attr) {
	a.Mode = dirMode
	a.Ino = versionsDirIno
	a.Nlink = 2
	a.SetTimes(&d.m.started, &d.m.started, &d.m.started)
	d.m.owner(a)
}

func (d *versionsDir) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d.m.count(opGetattr)
	d.fill(&out.Attr)
	out.SetTimeout(time.Nanosecond)
	return 0
}

func (d *versionsDir) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	return d.m.statfs(out)
}

func (d *versionsDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	d.m.count(opLookup)
	model := d.m.store.Model(name)
	if model == nil || model.Current() == nil {
		return nil, syscall.ENOENT
	}
	f := &versionsFile{m: d.m, name: name, ino: versionsFileBit | model.Ino()}
	f.fill(&out.Attr)
	// The model may go and come back: look it up again each time.
	out.SetEntryTimeout(0)
	out.SetAttrTimeout(time.Nanosecond)
	return d.NewInode(ctx, f, gofs.StableAttr{Mode: syscall.S_IFREG, Ino: f.ino}), 0
}

func (d *versionsDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	d.m.count(opReaddir)
	var entries []fuse.DirEntry
	for _, m := range d.m.store.Models() {
		if m.Current() != nil {
			entries = append(entries, fuse.DirEntry{Name: m.Name(), Ino: versionsFileBit | m.Ino(), Mode: syscall.S_IFREG})
		}
	}
	return gofs.NewListDirStream(entries), 0
}

// versionsFile is .weightfs/versions/NAME.
type versionsFile struct {
	gofs.Inode
	m    *mount
	name string
	ino  uint64
}

var (
	_ gofs.NodeOpener    = (*versionsFile)(nil)
	_ gofs.NodeGetattrer = (*versionsFile)(nil)
	_ gofs.NodeStatfser  = (*versionsFile)(nil)
)

func (f *versionsFile) fill(a *fuse.Attr) {
	a.Mode = fileMode
	a.Ino = f.ino
	a.Nlink = 1
	a.Size = 0 // a stream: direct I/O reads ignore the size
	t := time.Now()
	a.SetTimes(&t, &t, &t)
	f.m.owner(a)
}

func (f *versionsFile) Getattr(ctx context.Context, fh gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	f.m.count(opGetattr)
	f.fill(&out.Attr)
	out.SetTimeout(time.Nanosecond)
	return 0
}

func (f *versionsFile) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	return f.m.statfs(out)
}

func (f *versionsFile) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	f.m.count(opOpen)
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	if n, _ := f.m.store.Watch(f.name); n == 0 {
		return nil, 0, syscall.ENOENT
	}
	h := &versionsHandle{m: f.m, name: f.name, turn: make(chan struct{}, 1)}
	return h, fuse.FOPEN_DIRECT_IO, 0
}

// versionsHandle is one open of .weightfs/versions/NAME. Its reads take
// turns (turn): a second reader of the same handle waits for the first, and
// can be interrupted while it does.
type versionsHandle struct {
	m       *mount
	name    string
	turn    chan struct{}
	last    int    // the number last answered (0: none yet)
	pending []byte // the rest of a line a short read did not take
	gone    bool
	timeout time.Duration
}

var (
	_ gofs.FileReader  = (*versionsHandle)(nil)
	_ gofs.FileIoctler = (*versionsHandle)(nil)
)

func (h *versionsHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h.m.count(opRead)
	select {
	case h.turn <- struct{}{}:
		defer func() { <-h.turn }()
	case <-ctx.Done():
		return nil, syscall.EINTR
	}
	if off == 0 { // the current version, at once
		h.pending, h.gone = nil, false
		n, _ := h.m.store.Watch(h.name)
		return h.answer(dest, n), 0
	}
	if len(h.pending) > 0 || h.gone {
		return h.rest(dest), 0
	}
	var timer <-chan time.Time
	if h.timeout > 0 {
		t := time.NewTimer(h.timeout)
		defer t.Stop()
		timer = t.C
	}
	for {
		n, changed := h.m.store.Watch(h.name)
		if n != h.last {
			return h.answer(dest, n), 0
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, syscall.EINTR
		case <-h.m.closing:
			return fuse.ReadResultData(nil), 0
		case <-timer:
			return nil, syscall.ETIMEDOUT
		}
	}
}

// answer records n as answered and returns its line (EOF for 0: gone).
func (h *versionsHandle) answer(dest []byte, n int) fuse.ReadResult {
	if n == 0 {
		h.gone = true
		return fuse.ReadResultData(nil)
	}
	h.last = n
	h.pending = strconv.AppendInt(nil, int64(n), 10)
	h.pending = append(h.pending, '\n')
	return h.rest(dest)
}

func (h *versionsHandle) rest(dest []byte) fuse.ReadResult {
	k := copy(dest, h.pending)
	out := append([]byte(nil), h.pending[:k]...)
	h.pending = h.pending[k:]
	return fuse.ReadResultData(out)
}

// Ioctl sets the handle's read timeout (IoctlWatchTimeout).
func (h *versionsHandle) Ioctl(ctx context.Context, cmd uint32, arg uint64, input, output []byte) (int32, syscall.Errno) {
	h.m.count(opIoctl)
	if cmd != IoctlWatchTimeout {
		return 0, syscall.ENOTTY
	}
	if len(input) < 4 {
		return 0, syscall.EINVAL
	}
	ms := binary.LittleEndian.Uint32(input)
	select {
	case h.turn <- struct{}{}:
		h.timeout = time.Duration(ms) * time.Millisecond
		<-h.turn
	case <-ctx.Done():
		return 0, syscall.EINTR
	}
	return 0, 0
}
