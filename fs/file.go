package fs

import (
	"context"
	"encoding/binary"
	"strings"
	"syscall"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/weightfs/weightfs/store"
)

// fileNode is one file of a version. Its bytes live in a memory-backed file
// that the kernel reads directly under passthrough.
type fileNode struct {
	gofs.Inode
	m       *mount
	version *store.Version
	file    *store.File
}

var (
	_ gofs.NodeIoctler     = (*fileNode)(nil)
	_ gofs.NodeOpener      = (*fileNode)(nil)
	_ gofs.NodeGetattrer   = (*fileNode)(nil)
	_ gofs.NodeStatfser    = (*fileNode)(nil)
	_ gofs.NodeGetxattrer  = (*fileNode)(nil)
	_ gofs.NodeListxattrer = (*fileNode)(nil)
)

func (n *fileNode) fill(a *fuse.Attr) {
	a.Mode = syscall.S_IFREG | uint32(n.file.Perm().Perm()&0o444)
	a.Ino = n.file.Ino()
	a.Nlink = 1
	a.Size = uint64(n.file.Size())
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = blockSize
	t := n.version.LoadedAt()
	a.SetTimes(&t, &t, &t)
	a.Uid, a.Gid = n.file.Owner()
}

func (n *fileNode) Getattr(ctx context.Context, f gofs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.m.count(opGetattr)
	n.fill(&out.Attr)
	return 0
}

func (n *fileNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	return n.m.statfs(out)
}

func (n *fileNode) Open(ctx context.Context, flags uint32) (gofs.FileHandle, uint32, syscall.Errno) {
	n.m.count(opOpen)
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EROFS
	}
	if !n.version.Acquire() {
		return nil, 0, syscall.ENOENT // unloaded and freed since the lookup
	}
	// A compressed version is restored whole before the open returns; the
	// open holds it, so it is not compressed again while open.
	if err := n.version.EnsureHost(ctx); err != nil {
		n.version.Release()
		return nil, 0, waitErrno(ctx, err)
	}
	// A pushed file's host image may still be filling from the GPU: nobody
	// may read a partial file. The open holds the version meanwhile. An
	// O_DIRECT open does not wait: its reads come here with their exact
	// ranges, so the header, complete since staging, is served at once and
	// only reads of tensor bytes wait (loaders that map the slabs read the
	// header alone, and switch as soon as the commit lands).
	if ready, _ := n.file.Ready(); !ready && flags&syscall.O_DIRECT != 0 {
		n.m.counters.opens.Add(1)
		return &readHandle{m: n.m, file: n.file, version: n.version}, fuse.FOPEN_DIRECT_IO, 0
	}
	if errno := waitReady(ctx, n.file); errno != 0 {
		n.version.Release()
		return nil, 0, errno
	}
	n.m.counters.opens.Add(1)
	h := &readHandle{m: n.m, file: n.file, version: n.version}
	if n.m.Mode() == Passthrough {
		return &passthroughHandle{readHandle: h}, 0, 0
	}
	// Without passthrough the kernel page cache is the fast path: keep it
	// across opens (versions never change).
	return h, fuse.FOPEN_KEEP_CACHE, 0
}

// waitReady waits for the file's host image with a request's context: an
// interrupt (the request's context ends) is EINTR, a failed fill EIO.
func waitReady(ctx context.Context, f *store.File) syscall.Errno {
	return waitErrno(ctx, f.WaitReady(ctx))
}

// waitErrno maps the error of a wait for the store with a request's context.
func waitErrno(ctx context.Context, err error) syscall.Errno {
	switch {
	case err == nil:
		return 0
	case ctx.Err() != nil:
		return syscall.EINTR
	default:
		return syscall.EIO
	}
}

func (n *fileNode) attrs() []xattr {
	return []xattr{
		{name: "user.weightfs.version", value: n.version.Name()},
		{name: "user.weightfs.source", value: n.file.Source()},
		{name: "user.weightfs.residency", value: strings.Join(n.file.Residency(), ",")},
		{name: "user.weightfs.kind", value: n.file.Kind().String()},
	}
}

