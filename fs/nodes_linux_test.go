package fs

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"strings"
	"syscall"
	"testing"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/weightfs/weightfs/store"
)

// Node-level tests: the tree is initialized by gofs.NewNodeFS without a
// kernel mount and the node methods are called directly, as go-fuse's own
// tests and stargz-snapshotter's do. They need neither root nor /dev/fuse.

// nodeTree builds a mount's root over st without mounting it.
func nodeTree(t testing.TB, st *store.Store, opts Options) *rootDir {
	t.Helper()
	m := newMount(st, opts, quiet)
	root := &rootDir{m: m, status: opts.Status}
	gofs.NewNodeFS(root, &gofs.Options{RootStableAttr: &gofs.StableAttr{Ino: 1}})
	return root
}

// lookupPath walks '/'-separated names from the root.
func lookupPath(t testing.TB, root *rootDir, path string) (gofs.InodeEmbedder, fuse.EntryOut) {
	t.Helper()
	var node gofs.InodeEmbedder = root
	var out fuse.EntryOut
	for _, name := range strings.Split(path, "/") {
		l, ok := node.(gofs.NodeLookuper)
		if !ok {
			t.Fatalf("lookup %s: %T is not a directory", path, node)
		}
		out = fuse.EntryOut{}
		child, errno := l.Lookup(context.Background(), name, &out)
		if errno != 0 {
			t.Fatalf("lookup %s: %v at %q", path, errno, name)
		}
		node = child.Operations()
	}
	return node, out
}

// caller is a request context carrying the caller's credentials, as go-fuse
// passes them to node methods.
func caller(uid, gid, pid uint32) context.Context {
	return fuse.NewContext(context.Background(), &fuse.Caller{Owner: fuse.Owner{Uid: uid, Gid: gid}, Pid: pid})
}

func TestSplitVersion(t *testing.T) {
	for _, tc := range []struct {
		entry  string
		name   string
		number int
		ok     bool
	}{
		{"m@1", "m", 1, true},
		{"qwen3-8b@12", "qwen3-8b", 12, true},
		{"a.b_c@7", "a.b_c", 7, true},
		{"x@y@2", "x@y", 2, true}, // the last '@' counts
		{"m", "", 0, false},
		{"m@", "", 0, false},
		{"@1", "", 0, false},
		{"m@0", "", 0, false},
		{"m@-1", "", 0, false},
		{"m@+1", "", 0, false},
		{"m@01", "", 0, false},
		{"m@1x", "", 0, false},
		{"m@ 1", "", 0, false},
		{"m@99999999999999999999999", "", 0, false},
		{".weightfs", "", 0, false},
	} {
		name, number, ok := splitVersion(tc.entry)
		if name != tc.name || number != tc.number || ok != tc.ok {
			t.Errorf("splitVersion(%q) = %q, %d, %v; want %q, %d, %v", tc.entry, name, number, ok, tc.name, tc.number, tc.ok)
		}
	}
}

