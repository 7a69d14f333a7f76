package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/weightfs/weightfs/store"
)

// The control socket's own defences: its mode from the first moment, its
// folder, and the peer of every connection.

// TestSocketModeFromTheStart watches the socket's path while Listen runs
// again and again under umask 0 (the most permissive one): whenever the name
// exists it is a socket of mode 0600, and nothing else in the folder can be
// reached by others. Binding the name directly and then chmod-ing it shows
// the socket 0777 for a moment.
func TestSocketModeFromTheStart(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	sock := socketPath(t)
	dir := filepath.Dir(sock)

	var stop atomic.Bool
	var seen, bad atomic.Int64
	var mu sync.Mutex
	var problems []string
	report := func(format string, args ...any) {
		bad.Add(1)
		mu.Lock()
		defer mu.Unlock()
		if len(problems) < 5 {
			problems = append(problems, fmt.Sprintf(format, args...))
		}
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // the path itself, as fast as it can
		defer wg.Done()
		runtime.LockOSThread()
		for !stop.Load() {
			var st syscall.Stat_t
			if err := syscall.Lstat(sock, &st); err != nil {
				continue
			}
			seen.Add(1)
			if st.Mode&syscall.S_IFMT != syscall.S_IFSOCK || st.Mode&0o7777 != 0o600 {
				report("%s: mode %o", sock, st.Mode)
			}
		}
	}()
	go func() { // everything else in the folder: a way in for others?
		defer wg.Done()
		for !stop.Load() {
			entries, _ := os.ReadDir(dir)
			for _, e := range entries {
				p := filepath.Join(dir, e.Name())
				var st syscall.Stat_t
				if p == sock || syscall.Lstat(p, &st) != nil {
					continue
				}
				if st.Mode&syscall.S_IFMT != syscall.S_IFDIR || st.Mode&0o077 != 0 {
					report("%s: mode %o beside the socket", p, st.Mode)
				}
			}
		}
	}()
	for i := 0; i < 300 && bad.Load() == 0; i++ {
		l, err := Listen(sock)
		if err != nil {
			stop.Store(true)
			wg.Wait()
			t.Fatal(err)
		}
		l.Close()
	}
	stop.Store(true)
	wg.Wait()
	if bad.Load() != 0 {
		t.Errorf("under umask 0 the control socket's folder showed, %d times: %s", bad.Load(), strings.Join(problems, "; "))
	}
	if seen.Load() == 0 {
		t.Error("the watcher never saw the socket")
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("Listen and Close left %v in the socket's folder", entries)
	}
}

// TestSocketFolder: a folder others may write to, or that belongs to
// someone else, is refused, naming it and its mode; a missing one is created
// 0700 whatever the umask.
func TestSocketFolder(t *testing.T) {
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	base := filepath.Dir(socketPath(t))
	for _, mode := range []uint32{0o777, 0o770, 0o757, 0o1777, 0o2775} {
		dir := filepath.Join(base, fmt.Sprintf("m%o", mode))
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Chmod(dir, mode); err != nil {
			t.Fatal(err)
		}
		sock := filepath.Join(dir, "w.sock")
		l, err := Listen(sock)
		if err == nil {
			l.Close()
			t.Errorf("Listen in a folder of mode %o was accepted", mode)
			continue
		}
		if !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), fmt.Sprintf("mode %04o", mode)) ||
			!strings.Contains(err.Error(), "others can write") {
			t.Errorf("Listen in a folder of mode %04o: %v; want the folder, its mode and why", mode, err)
		}
		if _, err := os.Lstat(sock); !errors.Is(err, fs.ErrNotExist) {
			t.Errorf("a refused Listen left %s: %v", sock, err)
		}
	}
	// Created 0700, parents too, under umask 0.
	nested := filepath.Join(base, "new", "weightfs")
	l, err := Listen(filepath.Join(nested, "w.sock"))
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	for _, dir := range []string{nested, filepath.Dir(nested)} {
		if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
			t.Errorf("%s: %v %v, want a folder of mode 0700", dir, st.Mode(), err)
		}
	}
	// A folder of someone else's.
	if os.Geteuid() == 0 {
		dir := filepath.Join(base, "theirs")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dir, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		if l, err := Listen(filepath.Join(dir, "w.sock")); err == nil {
			l.Close()
			t.Error("Listen in a folder of uid 65534 was accepted")
		} else if !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "uid 65534") {
			t.Errorf("Listen in a folder of uid 65534: %v", err)
		}
	}
}

func chmod(t *testing.T, path string, mode os.FileMode) {
	t.Helper()
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

// TestListenKeepsOtherFiles: only a socket is ever replaced at the socket's
// path; a regular file there is refused and kept.
func TestListenKeepsOtherFiles(t *testing.T) {
	sock := socketPath(t)
	writeFile(t, sock, []byte("precious"))
	if l, err := Listen(sock); err == nil {
		l.Close()
		t.Error("Listen replaced a regular file")
	} else if !strings.Contains(err.Error(), sock) || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Listen over a regular file: %v", err)
	}
	if b, err := os.ReadFile(sock); err != nil || string(b) != "precious" {
		t.Errorf("the file at the socket's path: %q %v", b, err)
	}
	long := filepath.Join(filepath.Dir(sock), strings.Repeat("x", 100))
	if l, err := Listen(long); err == nil {
		l.Close()
		t.Error("Listen on a path too long for sun_path")
	} else if !strings.Contains(err.Error(), "too long") {
		t.Errorf("Listen on a long path: %v", err)
	}
}

