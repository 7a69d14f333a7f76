package fs

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"unsafe"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/store"
)

// Tests that really mount, in-process with DirectMount, on a temporary
// directory.

// childMountEnv makes the test binary a daemon that mounts an empty store on
// the directory it names, says "mounted" and waits to be killed.
const childMountEnv = "WEIGHTFS_FS_TEST_CHILD_MOUNT"

func TestMain(m *testing.M) {
	if dir := os.Getenv(childMountEnv); dir != "" {
		st := store.New(store.OpenMemfdArena(), store.Options{Logger: quiet})
		if _, err := Mount(dir, st, Options{ForceCached: true, Logger: quiet}); err != nil {
			fmt.Println(err)
			os.Exit(1)
		}
		fmt.Println("mounted")
		select {}
	}
	os.Exit(m.Run())
}

func names(t testing.TB, dir string) string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	sort.Strings(out)
	return strings.Join(out, " ")
}

func TestMountTree(t *testing.T) {
	st := newStore(t)
	v1, m1 := loadModel(t, st, "m", 1)
	v2, m2 := loadModel(t, st, "m", 2)
	srv := mountStore(t, st, Options{})
	mnt := srv.Mountpoint()

	if got := names(t, mnt); got != ".weightfs m m@1 m@2" {
		t.Errorf("root lists %q", got)
	}
	if target, err := os.Readlink(filepath.Join(mnt, "m")); err != nil || target != "m@2" {
		t.Errorf("m -> %q, %v; want m@2", target, err)
	}
	var st1 unix.Stat_t
	if err := unix.Lstat(filepath.Join(mnt, "m"), &st1); err != nil || st1.Mode != syscall.S_IFLNK|0o777 || st1.Size != 3 || st1.Ino != st.Model("m").Ino() {
		t.Errorf("lstat m: %v, mode %o size %d ino %d", err, st1.Mode, st1.Size, st1.Ino)
	}
	if err := unix.Stat(mnt, &st1); err != nil || st1.Ino != 1 || st1.Mode != dirMode {
		t.Errorf("stat root: %v, ino %d mode %o", err, st1.Ino, st1.Mode)
	}
	for _, tc := range []struct{ dir, want string }{
		{"m@1", "config.json model.safetensors tokenizer"},
		{"m@1/tokenizer", "extra tokenizer.json"},
		{"m@2/tokenizer/extra", "merges.txt vocab.txt.bin"},
		{"m", "config.json model.safetensors tokenizer"},
		{".weightfs", "status.json versions"},
	} {
		if got := names(t, filepath.Join(mnt, tc.dir)); got != tc.want {
			t.Errorf("%s lists %q, want %q", tc.dir, got, tc.want)
		}
	}
	for _, tc := range []struct {
		dir   string
		ino   uint64
		nlink uint64
	}{
		{"m@1", v1.Root().Ino(), 3},
		{"m@2", v2.Root().Ino(), 3},
		{"m@1/tokenizer", 0, 3},
		{"m@1/tokenizer/extra", 0, 2},
	} {
		var s unix.Stat_t
		if err := unix.Stat(filepath.Join(mnt, tc.dir), &s); err != nil || s.Mode != dirMode || s.Nlink != tc.nlink || (tc.ino != 0 && s.Ino != tc.ino) {
			t.Errorf("stat %s: %v, mode %o nlink %d ino %d; want mode %o nlink %d ino %d", tc.dir, err, s.Mode, s.Nlink, s.Ino, dirMode, tc.nlink, tc.ino)
		}
	}
	// Files: exact sizes, no write bits, the store's inode numbers whichever
	// path reaches them, and the same at every stat.
	for _, tc := range []struct {
		v *store.Version
		m model
	}{{v1, m1}, {v2, m2}} {
		for _, p := range tc.m.paths() {
			f := storeFile(t, tc.v, p)
			paths := []string{filepath.Join(mnt, tc.v.Name(), p)}
			if tc.v == v2 {
				paths = append(paths, filepath.Join(mnt, "m", p))
			}
			for _, path := range append(paths, paths...) {
				var s unix.Stat_t
				if err := unix.Stat(path, &s); err != nil {
					t.Errorf("stat %s: %v", path, err)
					continue
				}
				if s.Mode != fileMode || s.Size != int64(len(tc.m[p])) || s.Ino != f.Ino() || s.Nlink != 1 || s.Uid != uint32(os.Getuid()) {
					t.Errorf("stat %s: mode %o size %d ino %d nlink %d uid %d; want mode %o size %d ino %d", path, s.Mode, s.Size, s.Ino, s.Nlink, s.Uid, fileMode, len(tc.m[p]), f.Ino())
				}
				if s.Blksize != blockSize {
					t.Errorf("stat %s: blksize %d", path, s.Blksize)
				}
			}
		}
	}
	err := filepath.WalkDir(mnt, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		if info.Mode()&os.ModeSymlink == 0 && info.Mode().Perm()&0o222 != 0 {
			t.Errorf("%s has write bits: %v", p, info.Mode())
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"nope", "m@3", "m@0", "m@01", "m@1/nope", "m@1/tokenizer/nope", ".weightfs/nope"} {
		if _, err := os.Lstat(filepath.Join(mnt, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("lstat %s: %v, want ENOENT", p, err)
		}
	}
	// A version loaded after the mount shows up at once (no negative cache).
	v3, _ := loadModel(t, st, "m", 3)
	if target, err := os.Readlink(filepath.Join(mnt, "m")); err != nil || target != "m@3" {
		t.Errorf("after a new load: m -> %q, %v; want m@3", target, err)
	}
	if _, err := os.Stat(filepath.Join(mnt, "m@3", "config.json")); err != nil {
		t.Errorf("m@3/config.json: %v", err)
	}
	if _, err := os.Stat(filepath.Join(mnt, v3.Name())); err != nil {
		t.Errorf("%s: %v", v3.Name(), err)
	}
}

// readModes are the read paths one suite runs over: passthrough on a memfd,
// passthrough on the huge-page tmpfs arena, and daemon reads (cached).
var readModes = []struct {
	name   string
	arena  func() (*store.Arena, error)
	cached bool
}{
	{"passthrough-memfd", func() (*store.Arena, error) { return store.OpenMemfdArena(), nil }, false},
	{"passthrough-tmpfs", func() (*store.Arena, error) { return store.OpenArena(0) }, false},
	{"cached", func() (*store.Arena, error) { return store.OpenMemfdArena(), nil }, true},
}

func TestMountReads(t *testing.T) {
	for _, mode := range readModes {
		t.Run(mode.name, func(t *testing.T) {
			requireFUSE(t)
			arena, err := mode.arena()
			if err != nil {
				t.Fatal(err)
			}
			st := newStoreOn(t, arena)
			_, m := loadModel(t, st, "m", 1)
			srv := mountStore(t, st, Options{ForceCached: mode.cached})
			want := Passthrough
			if mode.cached {
				want = Cached
				if srv.CachedReason() != "requested" {
					t.Errorf("CachedReason %q, want requested", srv.CachedReason())
				}
			} else if srv.Mode() != Passthrough {
				t.Skipf("skipping: the kernel refuses FUSE passthrough here: %s", srv.CachedReason())
			}
			if srv.Mode() != want {
				t.Fatalf("mode %v, want %v", srv.Mode(), want)
			}
			if srv.Mode() == Passthrough && srv.CachedReason() != "" {
				t.Errorf("CachedReason %q under passthrough", srv.CachedReason())
			}
			buf := make([]byte, 64)
			if n, err := unix.Getxattr(srv.Mountpoint(), "user.weightfs.readmode", buf); err != nil || string(buf[:n]) != want.String() {
				t.Errorf("user.weightfs.readmode = %q, %v; want %s", buf[:n], err, want)
			}
			dir := filepath.Join(srv.Mountpoint(), "m@1")
			opens := 0

			for _, p := range m.paths() {
				got, err := os.ReadFile(filepath.Join(dir, p))
				opens++
				if err != nil || !bytes.Equal(got, m[p]) {
					t.Errorf("read %s: %d bytes, %v; want the %d source bytes", p, len(got), err, len(m[p]))
				}
			}

			want1 := m[weightsFile]
			size := int64(len(want1))
			f, err := os.Open(filepath.Join(dir, weightsFile))
			if err != nil {
				t.Fatal(err)
			}
			opens++
			for _, tc := range []struct{ off, n, want int64 }{
				{0, 8, 8}, {4095, 2, 2}, {1 << 16, 1 << 18, 1 << 18}, {size - 3, 10, 3}, {size, 10, 0}, {size + 1<<20, 10, 0},
			} {
				b := make([]byte, tc.n)
				n, err := f.ReadAt(b, tc.off)
				if int64(n) != tc.want || (tc.want < tc.n) != (err == io.EOF) || !bytes.Equal(b[:n], want1[min(tc.off, size):min(tc.off, size)+int64(n)]) {
					t.Errorf("pread %d@%d: %d, %v; want %d bytes of the file", tc.n, tc.off, n, err, tc.want)
				}
			}

			// mmap, as safetensors loads.
			mem, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ, unix.MAP_SHARED)
			if err != nil {
				t.Fatalf("mmap: %v", err)
			}
			if !bytes.Equal(mem, want1) {
				t.Errorf("mmap differs from the source")
			}
			unix.Munmap(mem)
			f.Close()

			// O_DIRECT opens work and read the same bytes.
			fd, err := unix.Open(filepath.Join(dir, weightsFile), unix.O_RDONLY|unix.O_DIRECT, 0)
			if err != nil {
				t.Fatalf("open O_DIRECT: %v", err)
			}
			opens++
			aligned, err := unix.Mmap(-1, 0, int(size+4095)&^4095, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
			if err != nil {
				t.Fatal(err)
			}
			var got []byte
			for off := int64(0); ; {
				n, err := unix.Pread(fd, aligned[:1<<16], off)
				if err != nil {
					t.Fatalf("O_DIRECT pread at %d: %v", off, err)
				}
				if n == 0 {
					break
				}
				got = append(got, aligned[:n]...)
				off += int64(n)
			}
			unix.Munmap(aligned)
			unix.Close(fd)
			if !bytes.Equal(got, want1) {
				t.Errorf("O_DIRECT read %d bytes, differing from the %d source bytes", len(got), size)
			}

			c := srv.Counters()
			if c.Opens < uint64(opens) {
				t.Errorf("counted %d opens, made %d", c.Opens, opens)
			}
			if srv.Mode() == Passthrough {
				if c.DaemonReads != 0 || c.DaemonReadBytes != 0 || c.Requests["read"] != 0 {
					t.Errorf("passthrough: %d READs (%d bytes) reached the daemon, want 0", c.DaemonReads, c.DaemonReadBytes)
				}
			} else if c.DaemonReads == 0 || c.DaemonReadBytes < uint64(size) || c.Requests["read"] != c.DaemonReads {
				t.Errorf("cached: %d READs (%d bytes) reached the daemon; want the file's %d bytes at least", c.DaemonReads, c.DaemonReadBytes, size)
			}
			if c.Requests["lookup"] == 0 || c.Requests["open"] < uint64(opens) || c.Requests["getxattr"] == 0 {
				t.Errorf("requests %v", c.Requests)
			}
		})
	}
}

func TestMountReadOnly(t *testing.T) {
	st := newStore(t)
	loadModel(t, st, "m", 1)
	srv := mountStore(t, st, Options{})
	mnt := srv.Mountpoint()
	dir := filepath.Join(mnt, "m@1")
	file := filepath.Join(dir, "config.json")
	status := filepath.Join(mnt, ".weightfs", "status.json")
	open := func(path string, flags int) func() error {
		return func() error {
			fd, err := unix.Open(path, flags, 0o644)
			if err == nil {
				unix.Close(fd)
			}
			return err
		}
	}
	for _, tc := range []struct {
		name string
		op   func() error
	}{
		{"open for writing", open(file, unix.O_WRONLY)},
		{"open read-write", open(file, unix.O_RDWR)},
		{"open with O_TRUNC", open(file, unix.O_WRONLY|unix.O_TRUNC)},
		{"open weights read-write", open(filepath.Join(dir, weightsFile), unix.O_RDWR)},
		{"create in a version", open(filepath.Join(dir, "new"), unix.O_WRONLY|unix.O_CREAT)},
		{"create at the root", open(filepath.Join(mnt, "new"), unix.O_WRONLY|unix.O_CREAT)},
		{"O_TMPFILE", open(dir, unix.O_TMPFILE|unix.O_WRONLY)},
		{"write status.json", open(status, unix.O_WRONLY)},
		{"truncate", func() error { return unix.Truncate(file, 0) }},
		{"rename", func() error { return unix.Rename(file, filepath.Join(dir, "moved.json")) }},
		{"rename a version", func() error { return unix.Rename(dir, filepath.Join(mnt, "m@9")) }},
		{"unlink", func() error { return unix.Unlink(file) }},
		{"unlink the link", func() error { return unix.Unlink(filepath.Join(mnt, "m")) }},
		{"rmdir", func() error { return unix.Rmdir(filepath.Join(dir, "tokenizer")) }},
		{"mkdir", func() error { return unix.Mkdir(filepath.Join(dir, "d"), 0o755) }},
		{"symlink", func() error { return unix.Symlink("m@1", filepath.Join(mnt, "n")) }},
		{"link", func() error { return unix.Link(file, filepath.Join(dir, "hard")) }},
		{"mknod", func() error { return unix.Mknod(filepath.Join(dir, "fifo"), unix.S_IFIFO|0o644, 0) }},
		{"chmod", func() error { return unix.Chmod(file, 0o666) }},
		{"chown", func() error { return unix.Chown(file, 1, 1) }},
		{"utimes", func() error { return unix.UtimesNano(file, []unix.Timespec{{}, {}}) }},
		{"setxattr", func() error { return unix.Setxattr(file, "user.x", []byte("1"), 0) }},
		{"removexattr", func() error { return unix.Removexattr(file, "user.weightfs.version") }},
	} {
		if err := tc.op(); !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: %v, want EROFS", tc.name, err)
		}
	}
	if got, err := os.ReadFile(file); err != nil || len(got) == 0 {
		t.Errorf("config.json after the attempts: %d bytes, %v", len(got), err)
	}
}

func TestMountXattrIoctl(t *testing.T) {
	st := newStore(t)
	v, _ := loadModel(t, st, "m", 1)
	srv := mountStore(t, st, Options{})
	dir := filepath.Join(srv.Mountpoint(), "m@1")
	file := filepath.Join(dir, weightsFile)
	for _, tc := range []struct{ path, attr, want string }{
		{file, "user.weightfs.version", "m@1"},
		{file, "user.weightfs.source", storeFile(t, v, weightsFile).Source()},
		{file, "user.weightfs.residency", "host"},
		{file, "user.weightfs.kind", "weights"},
		{filepath.Join(dir, "config.json"), "user.weightfs.kind", "plain"},
		{dir, "user.weightfs.source", v.Source()},
		{filepath.Join(dir, "tokenizer"), "user.weightfs.version", "m@1"},
		{srv.Mountpoint(), "user.weightfs.readmode", srv.Mode().String()},
	} {
		// The size probe (size 0) answers the length.
		if n, err := unix.Getxattr(tc.path, tc.attr, nil); err != nil || n != len(tc.want) {
			t.Errorf("%s %s probe: %d, %v; want %d", tc.path, tc.attr, n, err, len(tc.want))
		}
		if _, err := unix.Getxattr(tc.path, tc.attr, make([]byte, len(tc.want)-1)); !errors.Is(err, syscall.ERANGE) {
			t.Errorf("%s %s short buffer: %v, want ERANGE", tc.path, tc.attr, err)
		}
		buf := make([]byte, 4096)
		if n, err := unix.Getxattr(tc.path, tc.attr, buf); err != nil || string(buf[:n]) != tc.want {
			t.Errorf("%s %s = %q, %v; want %q", tc.path, tc.attr, buf[:n], err, tc.want)
		}
	}
	// No replica: ENODATA, and asking twice still reaches the daemon (an
	// ENOSYS would have switched xattrs off for the mount).
	for i := 0; i < 2; i++ {
		for _, p := range []string{file, dir, srv.Mountpoint()} {
			if _, err := unix.Getxattr(p, CUDAXattr, make([]byte, 64)); !errors.Is(err, syscall.ENODATA) {
				t.Errorf("getxattr %s %s: %v, want ENODATA", p, CUDAXattr, err)
			}
		}
		if _, err := unix.Lgetxattr(filepath.Join(srv.Mountpoint(), "m"), "user.weightfs.version", make([]byte, 64)); !errors.Is(err, syscall.ENODATA) {
			t.Errorf("lgetxattr on the link: %v, want ENODATA", err)
		}
	}
	for _, tc := range []struct{ path, want string }{
		{file, "user.weightfs.kind user.weightfs.residency user.weightfs.source user.weightfs.version user.weightfs.xxh3"},
		{dir, "user.weightfs.source user.weightfs.version"},
		{srv.Mountpoint(), "user.weightfs.readmode"},
	} {
		n, err := unix.Listxattr(tc.path, nil)
		if err != nil {
			t.Fatalf("listxattr %s probe: %v", tc.path, err)
		}
		buf := make([]byte, n)
		if _, err := unix.Listxattr(tc.path, buf[:n-1]); !errors.Is(err, syscall.ERANGE) {
			t.Errorf("listxattr %s short buffer: %v, want ERANGE", tc.path, err)
		}
		n, err = unix.Listxattr(tc.path, buf)
		list := strings.Split(strings.TrimSuffix(string(buf[:n]), "\x00"), "\x00")
		sort.Strings(list)
		if err != nil || strings.Join(list, " ") != tc.want {
			t.Errorf("listxattr %s = %q, %v; want %q", tc.path, list, err, tc.want)
		}
	}

	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out := make([]byte, IoctlCUDAManifestSize)
	ioctl := func(cmd uint32) error {
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), uintptr(cmd), uintptr(unsafe.Pointer(&out[0])))
		if errno != 0 {
			return errno
		}
		return nil
	}
	if err := ioctl(IoctlCUDAManifest); !errors.Is(err, syscall.ENODATA) {
		t.Errorf("manifest ioctl without a replica: %v, want ENODATA", err)
	}
	if err := ioctl(2<<30 | 8<<16 | 'W'<<8 | 2); !errors.Is(err, syscall.ENOTTY) {
		t.Errorf("ioctl _IOR('W', 2, 8): %v, want ENOTTY", err)
	}
	c := srv.Counters()
	if c.HandleRequests != 3 || c.HandleDenials != 0 || c.Requests["ioctl"] != 2 {
		t.Errorf("handle requests %d, denials %d, ioctls %d; want 3, 0, 2", c.HandleRequests, c.HandleDenials, c.Requests["ioctl"])
	}
}