func TestUnescapeMountinfo(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"/mnt/weightfs", "/mnt/weightfs"},
		{`/mnt/with\040space`, "/mnt/with space"},
		{`/a\011tab\012nl`, "/a\ttab\nnl"},
		{`/back\134slash`, `/back\slash`},
		{`/x\040\040y`, "/x  y"},
		{`/end\`, `/end\`},         // a lone backslash at the end stays
		{`/short\04`, `/short\04`}, // too short for an escape
		{`/bad\999`, `/bad\999`},   // not octal
		{`/big\777`, `/big\777`},   // more than a byte
		{"", ""},
	} {
		if got := unescapeMountinfo(tc.in); got != tc.want {
			t.Errorf("unescapeMountinfo(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestRenderStatus(t *testing.T) {
	type status struct {
		Mountpoint string `json:"mountpoint"`
		Models     []int  `json:"models"`
	}
	for _, tc := range []struct {
		name string
		src  StatusSource
		want string
	}{
		{"no source", nil, "{}\n"},
		{"nil status", StatusFunc(func() any { return nil }), "{}\n"},
		{"struct", StatusFunc(func() any { return status{Mountpoint: "/m", Models: []int{1, 2}} }),
			"{\n  \"mountpoint\": \"/m\",\n  \"models\": [\n    1,\n    2\n  ]\n}\n"},
		{"map", StatusFunc(func() any { return map[string]int{"b": 2, "a": 1} }), "{\n  \"a\": 1,\n  \"b\": 2\n}\n"},
		{"raw JSON", StatusFunc(func() any { return []any{"x"} }), "[\n  \"x\"\n]\n"},
		{"unmarshalable", StatusFunc(func() any { return make(chan int) }),
			"{\n  \"error\": \"json: unsupported type: chan int\"\n}\n"},
		{"panic", StatusFunc(func() any { panic("boom \"quoted\"") }),
			"{\n  \"error\": \"status: boom \\\"quoted\\\"\"\n}\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			src := tc.src
			if f, ok := src.(StatusFunc); ok {
				src = StatusFunc(func() any { calls++; return f() })
			}
			if got := string(renderStatus(src)); got != tc.want {
				t.Errorf("renderStatus = %q, want %q", got, tc.want)
			}
			if tc.src != nil && calls != 1 {
				t.Errorf("Status called %d times for one rendering, want 1", calls)
			}
		})
	}
}

func TestNodeTree(t *testing.T) {
	st := newStore(t)
	v1, m1 := loadModel(t, st, "m", 1)
	v2, _ := loadModel(t, st, "m", 2)
	root := nodeTree(t, st, Options{})

	// Stable inode numbers: the store's, whatever the path and however often.
	for _, tc := range []struct {
		path string
		ino  uint64
		mode uint32
		size uint64
	}{
		{"m@1", v1.Root().Ino(), dirMode, 4096},
		{"m@2", v2.Root().Ino(), dirMode, 4096},
		{"m@1/config.json", storeFile(t, v1, "config.json").Ino(), fileMode, uint64(len(m1["config.json"]))},
		{"m@1/" + weightsFile, storeFile(t, v1, weightsFile).Ino(), fileMode, uint64(len(m1[weightsFile]))},
		{"m@1/tokenizer/extra/merges.txt", storeFile(t, v1, "tokenizer/extra/merges.txt").Ino(), fileMode, uint64(len(m1["tokenizer/extra/merges.txt"]))},
		{"m", st.Model("m").Ino(), linkMode, uint64(len("m@2"))},
		{".weightfs", statusDirIno, dirMode, 0},
		{".weightfs/status.json", statusFileIno, fileMode, 3},
	} {
		for i := 0; i < 2; i++ {
			_, out := lookupPath(t, root, tc.path)
			if out.Ino != tc.ino || out.Mode != tc.mode || out.Size != tc.size {
				t.Errorf("lookup %s (#%d): ino %d mode %o size %d; want ino %d mode %o size %d",
					tc.path, i+1, out.Ino, out.Mode, out.Size, tc.ino, tc.mode, tc.size)
			}
			if out.Mode&0o222 != 0 && out.Mode&syscall.S_IFMT != syscall.S_IFLNK {
				t.Errorf("%s has write bits: %o", tc.path, out.Mode)
			}
		}
	}
	var out fuse.AttrOut
	if errno := root.Getattr(context.Background(), nil, &out); errno != 0 || out.Ino != 1 || out.Mode != dirMode {
		t.Errorf("root getattr: %v, ino %d mode %o", errno, out.Ino, out.Mode)
	}
	d, _ := lookupPath(t, root, "m@1")
	out = fuse.AttrOut{}
	if errno := d.(*dirNode).Getattr(context.Background(), nil, &out); errno != 0 || out.Nlink != 3 {
		t.Errorf("m@1 getattr: %v, nlink %d; want 3 (one subdirectory)", errno, out.Nlink)
	}
	link, _ := lookupPath(t, root, "m")
	if target, errno := link.(*modelLink).Readlink(context.Background()); errno != 0 || string(target) != "m@2" {
		t.Errorf("readlink m = %q, %v; want m@2", target, errno)
	}

	for _, name := range []string{"nope", "m@3", "m@0", "m@01", "nope@1", ".weightfs2"} {
		if _, errno := root.Lookup(context.Background(), name, &fuse.EntryOut{}); errno != syscall.ENOENT {
			t.Errorf("lookup %s: %v, want ENOENT", name, errno)
		}
	}
	if _, errno := d.(*dirNode).Lookup(context.Background(), "nope", &fuse.EntryOut{}); errno != syscall.ENOENT {
		t.Errorf("lookup m@1/nope: %v, want ENOENT", errno)
	}
	sd, _ := lookupPath(t, root, ".weightfs")
	if _, errno := sd.(*statusDir).Lookup(context.Background(), "other.json", &fuse.EntryOut{}); errno != syscall.ENOENT {
		t.Errorf("lookup .weightfs/other.json: %v, want ENOENT", errno)
	}

	// The link follows the current version; once the model is gone the
	// link reads as absent.
	if _, err := st.Unload("m", 2); err != nil {
		t.Fatal(err)
	}
	if target, errno := link.(*modelLink).Readlink(context.Background()); errno != 0 || string(target) != "m@1" {
		t.Errorf("after unloading m@2: readlink m = %q, %v; want m@1", target, errno)
	}
	if _, err := st.Unload("m", 0); err != nil {
		t.Fatal(err)
	}
	if _, errno := link.(*modelLink).Readlink(context.Background()); errno != syscall.ENOENT {
		t.Errorf("after unloading m: readlink m: %v, want ENOENT", errno)
	}
	for _, name := range []string{"m", "m@1", "m@2"} {
		if _, errno := root.Lookup(context.Background(), name, &fuse.EntryOut{}); errno != syscall.ENOENT {
			t.Errorf("lookup %s after unload: %v, want ENOENT", name, errno)
		}
	}
}

func readNames(t testing.TB, node gofs.InodeEmbedder) []string {
	t.Helper()
	ds, errno := node.(gofs.NodeReaddirer).Readdir(context.Background())
	if errno != 0 {
		t.Fatalf("readdir: %v", errno)
	}
	var names []string
	for ds.HasNext() {
		e, errno := ds.Next()
		if errno != 0 {
			t.Fatal(errno)
		}
		names = append(names, e.Name)
	}
	return names
}

func TestNodeReaddir(t *testing.T) {
	st := newStore(t)
	loadModel(t, st, "b", 1)
	loadModel(t, st, "a", 1)
	loadModel(t, st, "a", 2)
	root := nodeTree(t, st, Options{})
	for _, tc := range []struct {
		path string
		want string
	}{
		{"", ".weightfs a a@1 a@2 b b@1"},
		{"a@1", "config.json model.safetensors tokenizer"},
		{"a@2/tokenizer", "extra tokenizer.json"},
		{"a@2/tokenizer/extra", "merges.txt vocab.txt.bin"},
		{".weightfs", "status.json versions"},
		{".weightfs/versions", "a b"},
	} {
		var node gofs.InodeEmbedder = root
		if tc.path != "" {
			node, _ = lookupPath(t, root, tc.path)
		}
		if got := strings.Join(readNames(t, node), " "); got != tc.want {
			t.Errorf("readdir %q = %q, want %q", tc.path, got, tc.want)
		}
	}
}

func TestNodeOpenRead(t *testing.T) {
	st := newStore(t)
	v, m := loadModel(t, st, "m", 1)
	root := nodeTree(t, st, Options{})
	node, _ := lookupPath(t, root, "m@1/"+weightsFile)
	f := node.(*fileNode)
	ctx := context.Background()

	for _, flags := range []int{syscall.O_WRONLY, syscall.O_RDWR, syscall.O_RDONLY | syscall.O_TRUNC, syscall.O_WRONLY | syscall.O_CREAT} {
		if fh, _, errno := f.Open(ctx, uint32(flags)); errno != syscall.EROFS || fh != nil {
			t.Errorf("open with flags %#x: %v, want EROFS", flags, errno)
		}
	}

	// Cached: the daemon reads, the kernel keeps the pages across opens.
	fh, flags, errno := f.Open(ctx, syscall.O_RDONLY)
	if errno != 0 || flags&fuse.FOPEN_KEEP_CACHE == 0 {
		t.Fatalf("open: %v, flags %#x; want FOPEN_KEEP_CACHE", errno, flags)
	}
	if _, ok := fh.(gofs.FilePassthroughFder); ok {
		t.Errorf("a cached open returned a passthrough handle")
	}
	if v.OpenFiles() != 1 {
		t.Errorf("open files %d, want 1", v.OpenFiles())
	}
	want := m[weightsFile]
	size := int64(len(want))
	for _, tc := range []struct{ off, n, want int64 }{
		{0, 4096, 4096},
		{4095, 2, 2},
		{size - 10, 4096, 10},
		{size, 100, 0},
		{size + 4096, 100, 0},
		{0, size + 1, size},
	} {
		res, errno := fh.(gofs.FileReader).Read(ctx, make([]byte, tc.n), tc.off)
		if errno != 0 {
			t.Fatalf("read %d@%d: %v", tc.n, tc.off, errno)
		}
		got, _ := res.Bytes(make([]byte, tc.n))
		if int64(len(got)) != tc.want || !bytes.Equal(got, want[min(tc.off, size):min(tc.off+tc.want, size)]) {
			t.Errorf("read %d@%d: %d bytes, want %d of the file's", tc.n, tc.off, len(got), tc.want)
		}
	}
	if errno := fh.(gofs.FileReleaser).Release(ctx); errno != 0 || v.OpenFiles() != 0 {
		t.Errorf("release: %v, open files %d", errno, v.OpenFiles())
	}
	s := &Server{m: f.m}
	if c := s.Counters(); c.DaemonReads != 6 || c.Requests["read"] != 6 || c.Opens != 1 || c.Releases != 1 ||
		c.DaemonReadBytes != uint64(4096+2+4096+100+100+size+1) {
		t.Errorf("counters %+v", c)
	}

	// Passthrough: the handle hands the kernel the image's descriptor.
	f.m.mode.Store(int32(Passthrough))
	fh, flags, errno = f.Open(ctx, syscall.O_RDONLY)
	if errno != 0 || flags != 0 {
		t.Fatalf("passthrough open: %v, flags %#x", errno, flags)
	}
	pt, ok := fh.(gofs.FilePassthroughFder)
	if !ok {
		t.Fatalf("passthrough open returned %T", fh)
	}
	if fd, ok := pt.PassthroughFd(); !ok || fd != storeFile(t, v, weightsFile).BackingFd() || fd < 0 {
		t.Errorf("PassthroughFd = %d, %v; want the image's fd %d", fd, ok, storeFile(t, v, weightsFile).BackingFd())
	}
	// A READ that still arrives is served, counted and warned about once.
	if _, errno := fh.(gofs.FileReader).Read(ctx, make([]byte, 10), 0); errno != 0 || !f.m.warned.Load() {
		t.Errorf("read under passthrough: %v, warned %v", errno, f.m.warned.Load())
	}
	fh.(gofs.FileReleaser).Release(ctx)

	// After an unload with nothing open the version is freed: a node looked
	// up before cannot open it any more.
	if _, err := st.Unload("m", 1); err != nil {
		t.Fatal(err)
	}
	if fh, _, errno := f.Open(ctx, syscall.O_RDONLY); errno != syscall.ENOENT || fh != nil {
		t.Errorf("open after unload: %v, want ENOENT", errno)
	}
}

func TestNodeXattr(t *testing.T) {
	st := newStore(t)
	v, _ := loadModel(t, st, "m", 1)
	root := nodeTree(t, st, Options{})
	ctx := caller(0, 0, 0)
	fnode, _ := lookupPath(t, root, "m@1/"+weightsFile)
	cnode, _ := lookupPath(t, root, "m@1/config.json")
	dnode, _ := lookupPath(t, root, "m@1/tokenizer")
	type xattrNode interface {
		gofs.NodeGetxattrer
		gofs.NodeListxattrer
	}
	for _, tc := range []struct {
		what  string
		node  xattrNode
		attr  string
		value string
	}{
		{"file", fnode.(xattrNode), "user.weightfs.version", "m@1"},
		{"file", fnode.(xattrNode), "user.weightfs.source", storeFile(t, v, weightsFile).Source()},
		{"file", fnode.(xattrNode), "user.weightfs.residency", "host"},
		{"file", fnode.(xattrNode), "user.weightfs.kind", "weights"},
		{"config", cnode.(xattrNode), "user.weightfs.kind", "plain"},
		{"dir", dnode.(xattrNode), "user.weightfs.version", "m@1"},
		{"dir", dnode.(xattrNode), "user.weightfs.source", v.Source()},
		{"root", root, "user.weightfs.readmode", "cached"},
	} {
		// Size probe: an empty buffer gets the length and ERANGE, which
		// go-fuse turns into the answer to a size-0 getxattr.
		if n, errno := tc.node.Getxattr(ctx, tc.attr, nil); errno != syscall.ERANGE || n != uint32(len(tc.value)) {
			t.Errorf("%s %s probe: %d, %v; want %d, ERANGE", tc.what, tc.attr, n, errno, len(tc.value))
		}
		if len(tc.value) > 1 {
			if _, errno := tc.node.Getxattr(ctx, tc.attr, make([]byte, len(tc.value)-1)); errno != syscall.ERANGE {
				t.Errorf("%s %s short buffer: %v, want ERANGE", tc.what, tc.attr, errno)
			}
		}
		buf := make([]byte, 256)
		if n, errno := tc.node.Getxattr(ctx, tc.attr, buf); errno != 0 || string(buf[:n]) != tc.value {
			t.Errorf("%s %s = %q, %v; want %q", tc.what, tc.attr, buf[:n], errno, tc.value)
		}
	}
	for _, tc := range []struct {
		what string
		node xattrNode
		want string
	}{
		{"file", fnode.(xattrNode), "user.weightfs.version user.weightfs.source user.weightfs.residency user.weightfs.kind user.weightfs.xxh3"},
		{"dir", dnode.(xattrNode), "user.weightfs.version user.weightfs.source"},
		{"root", root, "user.weightfs.readmode"},
	} {
		n, errno := tc.node.Listxattr(ctx, nil)
		if errno != syscall.ERANGE {
			t.Errorf("%s listxattr probe: %v, want ERANGE", tc.what, errno)
		}
		buf := make([]byte, n)
		if m, errno := tc.node.Listxattr(ctx, buf); errno != 0 || m != n {
			t.Errorf("%s listxattr: %d, %v; want %d", tc.what, m, errno, n)
		}
		if got := strings.ReplaceAll(strings.TrimSuffix(string(buf), "\x00"), "\x00", " "); got != tc.want {
			t.Errorf("%s listxattr = %q, want %q", tc.what, got, tc.want)
		}
	}
	// Absent attributes are ENODATA, never ENOSYS (the kernel would stop
	// asking for the whole mount).
	for _, attr := range []string{CUDAXattr, "user.weightfs.nope", "security.selinux", "trusted.x"} {
		if _, errno := fnode.(xattrNode).Getxattr(ctx, attr, make([]byte, 64)); errno != syscall.ENODATA {
			t.Errorf("getxattr %s: %v, want ENODATA", attr, errno)
		}
		if _, errno := root.Getxattr(ctx, attr, make([]byte, 64)); errno != syscall.ENODATA {
			t.Errorf("root getxattr %s: %v, want ENODATA", attr, errno)
		}
	}
}

// withManifest makes every weights file of the mount look replicated.
func withManifest(root *rootDir, manifest string) {
	root.m.manifest = func(f *store.File) ([]byte, bool) {
		if f.Kind() != store.Weights {
			return nil, false
		}
		return []byte(manifest), true
	}
}

func TestHandlePermission(t *testing.T) {
	const manifest = `{"schema":1,"replicas":[]}`
	self := uint32(os.Getuid())
	for _, tc := range []struct {
		name          string
		opts          Options
		uid, gid, pid uint32
		noCaller      bool
		want          syscall.Errno
	}{
		{name: "default: root", uid: 0, gid: 0, want: 0},
		{name: "default: the daemon's uid", uid: self, gid: 4242, want: 0},
		{name: "default: another uid", uid: 4242, gid: 4242, want: syscall.EACCES},
		{name: "no caller", noCaller: true, want: syscall.EACCES},
		{name: "listed uid", opts: Options{AllowUIDs: []uint32{1000}}, uid: 1000, gid: 1000, want: 0},
		{name: "root stays allowed beside a list", opts: Options{AllowUIDs: []uint32{1000}}, uid: 0, gid: 0, want: 0},
		{name: "unlisted uid beside a list", opts: Options{AllowUIDs: []uint32{1000}}, uid: 1001, gid: 1001, want: syscall.EACCES},
		{name: "listed gid", opts: Options{AllowGIDs: []uint32{77}}, uid: 1234, gid: 77, want: 0},
		{name: "unlisted gid", opts: Options{AllowGIDs: []uint32{77}}, uid: 1234, gid: 78, want: syscall.EACCES},
		{name: "pid noted", uid: 0, pid: uint32(os.Getpid()), want: 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := newStore(t)
			v, _ := loadModel(t, st, "m", 1)
			root := nodeTree(t, st, tc.opts)
			withManifest(root, manifest)
			node, _ := lookupPath(t, root, "m@1/"+weightsFile)
			f := node.(*fileNode)
			ctx := caller(tc.uid, tc.gid, tc.pid)
			if tc.noCaller {
				ctx = context.Background()
			}
			buf := make([]byte, 1024)
			n, errno := f.Getxattr(ctx, CUDAXattr, buf)
			if errno != tc.want || (errno == 0 && string(buf[:n]) != manifest) {
				t.Errorf("getxattr: %q, %v; want %v", buf[:n], errno, tc.want)
			}
			out := make([]byte, IoctlCUDAManifestSize)
			if _, errno := f.Ioctl(ctx, nil, IoctlCUDAManifest, 0, nil, out); errno != tc.want {
				t.Errorf("ioctl: %v, want %v", errno, tc.want)
			}
			denials := uint64(0)
			if tc.want != 0 {
				denials = 2
			}
			c := (&Server{m: f.m}).Counters()
			if c.HandleRequests != 2 || c.HandleDenials != denials {
				t.Errorf("handle requests %d, denials %d; want 2, %d", c.HandleRequests, c.HandleDenials, denials)
			}
			holders := v.HandleHolders()
			if tc.pid != 0 && tc.want == 0 && (len(holders) != 1 || holders[0] != int(tc.pid)) {
				t.Errorf("handle holders %v, want [%d]", holders, tc.pid)
			}
			if tc.want != 0 && len(holders) != 0 {
				t.Errorf("a refused caller was noted as a handle holder: %v", holders)
			}
		})
	}
}

func TestIoctl(t *testing.T) {
	st := newStore(t)
	loadModel(t, st, "m", 1)
	root := nodeTree(t, st, Options{})
	node, _ := lookupPath(t, root, "m@1/"+weightsFile)
	f := node.(*fileNode)
	ctx := caller(0, 0, 0)
	out := make([]byte, IoctlCUDAManifestSize)

	// The number is _IOR('W', 1, struct of IoctlCUDAManifestSize bytes).
	cmd := uint32(IoctlCUDAManifest)
	if dir, size, typ, nr := cmd>>30, cmd>>16&0x3fff, cmd>>8&0xff, cmd&0xff; dir != 2 || size != IoctlCUDAManifestSize || typ != 'W' || nr != 1 {
		t.Errorf("IoctlCUDAManifest %#x: dir %d size %d type %c nr %d", cmd, dir, size, typ, nr)
	}
	if IoctlCUDAManifestSize > 16383 {
		t.Errorf("IoctlCUDAManifestSize %d exceeds what the kernel copies for a restricted ioctl", IoctlCUDAManifestSize)
	}
	// No replica: ENODATA, as for the attribute.
	if _, errno := f.Ioctl(ctx, nil, IoctlCUDAManifest, 0, nil, out); errno != syscall.ENODATA {
		t.Errorf("manifest ioctl without a replica: %v, want ENODATA", errno)
	}
	for _, cmd := range []uint32{0, cmd + 1, 2<<30 | 8<<16 | 'W'<<8 | 2, 0x5421 /* FIONBIO */} {
		if _, errno := f.Ioctl(ctx, nil, cmd, 0, nil, out); errno != syscall.ENOTTY {
			t.Errorf("ioctl %#x: %v, want ENOTTY", cmd, errno)
		}
	}

	const manifest = `{"schema":1,"file_size":604192}`
	withManifest(root, manifest)
	for i := range out {
		out[i] = 0xff
	}
	if _, errno := f.Ioctl(ctx, nil, IoctlCUDAManifest, 0, nil, out); errno != 0 {
		t.Fatalf("manifest ioctl: %v", errno)
	}
	n := binary.LittleEndian.Uint32(out[0:4])
	if n != uint32(len(manifest)) || binary.LittleEndian.Uint32(out[4:8]) != 0 || string(out[8:8+n]) != manifest {
		t.Errorf("ioctl answer: length %d reserved %#x json %q", n, out[4:8], out[8:8+min(n, 64)])
	}
	if _, errno := f.Ioctl(ctx, nil, IoctlCUDAManifest, 0, nil, make([]byte, 8+len(manifest)-1)); errno != syscall.E2BIG {
		t.Errorf("manifest ioctl into a short buffer: %v, want E2BIG", errno)
	}
	// The attribute is listed only while there is a replica.
	buf := make([]byte, 1024)
	n2, _ := f.Listxattr(ctx, buf)
	if !strings.Contains(string(buf[:n2]), CUDAXattr+"\x00") {
		t.Errorf("listxattr with a replica = %q, lacks %s", buf[:n2], CUDAXattr)
	}
}

func TestNodeStatus(t *testing.T) {
	st := newStore(t)
	n := 0
	root := nodeTree(t, st, Options{Status: StatusFunc(func() any { n++; return map[string]int{"n": n} })})
	node, out := lookupPath(t, root, ".weightfs/status.json")
	f := node.(*statusFile)
	ctx := context.Background()
	if out.Size != uint64(len("{\n  \"n\": 1\n}\n")) || out.Ino != statusFileIno {
		t.Errorf("lookup: size %d ino %d", out.Size, out.Ino)
	}
	if _, _, errno := f.Open(ctx, syscall.O_RDWR); errno != syscall.EROFS {
		t.Errorf("open read-write: %v, want EROFS", errno)
	}
	fh, flags, errno := f.Open(ctx, syscall.O_RDONLY)
	if errno != 0 || flags&fuse.FOPEN_DIRECT_IO == 0 {
		t.Fatalf("open: %v, flags %#x", errno, flags)
	}
	// Reads and getattr through the handle see the snapshot of the open.
	want := "{\n  \"n\": 2\n}\n"
	res, _ := fh.(gofs.FileReader).Read(ctx, make([]byte, 100), 0)
	if got, _ := res.Bytes(make([]byte, 100)); string(got) != want {
		t.Errorf("read %q, want %q", got, want)
	}
	res, _ = fh.(gofs.FileReader).Read(ctx, make([]byte, 100), 200)
	if got, _ := res.Bytes(make([]byte, 100)); len(got) != 0 {
		t.Errorf("read past the end: %q", got)
	}
	var attr fuse.AttrOut
	if errno := f.Getattr(ctx, fh, &attr); errno != 0 || attr.Size != uint64(len(want)) || n != 2 {
		t.Errorf("getattr with the handle: size %d after %d renderings", attr.Size, n)
	}
	if errno := f.Getattr(ctx, nil, &attr); errno != 0 || n != 3 {
		t.Errorf("getattr without a handle renders afresh: %d renderings", n)
	}
}

func TestStatfsNode(t *testing.T) {
	st := newStore(t)
	loadModel(t, st, "m", 1)
	loadModel(t, st, "n", 1)
	root := nodeTree(t, st, Options{})
	stats := st.Stats()
	var out fuse.StatfsOut
	if errno := root.Statfs(context.Background(), &out); errno != 0 {
		t.Fatal(errno)
	}
	if out.Bsize != 4096 || out.Blocks != uint64((stats.Bytes+4095)/4096) || out.Files != uint64(stats.Files) || out.Files != 10 || out.NameLen != 255 {
		t.Errorf("statfs %+v; store %+v", out, stats)
	}
}
