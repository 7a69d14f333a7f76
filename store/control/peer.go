package control

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Peer is the process at the other end of a control connection.
type Peer struct {
	Cred unix.Ucred
	// PushOnly: admitted by ListenOptions.PushUIDs/PushGIDs only, it may
	// push and do nothing else.
	PushOnly bool
}

type peerKey struct{}

// peerOf is the peer of the connection a request came on, when it came on
// a control socket (*Listener).
func peerOf(ctx context.Context) (Peer, bool) {
	p, ok := ctx.Value(peerKey{}).(Peer)
	return p, ok
}

// peerConn is an accepted connection with its peer; it stays a Unix
// connection (WriteMsgUnix) for the push's file descriptor.
type peerConn struct {
	*net.UnixConn
	peer Peer
}

// pushers are who may push without driving the daemon.
type pushers struct {
	uids, gids []uint32
	groupsOf   func(pid int32) ([]uint32, error) // supplementary groups
}

// may says whether cred may push. Supplementary groups are read from
// /proc/PID/status of the peer's pid, which could have exited (or, in
// theory, been reused) since it connected: a pid whose groups cannot be
// read is refused, never guessed.
func (p pushers) may(cred *unix.Ucred) (bool, error) {
	if slices.Contains(p.uids, cred.Uid) || slices.Contains(p.gids, cred.Gid) {
		return true, nil
	}
	if len(p.gids) == 0 {
		return false, nil
	}
	groups, err := p.groupsOf(cred.Pid)
	if err != nil {
		return false, err
	}
	for _, g := range groups {
		if slices.Contains(p.gids, g) {
			return true, nil
		}
	}
	return false, nil
}

// describe is what a refusal adds about pushing ("" without pushers).
func (p pushers) describe() string {
	var ids []string
	for _, u := range p.uids {
		ids = append(ids, fmt.Sprintf("uid %d", u))
	}
	for _, g := range p.gids {
		ids = append(ids, fmt.Sprintf("gid %d", g))
	}
	if len(ids) == 0 {
		return ""
	}
	return "; " + strings.Join(ids, ", ") + " may push"
}

// procGroups reads the supplementary groups of pid from /proc.
func procGroups(pid int32) ([]uint32, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return nil, fmt.Errorf("the groups of pid %d: %w", pid, err)
	}
	return parseGroups(b)
}

// parseGroups reads the "Groups:" line of a /proc/PID/status.
func parseGroups(status []byte) ([]uint32, error) {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), "Groups:")
		if !ok {
			continue
		}
		var out []uint32
		for _, f := range strings.Fields(rest) {
			g, err := strconv.ParseUint(f, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("a bad group %q in /proc status", f)
			}
			out = append(out, uint32(g))
		}
		return out, nil
	}
	return nil, fmt.Errorf("no Groups line in /proc status")
}

// guard answers 403 to a push-only peer's every request but POST /v1/push.
func (l *Listener) guard(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p, ok := peerOf(r.Context()); ok && p.PushOnly && (r.Method != http.MethodPost || r.URL.Path != "/v1/push") {
			l.logger().Warn("control socket: refused a request of a push-only peer", "socket", l.path, "pid", p.Cred.Pid,
				"uid", p.Cred.Uid, "request", r.Method+" "+r.URL.Path)
			writeJSON(w, http.StatusForbidden, errorAnswer{ErrorBody{Code: CodeForbidden, Message: fmt.Sprintf(
				"permission denied on the control socket %s: uid %d may only push (POST /v1/push, allowed by --push-allow-uid/--push-allow-gid), not %s %s",
				l.path, p.Cred.Uid, r.Method, r.URL.Path)}})
			return
		}
		h.ServeHTTP(w, r)
	})
}

// searchableByAll adds g+x and o+x to the socket's folder, so that pushers
// of other uids can reach the socket; it never adds more.
func searchableByAll(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if fi.Mode().Perm()&0o011 == 0o011 {
		return nil
	}
	if err := os.Chmod(dir, fi.Mode()|0o011); err != nil {
		return fmt.Errorf("let pushers reach the socket: %w", err)
	}
	return nil
}
