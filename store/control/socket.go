package control

import (
	"bufio"
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
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/store"
)

// DefaultSocket is where the daemon listens unless told otherwise:
// $WEIGHTFS_SOCKET, /run/weightfs/weightfs.sock for root, else under
// $XDG_RUNTIME_DIR.
func DefaultSocket() string {
	if s := os.Getenv("WEIGHTFS_SOCKET"); s != "" {
		return s
	}
	if os.Geteuid() == 0 {
		return "/run/weightfs/weightfs.sock"
	}
	if dir := os.Getenv("XDG_RUNTIME_DIR"); dir != "" {
		return filepath.Join(dir, "weightfs", "weightfs.sock")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("weightfs-%d", os.Geteuid()), "weightfs.sock")
}

// ListenOptions configure the control socket.
type ListenOptions struct {
	// AllowUIDs may drive the daemon besides root and the daemon's own
	// (effective) uid, which always may.
	AllowUIDs []uint32
	// PushUIDs and PushGIDs may push (POST /v1/push) and do nothing else:
	// a peer whose uid is in PushUIDs, or whose primary or supplementary
	// group is in PushGIDs. With either set, the socket is mode 0666 and
	// its folder searchable by all (the peer check decides who is served).
	PushUIDs, PushGIDs []uint32
	// Logger receives refused connections (default: the logger Serve is
	// handed, else slog.Default()).
	Logger *slog.Logger
}

// Listener is the control socket. Its path appears with mode 0600 from the
// first moment, in a folder that only its owner (the daemon's user or root)
// can write; and the peer of every connection is checked (SO_PEERCRED)
// before the HTTP server sees it: only root, the daemon's uid and
// ListenOptions.AllowUIDs are served; anyone else is answered 403 with an
// Error naming their uid, and logged.
type Listener struct {
	ul      *net.UnixListener
	path    string
	file    os.FileInfo // the socket at path, to remove it only if it is still ours
	allowed func(uid uint32) bool
	allow   string // the allowed uids, for people
	pushers pushers
	log     atomic.Pointer[slog.Logger]
	once    sync.Once
	// credOf reads a connection's peer (SO_PEERCRED); tests fake it.
	credOf func(*net.UnixConn) (*unix.Ucred, error)
}

// Listen listens on the control socket at path with the default options.
func Listen(path string) (*Listener, error) { return ListenWith(path, ListenOptions{}) }

// ListenWith listens on the control socket at path. The socket's folder is
// created 0700 if missing and refused if others can write to it or it
// belongs to someone other than the daemon's user or root. A socket left by
// a daemon that died is replaced; a live one is never taken over, nor is
// anything at path that is not a socket.
//
// The socket is bound inside a fresh folder of mode 0700 beside path,
// chmod-ed to 0600 there (nobody else can reach it), and only then linked to
// path: the name appears with its final mode or not at all, whatever the
// umask (which is process-wide, so not changed here), and link(2), unlike
// rename(2), never replaces what another daemon put there meanwhile.
func ListenWith(path string, opts ListenOptions) (*Listener, error) {
	fail := func(err error) (*Listener, error) { return nil, fmt.Errorf("control socket %s: %w", path, err) }
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fail(err)
	}
	if err := checkFolder(dir); err != nil {
		return fail(err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return fail(fmt.Errorf("%s is there and is not a socket (%s): remove it or choose another --socket", path, fi.Mode()))
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return fail(errors.New("another weightfs daemon is listening there"))
		}
		if err := os.Remove(path); err != nil {
			return fail(fmt.Errorf("remove stale socket: %w", err))
		}
	}
	// sun_path holds 107 bytes and a NUL: the path and the hidden name.
	const maxPath = len(unix.RawSockaddrUnix{}.Path) - 1
	if hiddenLen := len(dir) + len("/.w4294967295/s"); len(path) > maxPath || hiddenLen > maxPath {
		return fail(fmt.Errorf("too long for a Unix socket: at most %d bytes, its folder at most %d", maxPath, maxPath-(hiddenLen-len(dir))))
	}
	hidden, err := os.MkdirTemp(dir, ".w")
	if err != nil {
		return fail(err)
	}
	defer os.RemoveAll(hidden)
	bound := filepath.Join(hidden, "s")
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: bound, Net: "unix"})
	if err != nil {
		return fail(err)
	}
	ul.SetUnlinkOnClose(false) // its name moves to path; Close removes that one
	mode := os.FileMode(0o600)
	if len(opts.PushUIDs)+len(opts.PushGIDs) > 0 {
		// Pushers are other users: they must reach and connect to it.
		mode = 0o666
		if err := searchableByAll(dir); err != nil {
			ul.Close()
			return fail(err)
		}
	}
	if err := os.Chmod(bound, mode); err != nil {
		ul.Close()
		return fail(err)
	}
	fi, err := os.Lstat(bound)
	if err == nil {
		err = os.Link(bound, path)
	}
	if err != nil {
		ul.Close()
		if errors.Is(err, fs.ErrExist) {
			return fail(errors.New("something took the path while this daemon started (another weightfs daemon?)"))
		}
		return fail(err)
	}
	l := &Listener{ul: ul, path: path, file: fi, allowed: allowUIDs(opts.AllowUIDs), allow: describeUIDs(opts.AllowUIDs),
		pushers: pushers{uids: opts.PushUIDs, gids: opts.PushGIDs, groupsOf: procGroups}, credOf: peerCred}
	if opts.Logger != nil {
		l.log.Store(opts.Logger)
	}
	return l, nil
}

