package integration

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"unsafe"

	nlp "github.com/nlpodyssey/safetensors"
	"golang.org/x/sys/unix"

	wfs "github.com/weightfs/weightfs/fs"
	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/safetensors"
)

// readModes runs the read-path suite over every way contents reach readers.
var readModes = []struct {
	name   string
	cached bool
}{
	{"passthrough", false},
	{"cached", true},
}

func TestReadPath(t *testing.T) {
	for _, mode := range readModes {
		t.Run(mode.name, func(t *testing.T) {
			m := mountStore(t, mode.cached)
			if !mode.cached && m.srv.Mode() != wfs.Passthrough {
				if strings.Contains(m.srv.CachedReason(), "does not offer") {
					t.Skipf("skipping: %s", m.srv.CachedReason())
				}
				t.Fatalf("passthrough requested but off: %s", m.srv.CachedReason())
			}
			src := t.TempDir()
			writeModel(t, src, 1, 40000) // a 5 MiB shard: several 1 MiB chunks
			m.load(t, "tiny", src)
			files := sourceFiles(t, src)
			if len(files) != 6 {
				t.Fatalf("source has %d files, want 6: %v", len(files), files)
			}
			dir := filepath.Join(m.dir, "tiny")

			t.Run("read", func(t *testing.T) {
				for rel, abs := range files {
					sameBytes(t, rel, mustRead(t, filepath.Join(dir, rel)), mustRead(t, abs))
				}
			})
			t.Run("mmap", func(t *testing.T) {
				for rel, abs := range files {
					sameBytes(t, rel+" (mmap)", mmapFile(t, filepath.Join(dir, rel)), mustRead(t, abs))
				}
			})
			t.Run("concurrent", func(t *testing.T) {
				var wg sync.WaitGroup
				errs := make(chan error, 64)
				for i := range 8 {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for rel, abs := range files {
							want, _ := os.ReadFile(abs)
							var got []byte
							if i%2 == 0 {
								got, _ = os.ReadFile(filepath.Join(dir, rel))
							} else {
								got = readStrided(filepath.Join(dir, rel), 4096+i*512)
							}
							if !bytes.Equal(got, want) {
								errs <- errors.New(rel + ": concurrent reader saw different bytes")
							}
						}
					}()
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Error(err)
				}
			})
			t.Run("O_DIRECT", func(t *testing.T) {
				rel := "model-00001-of-00002.safetensors"
				sameBytes(t, rel+" (O_DIRECT)", readDirect(t, filepath.Join(dir, rel)), mustRead(t, files[rel]))
			})
			t.Run("independent parser", func(t *testing.T) {
				for rel, abs := range files {
					if !strings.HasSuffix(rel, ".safetensors") {
						continue
					}
					compareTensors(t, mmapFile(t, filepath.Join(dir, rel)), mustRead(t, abs))
				}
			})
			t.Run("sizes and inodes", func(t *testing.T) {
				for rel, abs := range files {
					var a, b, s unix.Stat_t
					must(t, unix.Stat(filepath.Join(dir, rel), &a))
					must(t, unix.Stat(filepath.Join(m.dir, "tiny@1", rel), &b))
					must(t, unix.Stat(abs, &s))
					if a.Size != s.Size || a.Ino != b.Ino || a.Mode&0o777 != 0o444 {
						t.Errorf("%s: size %d (source %d), ino %d vs %d, mode %o", rel, a.Size, s.Size, a.Ino, b.Ino, a.Mode)
					}
				}
			})
			counters := m.srv.Counters()
			if !mode.cached && counters.DaemonReads != 0 {
				t.Errorf("passthrough: %d READ requests reached the daemon, want 0", counters.DaemonReads)
			}
			if mode.cached && counters.DaemonReads == 0 {
				t.Errorf("cached: no READ reached the daemon; the suite did not exercise the cached path")
			}
			t.Logf("mode %s: %+v", m.srv.Mode(), counters)
		})
	}
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// mmapFile maps a file read-only and copies out its bytes, touching every page.
func mmapFile(t testing.TB, path string) []byte {
	t.Helper()
	f, err := os.Open(path)
	must(t, err)
	defer f.Close()
	st, err := f.Stat()
	must(t, err)
	if st.Size() == 0 {
		return []byte{}
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	must(t, err)
	defer unix.Munmap(mem)
	return append([]byte(nil), mem...)
}

// readStrided reads a file in odd-sized pieces.
func readStrided(path string, piece int) []byte {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []byte
	buf := make([]byte, piece)
	for off := int64(0); ; off += int64(piece) {
		n, err := f.ReadAt(buf, off)
		out = append(out, buf[:n]...)
		if err == io.EOF || n == 0 {
			return out
		}
		if err != nil {
			return nil
		}
	}
}

// readDirect reads a whole file through an O_DIRECT descriptor into aligned
// buffers.
func readDirect(t testing.TB, path string) []byte {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT, 0)
	must(t, err)
	defer unix.Close(fd)
	const size = 1 << 20
	raw := make([]byte, size+4096)
	shift := int(4096 - uintptr(unsafe.Pointer(&raw[0]))%4096)
	buf := raw[shift%4096 : shift%4096+size]
	var out []byte
	for off := int64(0); ; {
		n, err := unix.Pread(fd, buf, off)
		if err != nil {
			t.Fatalf("O_DIRECT read %s at %d: %v", path, off, err)
		}
		if n == 0 {
			return out
		}
		out = append(out, buf[:n]...)
		off += int64(n)
	}
}

