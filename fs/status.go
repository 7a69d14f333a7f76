package fs

import (
	"context"
	"encoding/json"
	"fmt"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// The hidden directory at the root: what `weightfs status --json` says, as a
// read-only file for tools that only see the mount.
const (
	statusDirName  = ".weightfs"
	statusFileName = "status.json"
	statusDirIno   = 2
	statusFileIno  = 3
)

// StatusSource says what .weightfs/status.json shows; fs renders it as indented JSON.
type StatusSource interface{ Status() any }

// StatusFunc is a StatusSource made of a function.
type StatusFunc func() any

// Status calls f.
func (f StatusFunc) Status() any { return f() }

// renderStatus renders src as indented JSON with a final newline: {} for no
// source (or a nil status), {"error": "..."} when the value cannot be
// marshalled or Status panics. It calls Status once and does nothing else.
func renderStatus(src StatusSource) (out []byte) {
	if src == nil {
		return []byte("{}\n")
	}
	defer func() {
		if p := recover(); p != nil {
			out = renderError(fmt.Errorf("status: %v", p))
		}
	}()
	v := src.Status()
	if v == nil {
		return []byte("{}\n")
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return renderError(err)
	}
	return append(b, '\n')
}

func renderError(err error) []byte {
	b, _ := json.MarshalIndent(map[string]string{"error": err.Error()}, "", "  ")
	return append(b, '\n')
}

type statusDir struct {
	gofs.Inode
	m      *mount
	source StatusSource
}

var (
	_ gofs.NodeLookuper  = (*statusDir)(nil)
	_ gofs.NodeReaddirer = (*statusDir)(nil)
	_ gofs.NodeGetattrer = (*statusDir)(nil)
	_ gofs.NodeStatfser  = (*statusDir)(nil)
)

func (d *statusDir) fill(a *fuse.Attr) {
	a.Mode = dirMode
	a.Ino = statusDirIno
	a.Nlink = 3
	a.SetTimes(&d.m.started, &d.m.started, &d.m.started)
	d.m.owner(a)
}

func (d *statusDir) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d.m.count(opGetattr)
	d.fill(&out.Attr)
	return 0
}

func (d *statusDir) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	return d.m.statfs(out)
}

func (d *statusDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	d.m.count(opLookup)
	if name == versionsDirName {
		v := &versionsDir{m: d.m}
		v.fill(&out.Attr)
		return d.NewInode(ctx, v, gofs.StableAttr{Mode: syscall.S_IFDIR, Ino: versionsDirIno}), 0
	}
	if name != statusFileName {
		return nil, syscall.ENOENT
	}
	f := &statusFile{m: d.m, source: d.source}
	f.fill(&out.Attr, len(renderStatus(d.source)))
	out.SetAttrTimeout(time.Nanosecond)
	return d.NewInode(ctx, f, gofs.StableAttr{Mode: syscall.S_IFREG, Ino: statusFileIno}), 0
}

func (d *statusDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	d.m.count(opReaddir)
	return gofs.NewListDirStream([]fuse.DirEntry{{Name: statusFileName, Ino: statusFileIno, Mode: syscall.S_IFREG},
		{Name: versionsDirName, Ino: versionsDirIno, Mode: syscall.S_IFDIR}}), 0
}

// statusFile is rendered afresh at every open; reads come from that snapshot.
type statusFile struct {
	gofs.Inode
	m      *mount
	source StatusSource
}

var (
	_ gofs.NodeOpener    = (*statusFile)(nil)
	_ gofs.NodeGetattrer = (*statusFile)(nil)
	_ gofs.NodeStatfser  = (*statusFile)(nil)
)

func (f *statusFile) fill(a *fuse.Attr, size int) {
	a.Mode = fileMode
	a.Ino = statusFileIno
	a.Nlink = 1
	a.Size = uint64(size)
	t := time.Now()
	a.SetTimes(&t, &t, &t)
	f.m.owner(a)
}

func (f *statusFile) Getattr(ctx context.Context, fh gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	f.m.count(opGetattr)
	if s, ok := fh.(*snapshot); ok {
		f.fill(&out.Attr, len(s.data))
	} else {
		f.fill(&out.Attr, len(renderStatus(f.source)))
	}
	out.SetTimeout(time.Nanosecond)
	return 0
}

func (f *statusFile) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	return f.m.statfs(out)
}

func (f *statusFile) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	f.m.count(opOpen)
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	// Direct I/O: the size changes from one snapshot to the next.
	return &snapshot{data: renderStatus(f.source)}, fuse.FOPEN_DIRECT_IO, 0
}

type snapshot struct{ data []byte }

var _ gofs.FileReader = (*snapshot)(nil)

func (s *snapshot) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= int64(len(s.data)) {
		return fuse.ReadResultData(nil), 0
	}
	return fuse.ReadResultData(s.data[off:min(off+int64(len(dest)), int64(len(s.data)))]), 0
}