// checkFolder refuses a socket folder others could use to replace the
// socket or its folder's contents: one that is not the daemon's user's or
// root's, or that its group or others can write to.
func checkFolder(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !fi.IsDir() || !ok {
		return fmt.Errorf("%s is not a folder", dir)
	}
	return store.CheckPrivateFolder("folder "+dir, st.Uid, st.Mode)
}

// allowUIDs: root, the daemon's effective uid and extra.
func allowUIDs(extra []uint32) func(uint32) bool {
	self := uint32(os.Geteuid())
	return func(uid uint32) bool {
		return uid == 0 || uid == self || slices.Contains(extra, uid)
	}
}

func describeUIDs(extra []uint32) string {
	names := []string{"root"}
	for _, uid := range append([]uint32{uint32(os.Geteuid())}, extra...) {
		if name := fmt.Sprintf("uid %d", uid); uid != 0 && !slices.Contains(names, name) {
			names = append(names, name)
		}
	}
	if len(names) == 1 {
		return names[0]
	}
	return strings.Join(names[:len(names)-1], ", ") + " and " + names[len(names)-1]
}

// Accept returns the next connection of an allowed peer. Refused peers are
// answered and closed on their own goroutine; a connection whose peer
// cannot be known is closed. Neither ends the accept loop.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.ul.AcceptUnix()
		if err != nil {
			return nil, err
		}
		cred, err := l.credOf(c)
		if err != nil {
			l.logger().Warn("control socket: closed a connection whose peer is unknown", "socket", l.path, "err", err)
			c.Close()
			continue
		}
		if l.allowed(cred.Uid) {
			return &peerConn{UnixConn: c, peer: Peer{Cred: *cred}}, nil
		}
		ok, err := l.pushers.may(cred)
		if err != nil {
			l.logger().Warn("control socket: could not read a peer's groups", "socket", l.path, "pid", cred.Pid, "uid", cred.Uid, "err", err)
		}
		if ok {
			return &peerConn{UnixConn: c, peer: Peer{Cred: *cred, PushOnly: true}}, nil
		}
		go l.refuse(c, cred)
	}
}

func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, credErr
}

// refuse logs a refused peer, reads its request and answers it 403 with an
// Error naming its uid.
func (l *Listener) refuse(c *net.UnixConn, cred *unix.Ucred) {
	defer c.Close()
	l.logger().Warn("control socket: refused a connection", "socket", l.path, "pid", cred.Pid, "uid", cred.Uid, "gid", cred.Gid, "allowed", l.allow)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	req, err := http.ReadRequest(bufio.NewReader(io.LimitReader(c, 1<<20)))
	if err != nil {
		return // not HTTP: closing is the answer
	}
	io.Copy(io.Discard, req.Body) // so that closing does not reset the connection under the answer
	body, _ := json.Marshal(errorAnswer{ErrorBody{Code: CodeForbidden, Message: fmt.Sprintf(
		"permission denied on the control socket %s: uid %d may not drive this daemon (only %s may%s)", l.path, cred.Uid, l.allow, l.pushers.describe())}})
	resp := &http.Response{StatusCode: http.StatusForbidden, ProtoMajor: 1, ProtoMinor: 1, Request: req, Close: true,
		Header:        http.Header{"Content-Type": {"application/json"}},
		ContentLength: int64(len(body)), Body: io.NopCloser(bytes.NewReader(body))}
	resp.Write(c)
}

func (l *Listener) logger() *slog.Logger {
	if log := l.log.Load(); log != nil {
		return log
	}
	return slog.Default()
}

// Close stops listening and removes the socket, if its path is still this
// listener's.
func (l *Listener) Close() error {
	err := l.ul.Close()
	l.once.Do(func() {
		if fi, err := os.Lstat(l.path); err == nil && os.SameFile(fi, l.file) {
			os.Remove(l.path)
		}
	})
	return err
}

// Addr is the socket's path.
func (l *Listener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

// Serve serves h on l until ctx ends; what names the listener in the log.
// A control socket (*Listener) without a logger of its own logs the peers it
// refuses to log.
func Serve(ctx context.Context, l net.Listener, h http.Handler, log *slog.Logger, what string) {
	if cl, ok := l.(*Listener); ok {
		cl.log.CompareAndSwap(nil, log) // refused peers are logged with the rest
	}
	s := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	if cl, ok := l.(*Listener); ok {
		s.Handler = cl.guard(h)
		s.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
			if pc, ok := c.(*peerConn); ok {
				return context.WithValue(ctx, peerKey{}, pc.peer)
			}
			return ctx
		}
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		s.Shutdown(sctx)
	}()
	if err := s.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error(what+" stopped", "err", err)
	}
}