func (n *fileNode) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	n.m.count(opGetxattr)
	if attr == CUDAXattr {
		manifest, errno := n.m.handles(ctx, n.version, n.file)
		if errno != 0 {
			return 0, errno
		}
		return copyAttr(dest, manifest)
	}
	if attr == XXH3Xattr {
		sum, err := n.file.WaitChecksum(ctx)
		if errno := waitErrno(ctx, err); errno != 0 {
			return 0, errno
		}
		return copyAttr(dest, []byte(store.FormatChecksum(sum)))
	}
	return n.m.getxattr(ctx, dest, attr, n.attrs())
}

func (n *fileNode) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	n.m.count(opListxattr)
	attrs := append(n.attrs(), xattr{name: XXH3Xattr})
	if _, ok := n.m.manifest(n.file); ok {
		attrs = append(attrs, xattr{name: CUDAXattr})
	}
	return listxattr(dest, attrs)
}

// Ioctl answers IoctlCUDAManifest with the same JSON as user.weightfs.cuda,
// in a struct weightfs_cuda_manifest (docs/PROTOCOL.md).
func (n *fileNode) Ioctl(ctx context.Context, f gofs.FileHandle, cmd uint32, arg uint64, input, output []byte) (int32, syscall.Errno) {
	n.m.count(opIoctl)
	if cmd == IoctlRelease {
		if caller, ok := fuse.FromContext(ctx); ok {
			n.version.ReleaseHandles(int(caller.Pid))
		}
		return 0, 0
	}
	if cmd != IoctlCUDAManifest {
		return 0, syscall.ENOTTY
	}
	manifest, errno := n.m.handles(ctx, n.version, n.file)
	if errno != 0 {
		return 0, errno
	}
	if len(output) < ioctlHeader+len(manifest) {
		return 0, syscall.E2BIG
	}
	binary.LittleEndian.PutUint32(output[0:4], uint32(len(manifest)))
	binary.LittleEndian.PutUint32(output[4:8], 0)
	copy(output[ioctlHeader:], manifest)
	return 0, 0
}

// readHandle serves READ requests from the host image. Under passthrough the
// kernel never sends them; each one that arrives is counted.
type readHandle struct {
	m       *mount
	file    *store.File
	version *store.Version
}

var (
	_ gofs.FileReader   = (*readHandle)(nil)
	_ gofs.FileReleaser = (*readHandle)(nil)
)

func (h *readHandle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h.m.countRead(len(dest))
	// The open waited already, but for an O_DIRECT one: then only the
	// header, written at staging, is served before the host image is ready.
	// Every path that serves bytes stays behind the readiness.
	if off+int64(len(dest)) > h.file.HeaderBytes() {
		if errno := waitReady(ctx, h.file); errno != 0 {
			return nil, errno
		}
	}
	data := h.file.Bytes()
	if off >= int64(len(data)) {
		return fuse.ReadResultData(nil), 0
	}
	end := min(off+int64(len(dest)), int64(len(data)))
	return fuse.ReadResultData(data[off:end]), 0
}

func (h *readHandle) Release(ctx context.Context) syscall.Errno {
	h.m.counters.releases.Add(1)
	h.version.Release()
	return 0
}

// passthroughHandle hands the kernel the image's descriptor: reads and mmaps
// then go straight to the memory-backed file.
type passthroughHandle struct {
	*readHandle
}

var _ gofs.FilePassthroughFder = (*passthroughHandle)(nil)

func (h *passthroughHandle) PassthroughFd() (int, bool) {
	return h.file.BackingFd(), true
}

// xattr is one extended attribute of a node.
type xattr struct{ name, value string }

// getxattr answers a getxattr with the size-probe and ERANGE rules: a short
// (or empty) buffer gets the value's length and ERANGE, which go-fuse turns
// into the size answer for a probe. Unknown names get ENODATA, never ENOSYS,
// which would make the kernel stop asking for the whole mount.
func (m *mount) getxattr(ctx context.Context, dest []byte, name string, attrs []xattr) (uint32, syscall.Errno) {
	for _, a := range attrs {
		if a.name == name {
			return copyAttr(dest, []byte(a.value))
		}
	}
	return 0, syscall.ENODATA
}

func listxattr(dest []byte, attrs []xattr) (uint32, syscall.Errno) {
	var list []byte
	for _, a := range attrs {
		list = append(list, a.name...)
		list = append(list, 0)
	}
	return copyAttr(dest, list)
}

func copyAttr(dest, value []byte) (uint32, syscall.Errno) {
	if len(dest) < len(value) {
		return uint32(len(value)), syscall.ERANGE
	}
	return uint32(copy(dest, value)), 0
}