// peerEnv names the socket the peer helper talks to when the test binary
// runs as that helper.
const peerEnv = "WEIGHTFS_TEST_PEER_SOCKET"

// TestPeerHelper is not a test: run by TestPeerCredentials as another uid,
// it asks the daemon for its status and to load a folder, and prints what
// came back.
func TestPeerHelper(t *testing.T) {
	sock := os.Getenv(peerEnv)
	if sock == "" {
		t.Skip("runs only as TestPeerCredentials' helper")
	}
	c := NewClient(sock)
	ctx := context.Background()
	var out peerResult
	out.UID = os.Geteuid()
	if _, err := c.Status(ctx); err != nil {
		out.Status = describe(err)
	}
	if _, err := c.Load(ctx, "stolen", os.Getenv(peerEnv+"_LOAD"), nil); err != nil {
		out.Load = describe(err)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

type peerResult struct {
	UID    int        `json:"uid"`
	Status *peerError `json:"status"` // nil: it worked
	Load   *peerError `json:"load"`
}

type peerError struct {
	HTTP       int    `json:"http"`
	Code       string `json:"code"`
	Message    string `json:"message"`
	Permission bool   `json:"permission"` // errors.Is(err, fs.ErrPermission)
}

func describe(err error) *peerError {
	out := &peerError{Message: err.Error(), Permission: errors.Is(err, fs.ErrPermission)}
	var e *Error
	if errors.As(err, &e) {
		out.HTTP, out.Code = e.Status, e.Code
	}
	return out
}

// asPeer runs the test binary's TestPeerHelper as uid and gid 65534 against
// sock (the binary is copied where that uid can run it).
func asPeer(t *testing.T, bin, sock, load string) peerResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "-test.run=^TestPeerHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), peerEnv+"="+sock, peerEnv+"_LOAD="+load, "GOCOVERDIR="+os.TempDir())
	cmd.Dir = filepath.Dir(bin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("the helper as uid 65534: %v\n%s%s", err, stdout.String(), stderr.String())
	}
	for _, line := range strings.Split(stdout.String(), "\n") {
		var r peerResult
		if json.Unmarshal([]byte(line), &r) == nil && r.UID != 0 {
			return r
		}
	}
	t.Fatalf("the helper printed no result:\n%s%s", stdout.String(), stderr.String())
	return peerResult{}
}

// peerBinary copies the test binary into a folder uid 65534 may enter.
func peerBinary(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a helper as uid 65534")
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "wfspeer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	chmod(t, dir, 0o755)
	bin := filepath.Join(dir, "control.test")
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// lockedBuffer collects a logger's output from several goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// TestPeerCredentials: a process of another uid that reaches the socket
// (its folder and mode opened up here, as a wrong umask or a chmod would)
// is refused on every request with 403 and an error naming its uid, the
// daemon logs its pid and uid, and nothing changes.
func TestPeerCredentials(t *testing.T) {
	bin := peerBinary(t)
	st := store.New(store.OpenMemfdArena(), store.Options{Logger: quiet})
	t.Cleanup(func() { st.Close() })
	srv := NewServer(st, Options{Logger: quiet})
	var logs lockedBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))

	sock := socketPath(t)
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); Serve(ctx, l, srv.Handler(), log, "control socket") }()
	t.Cleanup(func() { cancel(); <-done })
	chmod(t, filepath.Dir(sock), 0o755)
	chmod(t, sock, 0o666)
	model, _ := writeModel(t, 4096)
	chmod(t, filepath.Dir(model), 0o755)
	chmod(t, model, 0o755)

	r := asPeer(t, bin, sock, model)
	for what, e := range map[string]*peerError{"status": r.Status, "load": r.Load} {
		if e == nil {
			t.Errorf("uid 65534 was answered on %s", what)
			continue
		}
		if e.HTTP != http.StatusForbidden || e.Code != CodeForbidden || !e.Permission ||
			!strings.Contains(e.Message, "uid 65534") || !strings.Contains(e.Message, "permission denied on the control socket "+sock) {
			t.Errorf("uid 65534, %s: %+v; want 403 %s, permission denied naming the uid", what, e, CodeForbidden)
		}
	}
	if l := srv.List(); len(l.Models) != 0 {
		t.Errorf("a refused peer loaded %+v", l.Models)
	}
	text := logs.String()
	if strings.Count(text, "refused a connection") < 2 || !strings.Contains(text, "uid=65534") || !strings.Contains(text, "pid=") {
		t.Errorf("the daemon's log of refused peers:\n%s", text)
	}
	// Root and the daemon's uid are served.
	if _, err := NewClient(sock).Status(ctx); err != nil {
		t.Errorf("root refused: %v", err)
	}
}

