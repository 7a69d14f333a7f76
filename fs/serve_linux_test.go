package fs

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// serveMount mounts a store holding model "m" and runs Serve in the
// background; it returns the server, the signal channel Serve listens on
// and Serve's result.
func serveMount(t *testing.T) (srv *Server, sig chan os.Signal, done chan error) {
	t.Helper()
	requireFUSE(t)
	st := newStore(t)
	loadModel(t, st, "m", 1)
	srv, err := Mount(t.TempDir(), st, Options{Logger: quiet})
	if err != nil {
		t.Fatalf("mount: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(srv.Mountpoint(), unix.MNT_DETACH) })
	sig, done = make(chan os.Signal, 2), make(chan error, 1)
	go func() { done <- srv.Serve(sig) }()
	return srv, sig, done
}

func mounted(t *testing.T, dir string) bool {
	t.Helper()
	_, ok, err := mountedFS(dir)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// result waits for Serve to return; the test's own timeout catches a hang.
func result(done chan error) error { return <-done }

func TestServeUnmountsOnSignal(t *testing.T) {
	srv, sig, done := serveMount(t)
	sig <- os.Interrupt
	if err := result(done); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if mounted(t, srv.Mountpoint()) {
		t.Error("still mounted after the signal")
	}
	srv.Wait() // returns at once: the server has stopped
}

func TestServeDetachesWhileFilesAreOpen(t *testing.T) {
	for _, secondSignal := range []bool{false, true} {
		name := "last close unmounts"
		if secondSignal {
			name = "second signal quits"
		}
		t.Run(name, func(t *testing.T) {
			srv, sig, done := serveMount(t)
			f, err := os.Open(filepath.Join(srv.Mountpoint(), "m@1", weightsFile))
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			sig <- os.Interrupt
			// Detached: gone from the tree while the open file still reads.
			for mounted(t, srv.Mountpoint()) {
				time.Sleep(10 * time.Millisecond)
			}
			select {
			case err := <-done:
				t.Fatalf("Serve returned %v with a file open", err)
			default:
			}
			buf := make([]byte, 8)
			if _, err := f.ReadAt(buf, 0); err != nil {
				t.Fatalf("read after detach: %v", err)
			}
			if !secondSignal {
				f.Close()
				if err := result(done); err != nil {
					t.Fatalf("Serve: %v", err)
				}
				return
			}
			sig <- os.Interrupt
			if err := result(done); !errors.Is(err, ErrFilesOpen) {
				t.Fatalf("Serve = %v, want ErrFilesOpen", err)
			}
			// The kernel still serves the open file from the store: the
			// store may be freed only once the last file closed.
			if _, err := f.ReadAt(buf, 0); err != nil {
				t.Fatalf("read after quitting: %v", err)
			}
			f.Close()
			srv.Wait()
		})
	}
}

func TestServeUnmountedFromOutside(t *testing.T) {
	srv, _, done := serveMount(t)
	if err := unix.Unmount(srv.Mountpoint(), 0); err != nil {
		t.Fatal(err)
	}
	err := result(done)
	if err == nil || !strings.Contains(err.Error(), "unmounted from outside") {
		t.Fatalf("Serve = %v, want an error saying it was unmounted from outside", err)
	}
}

func TestReport(t *testing.T) {
	requireFUSE(t)
	st := newStore(t)
	loadModel(t, st, "m", 1)
	srv := mountStore(t, st, Options{ForceCached: true})
	if _, err := os.ReadFile(filepath.Join(srv.Mountpoint(), "m@1", "config.json")); err != nil {
		t.Fatal(err)
	}
	r := srv.Report()
	if r.Mountpoint != srv.Mountpoint() || r.ReadMode != "cached" || r.CachedReason != "requested" {
		t.Errorf("Report = %+v", r)
	}
	if r.DaemonReads == 0 || r.Requests["read"] != r.DaemonReads || r.Requests["open"] == 0 {
		t.Errorf("Report counters = reads %d, requests %v", r.DaemonReads, r.Requests)
	}
}
