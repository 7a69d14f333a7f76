package control

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"
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

// Listen listens on the control socket, mode 0600, replacing a socket left by
// a daemon that died but refusing to take over a live one.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if _, err := os.Lstat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("control socket %s: another weightfs daemon is listening there", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("control socket %s: remove stale socket: %w", path, err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return l, nil
}

// Serve serves h on l until ctx ends; what names the listener in the log.
func Serve(ctx context.Context, l net.Listener, h http.Handler, log *slog.Logger, what string) {
	s := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
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