// compareTensors parses the mounted bytes with a parser nobody here wrote and
// compares every tensor with the source's, as our strict parser reads it.
func compareTensors(t testing.TB, mounted, source []byte) {
	t.Helper()
	st, err := nlp.Deserialize(mounted)
	if err != nil {
		t.Fatalf("independent parser rejects the mounted file: %v", err)
	}
	h, err := safetensors.Parse(source)
	must(t, err)
	if st.Len() != len(h.Tensors) {
		t.Fatalf("independent parser sees %d tensors, source has %d", st.Len(), len(h.Tensors))
	}
	for _, info := range h.Tensors {
		view, ok := st.Tensor(info.Name)
		if !ok {
			t.Fatalf("tensor %q missing on the mount", info.Name)
		}
		want := source[h.DataOffset()+info.Begin : h.DataOffset()+info.End]
		if !bytes.Equal(view.Data(), want) || view.DType().String() != string(info.DType) {
			t.Fatalf("tensor %q differs on the mount (%s)", info.Name, view.DType())
		}
		if len(view.Shape()) != len(info.Shape) {
			t.Fatalf("tensor %q: rank %d, want %d", info.Name, len(view.Shape()), len(info.Shape))
		}
	}
}

func TestTreeAndVersions(t *testing.T) {
	m := mountStore(t, false)
	src := t.TempDir()
	writeModel(t, src, 2, 64)
	m.load(t, "qwen", src)

	names := readDirNames(t, m.dir)
	if strings.Join(names, " ") != ".weightfs qwen qwen@1" {
		t.Fatalf("root lists %v, want [.weightfs qwen qwen@1]", names)
	}
	if target, err := os.Readlink(filepath.Join(m.dir, "qwen")); err != nil || target != "qwen@1" {
		t.Fatalf("qwen -> %q, %v; want qwen@1", target, err)
	}
	var before unix.Stat_t
	must(t, unix.Stat(filepath.Join(m.dir, "qwen@1", "config.json"), &before))

	writeJSON(t, filepath.Join(src, "config.json"), map[string]any{"model_type": "test", "version": 2})
	m.load(t, "qwen", src)
	if target, err := os.Readlink(filepath.Join(m.dir, "qwen")); err != nil || target != "qwen@2" {
		t.Fatalf("after a second load qwen -> %q, %v; want qwen@2", target, err)
	}
	if got := string(mustRead(t, filepath.Join(m.dir, "qwen", "config.json"))); !strings.Contains(got, `"version": 2`) {
		t.Fatalf("qwen/config.json is the old one: %s", got)
	}
	var after unix.Stat_t
	must(t, unix.Stat(filepath.Join(m.dir, "qwen@1", "config.json"), &after))
	if before.Ino != after.Ino {
		t.Errorf("qwen@1/config.json changed inode: %d → %d", before.Ino, after.Ino)
	}
	if got := strings.Join(readDirNames(t, filepath.Join(m.dir, "qwen@2")), " "); got !=
		"config.json model-00001-of-00002.safetensors model-00002-of-00002.safetensors model.safetensors.index.json original tokenizer.json" {
		t.Errorf("qwen@2 lists %s", got)
	}
	if _, err := os.Stat(filepath.Join(m.dir, "qwen@3")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("qwen@3: %v, want not exist", err)
	}

	var sfs unix.Statfs_t
	must(t, unix.Statfs(m.dir, &sfs))
	st := m.store.Stats()
	if int64(sfs.Blocks)*int64(sfs.Bsize) < st.Bytes || sfs.Files != uint64(st.Files) {
		t.Errorf("statfs: %d blocks of %d, %d files; store holds %d bytes in %d files", sfs.Blocks, sfs.Bsize, sfs.Files, st.Bytes, st.Files)
	}
}

