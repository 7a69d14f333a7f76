// Package fs serves the store as a read-only FUSE file system: one directory
// per model version, a symlink per model to its current version.
package fs

import (
	"context"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/weightfs/weightfs/store"
)

// The mount's own nodes (the root, the NAME symlinks, .weightfs) reveal only
// names and are readable by all. A version's directories and files carry
// their source's owner, group and read bits (store.Dir.Perm, store.File.Perm)
// and the kernel checks them (default_permissions).
const (
	dirMode  = syscall.S_IFDIR | 0o555
	fileMode = syscall.S_IFREG | 0o444
	linkMode = syscall.S_IFLNK | 0o777
	// blockSize is st_blksize: cp, Python and others size their buffers by it.
	blockSize = 1 << 20
)

// rootDir lists the store's models: a symlink per model and a directory per
// version. It asks the store on every lookup, so loads show up at once.
type rootDir struct {
	gofs.Inode
	m      *mount
	status StatusSource // nil: .weightfs/status.json shows {}
}

var (
	_ gofs.NodeLookuper    = (*rootDir)(nil)
	_ gofs.NodeReaddirer   = (*rootDir)(nil)
	_ gofs.NodeGetattrer   = (*rootDir)(nil)
	_ gofs.NodeStatfser    = (*rootDir)(nil)
	_ gofs.NodeGetxattrer  = (*rootDir)(nil)
	_ gofs.NodeListxattrer = (*rootDir)(nil)
)

// splitVersion splits "name@N" into its parts.
func splitVersion(entry string) (name string, number int, ok bool) {
	i := strings.LastIndexByte(entry, '@')
	if i <= 0 {
		return "", 0, false
	}
	n, err := strconv.Atoi(entry[i+1:])
	if err != nil || n <= 0 || strconv.Itoa(n) != entry[i+1:] {
		return "", 0, false
	}
	return entry[:i], n, true
}

func (r *rootDir) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	r.m.count(opLookup)
	if name == statusDirName {
		d := &statusDir{m: r.m, source: r.status}
		d.fill(&out.Attr)
		return r.NewInode(ctx, d, gofs.StableAttr{Mode: syscall.S_IFDIR, Ino: statusDirIno}), 0
	}
	if model, number, ok := splitVersion(name); ok {
		v := r.m.store.Version(model, number)
		if v == nil {
			return nil, syscall.ENOENT
		}
		d := &dirNode{m: r.m, version: v, dir: v.Root()}
		d.fill(&out.Attr)
		return r.NewInode(ctx, d, gofs.StableAttr{Mode: syscall.S_IFDIR, Ino: v.Root().Ino()}), 0
	}
	model := r.m.store.Model(name)
	if model == nil || model.Current() == nil {
		return nil, syscall.ENOENT
	}
	l := &modelLink{m: r.m, model: model}
	l.fill(&out.Attr)
	// The link's target changes with every new version: never cache its size.
	out.SetAttrTimeout(time.Nanosecond)
	return r.NewInode(ctx, l, gofs.StableAttr{Mode: syscall.S_IFLNK, Ino: model.Ino()}), 0
}

func (r *rootDir) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	r.m.count(opReaddir)
	entries := []fuse.DirEntry{{Name: statusDirName, Ino: statusDirIno, Mode: syscall.S_IFDIR}}
	for _, m := range r.m.store.Models() {
		if m.Current() == nil {
			continue
		}
		entries = append(entries, fuse.DirEntry{Name: m.Name(), Ino: m.Ino(), Mode: syscall.S_IFLNK})
		for _, v := range m.Versions() {
			entries = append(entries, fuse.DirEntry{Name: v.Name(), Ino: v.Root().Ino(), Mode: syscall.S_IFDIR})
		}
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Name < entries[j].Name })
	return gofs.NewListDirStream(entries), 0
}

func (r *rootDir) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	r.m.count(opGetattr)
	out.Mode = dirMode
	out.Nlink = 2
	out.Ino = 1
	out.SetTimes(&r.m.started, &r.m.started, &r.m.started)
	r.m.owner(&out.Attr)
	out.SetTimeout(time.Nanosecond)
	return 0
}

// statfs reports the store: every block is a resident byte, none is free.
// The kernel asks the node of the path given, so every directory and file
// answers it (go-fuse would answer zeros for a node without Statfs).
func (m *mount) statfs(out *fuse.StatfsOut) syscall.Errno {
	m.count(opStatfs)
	st := m.store.Stats()
	out.Bsize = 4096
	out.Frsize = 4096
	out.Blocks = uint64((st.Bytes + 4095) / 4096)
	out.Files = uint64(st.Files)
	out.NameLen = 255
	return 0
}

