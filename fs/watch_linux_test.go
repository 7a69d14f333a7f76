package fs

import (
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

type readResult struct {
	line string
	err  error
	at   time.Time
}

// readAsync reads fd at off in a goroutine.
func readAsync(fd int, off int64) <-chan readResult {
	out := make(chan readResult, 1)
	go func() {
		b := make([]byte, 64)
		n, err := unix.Pread(fd, b, off)
		out <- readResult{string(b[:max(n, 0)]), err, time.Now()}
	}()
	return out
}

func waitRead(t *testing.T, ch <-chan readResult) readResult {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("a read of .weightfs/versions did not wake")
	}
	return readResult{}
}

func TestVersionsFile(t *testing.T) {
	st := newStore(t)
	srv := mountStore(t, st, Options{})
	loadModel(t, st, "m", 1)
	dir := filepath.Join(srv.mountpoint, statusDirName, versionsDirName)

	if got := names(t, dir); got != "m" {
		t.Fatalf("versions/ lists %q", got)
	}
	if _, err := os.Open(filepath.Join(dir, "nope")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("open of a model that does not exist: %v, want ENOENT", err)
	}
	fd, err := unix.Open(filepath.Join(dir, "m"), unix.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	b := make([]byte, 64)
	for range 2 { // offset 0 answers at once, every time
		if n, err := unix.Pread(fd, b, 0); err != nil || string(b[:n]) != "1\n" {
			t.Fatalf("read at 0: %q, %v", b[:n], err)
		}
	}
	// A short read takes the line in pieces.
	if n, _ := unix.Pread(fd, b[:1], 0); string(b[:n]) != "1" {
		t.Fatalf("1-byte read: %q", b[:n])
	}
	if n, _ := unix.Pread(fd, b, 1); string(b[:n]) != "\n" {
		t.Fatalf("rest of the line: %q", b[:n])
	}

	// A read at another offset blocks until a commit.
	ch := readAsync(fd, 2)
	time.Sleep(50 * time.Millisecond)
	select {
	case r := <-ch:
		t.Fatalf("the read did not block: %+v", r)
	default:
	}
	v2, _ := loadModel(t, st, "m", 2)
	r := waitRead(t, ch)
	if r.err != nil || r.line != "2\n" {
		t.Fatalf("after the commit: %q, %v", r.line, r.err)
	}
	t.Logf("commit → blocked reader awake: %v", r.at.Sub(v2.LoadedAt()))

	// Unloading the current version changes it back.
	ch = readAsync(fd, 4)
	time.Sleep(20 * time.Millisecond)
	start := time.Now()
	if _, err := st.Unload("m", 2); err != nil {
		t.Fatal(err)
	}
	r = waitRead(t, ch)
	if r.err != nil || r.line != "1\n" {
		t.Fatalf("after unloading 2: %q, %v", r.line, r.err)
	}
	t.Logf("unload → blocked reader awake: %v", r.at.Sub(start))

	// A timeout set by ioctl ends a blocked read with ETIMEDOUT.
	var ms [4]byte
	binary.LittleEndian.PutUint32(ms[:], 30)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), IoctlWatchTimeout, uintptr(unsafe.Pointer(&ms[0]))); e != 0 {
		t.Fatalf("ioctl: %v", e)
	}
	if r := waitRead(t, readAsync(fd, 6)); !errors.Is(r.err, syscall.ETIMEDOUT) {
		t.Fatalf("with a 30 ms timeout: %q, %v", r.line, r.err)
	}
	binary.LittleEndian.PutUint32(ms[:], 0)
	unix.Syscall(unix.SYS_IOCTL, uintptr(fd), IoctlWatchTimeout, uintptr(unsafe.Pointer(&ms[0])))

	// The model going ends the stream: EOF, then EOF again.
	ch = readAsync(fd, 6)
	time.Sleep(20 * time.Millisecond)
	if _, err := st.Unload("m", 0); err != nil {
		t.Fatal(err)
	}
	if r := waitRead(t, ch); r.err != nil || r.line != "" {
		t.Fatalf("after the model went: %q, %v, want EOF", r.line, r.err)
	}
	if r := waitRead(t, readAsync(fd, 6)); r.err != nil || r.line != "" {
		t.Fatalf("read after EOF: %q, %v", r.line, r.err)
	}
	if _, err := os.Open(filepath.Join(dir, "m")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("open after unload: %v, want ENOENT", err)
	}
}

// A reader killed while blocked leaves no goroutine behind; Unmount ends the
// blocked reads that remain.
func TestVersionsFileInterruptAndUnmount(t *testing.T) {
	st := newStore(t)
	srv := mountStore(t, st, Options{})
	loadModel(t, st, "m", 1)
	path := filepath.Join(srv.mountpoint, statusDirName, versionsDirName, "m")

	cat := exec.Command("cat", path)
	out, _ := cat.StdoutPipe()
	if err := cat.Start(); err != nil {
		t.Fatal(err)
	}
	line := make([]byte, 2)
	if _, err := out.Read(line); err != nil || string(line) != "1\n" {
		t.Fatalf("cat printed %q, %v", line, err)
	}
	for blockedVersionReads() == 0 { // cat's second read waits in the daemon
		time.Sleep(time.Millisecond)
	}
	cat.Process.Signal(syscall.SIGTERM)
	if err := cat.Wait(); err == nil {
		t.Fatal("cat should have died of SIGTERM")
	}
	// No read of the versions file may still wait once its reader died (go-fuse
	// may keep extra request goroutines of its own: count ours, not all).
	deadline := time.Now().Add(5 * time.Second)
	for blockedVersionReads() > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := blockedVersionReads(); n > 0 {
		t.Fatalf("%d reads of the versions file still wait after their reader died", n)
	}

	fd, err := unix.Open(path, unix.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if r := waitRead(t, readAsync(fd, 0)); r.line != "1\n" {
		t.Fatalf("read at 0: %q, %v", r.line, r.err)
	}
	ch := readAsync(fd, 2)
	time.Sleep(20 * time.Millisecond)
	if err := srv.Unmount(); err == nil {
		t.Fatal("unmount with a file open should fail (EBUSY)")
	}
	if r := waitRead(t, ch); r.err != nil || r.line != "" {
		t.Fatalf("a blocked read when the mount goes: %q, %v, want EOF", r.line, r.err)
	}
}

// blockedVersionReads counts the goroutines inside versionsHandle.Read.
func blockedVersionReads() int { return goroutinesIn("(*versionsHandle).Read(") }

// goroutinesIn counts the goroutines whose stack holds frame.
func goroutinesIn(frame string) int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), frame)
		}
		buf = make([]byte, 2*len(buf))
	}
}