func readDirNames(t testing.TB, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	must(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names
}

func TestReadOnly(t *testing.T) {
	m := mountStore(t, false)
	src := t.TempDir()
	writeModel(t, src, 3, 16)
	m.load(t, "ro", src)
	dir := filepath.Join(m.dir, "ro@1")
	file := filepath.Join(dir, "config.json")
	cases := []struct {
		name string
		op   func() error
	}{
		{"open for writing", func() error { f, err := os.OpenFile(file, os.O_WRONLY, 0); f.Close(); return err }},
		{"open read-write", func() error { f, err := os.OpenFile(file, os.O_RDWR, 0); f.Close(); return err }},
		{"truncate", func() error { return os.Truncate(file, 0) }},
		{"create", func() error { f, err := os.Create(filepath.Join(dir, "new")); f.Close(); return err }},
		{"create at root", func() error { f, err := os.Create(filepath.Join(m.dir, "new")); f.Close(); return err }},
		{"rename", func() error { return os.Rename(file, filepath.Join(dir, "moved.json")) }},
		{"remove", func() error { return os.Remove(file) }},
		{"mkdir", func() error { return os.Mkdir(filepath.Join(dir, "d"), 0o755) }},
		{"symlink", func() error { return os.Symlink("x", filepath.Join(m.dir, "link")) }},
		{"chmod", func() error { return os.Chmod(file, 0o666) }},
		{"setxattr", func() error { return unix.Setxattr(file, "user.x", []byte("1"), 0) }},
	}
	for _, c := range cases {
		if err := c.op(); !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: %v, want EROFS", c.name, err)
		}
	}
	sameBytes(t, "config.json after the attempts", mustRead(t, file), mustRead(t, filepath.Join(src, "config.json")))
}