func (r *rootDir) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	return r.m.statfs(out)
}

func (r *rootDir) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	r.m.count(opGetxattr)
	return r.m.getxattr(ctx, dest, attr, r.attrs())
}

func (r *rootDir) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	r.m.count(opListxattr)
	return listxattr(dest, r.attrs())
}

func (r *rootDir) attrs() []xattr {
	return []xattr{{name: "user.weightfs.readmode", value: r.m.Mode().String()}}
}

// modelLink is "MODEL", a symlink to the model's current version.
type modelLink struct {
	gofs.Inode
	m     *mount
	model *store.Model
}

var (
	_ gofs.NodeReadlinker = (*modelLink)(nil)
	_ gofs.NodeGetattrer  = (*modelLink)(nil)
)

func (l *modelLink) target() string {
	if v := l.model.Current(); v != nil {
		return v.Name()
	}
	return ""
}

func (l *modelLink) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	l.m.count(opReadlink)
	t := l.target()
	if t == "" {
		return nil, syscall.ENOENT
	}
	return []byte(t), 0
}

func (l *modelLink) fill(a *fuse.Attr) {
	a.Mode = linkMode
	a.Ino = l.model.Ino()
	a.Nlink = 1
	a.Size = uint64(len(l.target()))
	if v := l.model.Current(); v != nil {
		a.SetTimes(nil, ptr(v.LoadedAt()), ptr(v.LoadedAt()))
	}
	l.m.owner(a)
}

func (l *modelLink) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	l.m.count(opGetattr)
	l.fill(&out.Attr)
	out.SetTimeout(time.Nanosecond)
	return 0
}

// dirNode is a version's directory or one below it.
type dirNode struct {
	gofs.Inode
	m       *mount
	version *store.Version
	dir     *store.Dir
}

var (
	_ gofs.NodeLookuper    = (*dirNode)(nil)
	_ gofs.NodeReaddirer   = (*dirNode)(nil)
	_ gofs.NodeGetattrer   = (*dirNode)(nil)
	_ gofs.NodeStatfser    = (*dirNode)(nil)
	_ gofs.NodeGetxattrer  = (*dirNode)(nil)
	_ gofs.NodeListxattrer = (*dirNode)(nil)
)

func (d *dirNode) fill(a *fuse.Attr) {
	a.Mode = syscall.S_IFDIR | uint32(d.dir.Perm().Perm()&0o555)
	a.Ino = d.dir.Ino()
	a.Nlink = uint32(2 + len(d.dir.Dirs()))
	a.Size = 4096
	t := d.version.LoadedAt()
	a.SetTimes(&t, &t, &t)
	a.Uid, a.Gid = d.dir.Owner()
}

func (d *dirNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*gofs.Inode, syscall.Errno) {
	d.m.count(opLookup)
	sub, file := d.dir.Lookup(name)
	switch {
	case sub != nil:
		c := &dirNode{m: d.m, version: d.version, dir: sub}
		c.fill(&out.Attr)
		return d.NewInode(ctx, c, gofs.StableAttr{Mode: syscall.S_IFDIR, Ino: sub.Ino()}), 0
	case file != nil:
		c := &fileNode{m: d.m, version: d.version, file: file}
		c.fill(&out.Attr)
		return d.NewInode(ctx, c, gofs.StableAttr{Mode: syscall.S_IFREG, Ino: file.Ino()}), 0
	}
	return nil, syscall.ENOENT
}

func (d *dirNode) Readdir(ctx context.Context) (gofs.DirStream, syscall.Errno) {
	d.m.count(opReaddir)
	var entries []fuse.DirEntry
	for _, s := range d.dir.Dirs() {
		entries = append(entries, fuse.DirEntry{Name: s.Name(), Ino: s.Ino(), Mode: syscall.S_IFDIR})
	}
	for _, f := range d.dir.Files() {
		entries = append(entries, fuse.DirEntry{Name: f.Name(), Ino: f.Ino(), Mode: syscall.S_IFREG})
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Name < entries[j].Name })
	return gofs.NewListDirStream(entries), 0
}

func (d *dirNode) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d.m.count(opGetattr)
	d.fill(&out.Attr)
	return 0
}

func (d *dirNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	return d.m.statfs(out)
}

func (d *dirNode) attrs() []xattr {
	return []xattr{
		{name: "user.weightfs.version", value: d.version.Name()},
		{name: "user.weightfs.source", value: d.version.Source()},
	}
}

func (d *dirNode) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	d.m.count(opGetxattr)
	return d.m.getxattr(ctx, dest, attr, d.attrs())
}

func (d *dirNode) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	d.m.count(opListxattr)
	return listxattr(dest, d.attrs())
}

func ptr[T any](v T) *T { return &v }