// TestPeerAllowUIDs: a uid named in ListenOptions.AllowUIDs is served.
func TestPeerAllowUIDs(t *testing.T) {
	bin := peerBinary(t)
	st := store.New(store.OpenMemfdArena(), store.Options{Logger: quiet})
	t.Cleanup(func() { st.Close() })
	srv := NewServer(st, Options{Logger: quiet})
	sock := socketPath(t)
	l, err := ListenWith(sock, ListenOptions{AllowUIDs: []uint32{65534}, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); Serve(ctx, l, srv.Handler(), quiet, "control socket") }()
	t.Cleanup(func() { cancel(); <-done })
	chmod(t, filepath.Dir(sock), 0o755)
	chmod(t, sock, 0o666)
	r := asPeer(t, bin, sock, "relative")
	if r.Status != nil {
		t.Errorf("an allowed uid was refused its status: %+v", r.Status)
	}
	if r.Load == nil || r.Load.HTTP != http.StatusBadRequest {
		t.Errorf("an allowed uid's load of a missing folder: %+v; want 400", r.Load)
	}
}

// TestRefusedNotHTTP: a refused peer that does not speak HTTP is logged and
// closed.
func TestRefusedNotHTTP(t *testing.T) {
	var logs lockedBuffer
	sock := socketPath(t)
	l, err := ListenWith(sock, ListenOptions{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	l.allowed = func(uint32) bool { return false }
	go http.Serve(l, http.NotFoundHandler())
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("garbage\r\n\r\n"))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, err := io.ReadAll(c); len(b) != 0 || (err != nil && !errors.Is(err, syscall.ECONNRESET)) {
		t.Errorf("a refused peer speaking garbage got %q %v", b, err)
	}
	if !strings.Contains(logs.String(), "refused a connection") || !strings.Contains(logs.String(), fmt.Sprintf("uid=%d", os.Geteuid())) {
		t.Errorf("log: %s", logs.String())
	}
}

func TestDescribeUIDs(t *testing.T) {
	want := map[string]string{"": "root", "0": "root", "7 9": "root, uid 7 and uid 9"}
	if os.Geteuid() != 0 {
		self := fmt.Sprintf("uid %d", os.Geteuid())
		want = map[string]string{"": "root and " + self, "0": "root and " + self, "7 9": "root, " + self + ", uid 7 and uid 9"}
	}
	for extra, w := range want {
		var uids []uint32
		for _, f := range strings.Fields(extra) {
			var uid uint32
			fmt.Sscan(f, &uid)
			uids = append(uids, uid)
		}
		if got := describeUIDs(uids); got != w {
			t.Errorf("describeUIDs(%v) = %q, want %q", uids, got, w)
		}
	}
}

func TestAllowedUIDs(t *testing.T) {
	l := &Listener{}
	l.allowed = allowUIDs([]uint32{1234})
	for uid, ok := range map[uint32]bool{0: true, uint32(os.Geteuid()): true, 1234: true, 65534: os.Geteuid() == 65534, 1: false} {
		if l.allowed(uid) != ok {
			t.Errorf("uid %d allowed: %v, want %v", uid, !ok, ok)
		}
	}
}

// TestBadModelNames: names with control characters are refused through the
// API with 400 and a message quoting the name safely.
func TestBadModelNames(t *testing.T) {
	h := newHarness(t, store.Budgets{})
	dir, _ := writeModel(t, 4096)
	ctx := context.Background()
	for _, name := range []string{"a\nb", "evil\x1b[2J", "del\x7f", "tab\t", "c1\u0085"} {
		_, err := h.c.Load(ctx, name, dir, nil)
		var e *Error
		if !errors.As(err, &e) || e.Status != http.StatusBadRequest || e.Code != CodeInvalid || !errors.Is(err, store.ErrInvalid) ||
			!strings.Contains(e.Message, fmt.Sprintf("%q", name)) || strings.ContainsAny(e.Message, "\n\x1b\x7f\t\u0085") {
			t.Errorf("load as %q: %v; want 400 invalid quoting the name", name, err)
		}
		if _, err := h.c.Unload(ctx, name, 0); !errors.As(err, &e) || e.Status != http.StatusBadRequest {
			t.Errorf("unload of %q: %v; want 400", name, err)
		}
	}
	if l, err := h.c.List(ctx); err != nil || len(l.Models) != 0 {
		t.Errorf("after bad names: %+v %v", l, err)
	}
}

// TestClientRelativePath: the client resolves a relative path against its
// own working directory, not the daemon's.
func TestClientRelativePath(t *testing.T) {
	h := newHarness(t, store.Budgets{})
	dir, _ := writeModel(t, 4096)
	t.Chdir(filepath.Dir(dir))
	v, err := h.c.Load(context.Background(), "m", filepath.Base(dir), nil)
	if err != nil {
		t.Fatal(err)
	}
	if v.Source != dir {
		t.Errorf("source %q, want %q", v.Source, dir)
	}
}