// lockedStatus is a status that the test changes under the mount.
type lockedStatus struct {
	mu sync.Mutex
	v  any
}

func (s *lockedStatus) Status() any {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.v
}

func (s *lockedStatus) set(v any) {
	s.mu.Lock()
	s.v = v
	s.mu.Unlock()
}

func TestMountStatus(t *testing.T) {
	src := &lockedStatus{v: map[string]any{"models": []string{"m"}, "read_mode": "passthrough"}}
	for _, tc := range []struct {
		name string
		src  StatusSource
		want []string // successive contents; the test sets src between them
		next []any
	}{
		{"no source", nil, []string{"{}\n"}, nil},
		{"source", src, []string{
			"{\n  \"models\": [\n    \"m\"\n  ],\n  \"read_mode\": \"passthrough\"\n}\n",
			"{\n  \"error\": \"json: unsupported type: func()\"\n}\n",
			"{\n  \"models\": []\n}\n",
		}, []any{func() {}, map[string][]int{"models": {}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := mountStore(t, newStore(t), Options{Status: tc.src})
			dir := filepath.Join(srv.Mountpoint(), ".weightfs")
			path := filepath.Join(dir, "status.json")
			var s unix.Stat_t
			if err := unix.Stat(dir, &s); err != nil || s.Mode != dirMode || s.Ino != statusDirIno {
				t.Errorf("stat .weightfs: %v, mode %o ino %d", err, s.Mode, s.Ino)
			}
			for i, want := range tc.want {
				if i > 0 {
					src.set(tc.next[i-1])
				}
				got, err := os.ReadFile(path)
				if err != nil || string(got) != want {
					t.Errorf("status.json #%d = %q, %v; want %q", i+1, got, err, want)
				}
				if !json.Valid(got) {
					t.Errorf("status.json #%d is not JSON: %q", i+1, got)
				}
				// The kernel keeps attributes for at least a jiffy (the
				// 1 ns timeout rounds up), so only the first size is sure.
				if err := unix.Stat(path, &s); err != nil || (i == 0 && s.Size != int64(len(want))) || s.Mode != fileMode || s.Ino != statusFileIno {
					t.Errorf("stat status.json #%d: %v, size %d mode %o ino %d; want size %d", i+1, err, s.Size, s.Mode, s.Ino, len(want))
				}
			}
		})
	}
}

func TestMountStatfs(t *testing.T) {
	st := newStore(t)
	loadModel(t, st, "m", 1)
	loadModel(t, st, "m", 2)
	srv := mountStore(t, st, Options{})
	stats := st.Stats()
	// Every path on the mount reports the same figures, as df expects.
	for _, p := range []string{"", "m@1", "m", "m@2/tokenizer", "m@1/config.json", "m@2/" + weightsFile, ".weightfs", ".weightfs/status.json"} {
		var s unix.Statfs_t
		if err := unix.Statfs(filepath.Join(srv.Mountpoint(), p), &s); err != nil {
			t.Errorf("statfs %q: %v", p, err)
			continue
		}
		if s.Bsize != 4096 || s.Frsize != 4096 || s.Blocks != uint64((stats.Bytes+4095)/4096) || s.Bfree != 0 || s.Files != uint64(stats.Files) || s.Namelen != 255 {
			t.Errorf("statfs %q: bsize %d blocks %d bfree %d files %d namelen %d; store holds %d bytes in %d files",
				p, s.Bsize, s.Blocks, s.Bfree, s.Files, s.Namelen, stats.Bytes, stats.Files)
		}
	}
	if srv.Counters().Requests["statfs"] == 0 {
		t.Errorf("no statfs counted")
	}
}

func TestMountUnload(t *testing.T) {
	for _, mode := range readModes {
		if mode.name == "passthrough-tmpfs" {
			continue
		}
		t.Run(mode.name, func(t *testing.T) {
			st := newStore(t)
			_, m1 := loadModel(t, st, "m", 1)
			_, m2 := loadModel(t, st, "m", 2)
			srv := mountStore(t, st, Options{ForceCached: mode.cached})
			mnt := srv.Mountpoint()
			// Open a file of m@1 and fill the kernel's caches with both versions.
			f, err := os.Open(filepath.Join(mnt, "m@1", weightsFile))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			for _, p := range []string{"m", "m@1/config.json", "m@2/config.json", "m@1/tokenizer/tokenizer.json"} {
				if _, err := os.Stat(filepath.Join(mnt, p)); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := st.Unload("m", 1); err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{"m@1", "m@1/config.json", "m@1/" + weightsFile} {
				if _, err := os.Lstat(filepath.Join(mnt, p)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("lstat %s after its unload: %v, want ENOENT", p, err)
				}
			}
			if got := names(t, mnt); got != ".weightfs m m@2" {
				t.Errorf("root lists %q after unloading m@1", got)
			}
			if got, err := os.ReadFile(filepath.Join(mnt, "m", "config.json")); err != nil || !bytes.Equal(got, m2["config.json"]) {
				t.Errorf("m/config.json after unloading m@1: %q, %v", got, err)
			}
			// The file open across the unload still reads, whole.
			got, err := io.ReadAll(f)
			if err != nil || !bytes.Equal(got, m1[weightsFile]) {
				t.Errorf("reading m@1 opened before its unload: %d bytes, %v; want the %d source bytes", len(got), err, len(m1[weightsFile]))
			}
			if d := st.Draining(); len(d) != 1 || d[0].Name() != "m@1" {
				t.Errorf("draining %v, want m@1", d)
			}

			if _, err := st.Unload("m", 0); err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{"m", "m@2", "m@2/config.json"} {
				if _, err := os.Lstat(filepath.Join(mnt, p)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("lstat %s after unloading m: %v, want ENOENT", p, err)
				}
			}
			if got := names(t, mnt); got != ".weightfs" {
				t.Errorf("root lists %q after unloading m", got)
			}
		})
	}
}

func mustMkdir(t testing.TB, dir string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

func TestPrepareMountpoint(t *testing.T) {
	requireFUSE(t)
	base := t.TempDir()

	plain := mustMkdir(t, filepath.Join(base, "plain"))
	file := filepath.Join(base, "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	// A bind mount, as a container's volume, with a space in its name.
	bind := mustMkdir(t, filepath.Join(base, "bind with space"))
	if err := unix.Mount(mustMkdir(t, filepath.Join(base, "bindsrc")), bind, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("bind mount: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(bind, unix.MNT_DETACH) })
	// A live weightfs.
	live := mountStore(t, newStore(t), Options{}).Mountpoint()
	// Another FUSE file system.
	other := mustMkdir(t, filepath.Join(base, "other"))
	otherSrv, err := gofs.Mount(other, &gofs.Inode{}, &gofs.Options{MountOptions: fuse.MountOptions{Name: "otherfs", DirectMount: true}})
	if err != nil {
		t.Fatalf("mount otherfs: %v", err)
	}
	t.Cleanup(func() { otherSrv.Unmount() })

	for _, tc := range []struct {
		name    string
		path    string
		fstype  string // "" for not mounted
		wantErr string // "" for success
	}{
		{"plain directory", plain, "", ""},
		{"bind mount", bind, "?", ""},
		{"live weightfs", live, "fuse.weightfs", "a running weightfs already serves it"},
		{"other FUSE", other, "fuse.otherfs", "another FUSE file system (fuse.otherfs)"},
		{"a file", file, "", "not a directory"},
		{"missing", filepath.Join(base, "missing"), "", "no such file or directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fstype, mounted, err := mountedFS(tc.path)
			if err != nil {
				t.Fatal(err)
			}
			switch tc.fstype {
			case "":
				if mounted {
					t.Errorf("mountedFS: %s mounted, want nothing", fstype)
				}
			case "?":
				if !mounted || strings.HasPrefix(fstype, "fuse") {
					t.Errorf("mountedFS: %q, %v; want a bind mount", fstype, mounted)
				}
			default:
				if !mounted || fstype != tc.fstype {
					t.Errorf("mountedFS: %q, %v; want %s", fstype, mounted, tc.fstype)
				}
			}
			err = prepareMountpoint(tc.path, quiet)
			if tc.wantErr == "" && err != nil || tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Errorf("prepareMountpoint: %v, want %q", err, tc.wantErr)
			}
		})
	}
	if _, err := Mount(live, newStore(t), Options{Logger: quiet}); err == nil || !strings.Contains(err.Error(), "already serves it") {
		t.Errorf("a second Mount on a live mount point: %v", err)
	}
	// A weightfs mounts over the bind mount, as mount(8) would.
	srv, err := Mount(bind, newStore(t), Options{Logger: quiet})
	if err != nil {
		t.Fatalf("mount over a bind mount: %v", err)
	}
	if got := names(t, bind); got != ".weightfs" {
		t.Errorf("mount over the bind mount lists %q", got)
	}
	unmount(t, srv)
	if fstype, mounted, err := mountedFS("/"); err != nil || !mounted || fstype == "" {
		t.Errorf("mountedFS(/) = %q, %v, %v", fstype, mounted, err)
	}
}

// TestStaleMount kills a daemon that holds a mount (a child process, killed
// with SIGKILL) and mounts again on the mount point it left stale.
func TestStaleMount(t *testing.T) {
	requireFUSE(t)
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childMountEnv+"="+dir)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if line != "mounted\n" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("child daemon: %q, %v", line, err)
	}
	cmd.Process.Kill()
	cmd.Wait()
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })

	if fstype, mounted, err := mountedFS(dir); err != nil || !mounted || fstype != "fuse.weightfs" {
		t.Fatalf("mountedFS after the kill: %q, %v, %v", fstype, mounted, err)
	}
	// The kernel may answer stat from its cache; statfs asks the daemon.
	var s unix.Statfs_t
	if err := unix.Statfs(dir, &s); !errors.Is(err, unix.ENOTCONN) {
		t.Fatalf("statfs of the stale mount point: %v, want ENOTCONN", err)
	}
	st := newStore(t)
	loadModel(t, st, "m", 1)
	srv, err := Mount(dir, st, Options{Logger: quiet})
	if err != nil {
		t.Fatalf("mount on the stale mount point: %v", err)
	}
	defer unmount(t, srv)
	if got := names(t, dir); got != ".weightfs m m@1" {
		t.Errorf("the new mount lists %q", got)
	}
}