func TestXattrs(t *testing.T) {
	m := mountStore(t, false)
	src := t.TempDir()
	writeModel(t, src, 4, 16)
	m.load(t, "x", src)
	file := filepath.Join(m.dir, "x", "model-00001-of-00002.safetensors")

	want := map[string]string{
		"user.weightfs.version":   "x@1",
		"user.weightfs.source":    filepath.Join(src, "model-00001-of-00002.safetensors"),
		"user.weightfs.residency": "host",
		"user.weightfs.kind":      "weights",
	}
	for name, value := range want {
		size, err := unix.Getxattr(file, name, nil) // the size probe
		if err != nil || size != len(value) {
			t.Errorf("%s: size probe %d, %v; want %d", name, size, err, len(value))
		}
		if len(value) > 1 {
			if _, err := unix.Getxattr(file, name, make([]byte, len(value)-1)); !errors.Is(err, syscall.ERANGE) {
				t.Errorf("%s: short buffer gave %v, want ERANGE", name, err)
			}
		}
		buf := make([]byte, 4096)
		n, err := unix.Getxattr(file, name, buf)
		if err != nil || string(buf[:n]) != value {
			t.Errorf("%s = %q, %v; want %q", name, buf[:n], err, value)
		}
	}
	if _, err := unix.Getxattr(file, "user.weightfs.nope", make([]byte, 64)); !errors.Is(err, syscall.ENODATA) {
		t.Errorf("unknown attribute: %v, want ENODATA", err)
	}
	size, err := unix.Listxattr(file, nil)
	must(t, err)
	list := make([]byte, size)
	_, err = unix.Listxattr(file, list)
	must(t, err)
	for name := range want {
		if !bytes.Contains(list, append([]byte(name), 0)) {
			t.Errorf("listxattr %q lacks %s", list, name)
		}
	}
	if size > 1 {
		if _, err := unix.Listxattr(file, make([]byte, size-1)); !errors.Is(err, syscall.ERANGE) {
			t.Errorf("listxattr short buffer: %v, want ERANGE", err)
		}
	}
	// Host-only: no CUDA manifest, by xattr or by ioctl; other ioctls: ENOTTY.
	if _, err := unix.Getxattr(file, wfs.CUDAXattr, make([]byte, 4096)); !errors.Is(err, syscall.ENODATA) {
		t.Errorf("%s on a host-only file: %v, want ENODATA", wfs.CUDAXattr, err)
	}
	f, err := os.Open(file)
	must(t, err)
	defer f.Close()
	out := make([]byte, wfs.IoctlCUDAManifestSize)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), wfs.IoctlCUDAManifest, uintptr(unsafe.Pointer(&out[0]))); errno != syscall.ENODATA {
		t.Errorf("manifest ioctl on a host-only file: %v, want ENODATA", errno)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), 0x80085702, uintptr(unsafe.Pointer(&out[0]))); errno != syscall.ENOTTY {
		t.Errorf("unknown ioctl: %v, want ENOTTY", errno)
	}
	// Unknown names again: the kernel must still ask (no ENOSYS latch).
	if n, err := unix.Getxattr(filepath.Join(m.dir, "x@1"), "user.weightfs.version", make([]byte, 64)); err != nil || n != 3 {
		t.Errorf("version dir xattr: %d, %v", n, err)
	}
}

// TestMountPointChecks: a bind mount (a container's volume) is mounted over;
// a live weightfs is never mounted over.
func TestMountPointChecks(t *testing.T) {
	requireFUSE(t)
	dir := t.TempDir()
	must(t, unix.Mount(dir, dir, "", unix.MS_BIND, ""))
	defer unix.Unmount(dir, unix.MNT_DETACH)
	arena, err := store.OpenArena(0)
	must(t, err)
	st := store.New(arena, store.Options{})
	defer st.Close()
	srv, err := wfs.Mount(dir, st, wfs.Options{})
	if err != nil {
		t.Fatalf("mount over a bind mount: %v", err)
	}
	defer srv.Unmount()
	if _, err := os.Stat(filepath.Join(dir, ".")); err != nil {
		t.Fatal(err)
	}
	st2 := store.New(store.OpenMemfdArena(), store.Options{})
	defer st2.Close()
	if srv2, err := wfs.Mount(dir, st2, wfs.Options{}); err == nil {
		srv2.Unmount()
		t.Fatal("mounted over a live weightfs")
	} else if !strings.Contains(err.Error(), "a running weightfs already serves it") {
		t.Errorf("second mount: %v", err)
	}
}
