package fs

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/weightfs/weightfs/store"
)

// TestMountRollbackAndRetention: a rollback moves the NAME symlink at once,
// and a version that retention drops leaves the mount at once while a file
// open on it still reads, then is freed at its close.
func TestMountRollbackAndRetention(t *testing.T) {
	st := store.New(store.OpenMemfdArena(), store.Options{Logger: quiet, KeepVersions: 2})
	t.Cleanup(func() { st.Close() })
	_, m1 := loadModel(t, st, "m", 1)
	_, m2 := loadModel(t, st, "m", 2)
	srv := mountStore(t, st, Options{ForceCached: true})
	mnt := srv.Mountpoint()
	link := filepath.Join(mnt, "m")

	for _, tc := range []struct {
		to     int
		target string
		config []byte
	}{
		{0, "m@1", m1["config.json"]},
		{2, "m@2", m2["config.json"]},
		{1, "m@1", m1["config.json"]},
	} {
		// Fill the kernel's caches with the link and a path through it.
		if _, err := os.ReadFile(filepath.Join(link, "config.json")); err != nil {
			t.Fatal(err)
		}
		if _, err := st.Rollback("m", tc.to); err != nil {
			t.Fatalf("rollback --to %d: %v", tc.to, err)
		}
		if got, err := os.Readlink(link); err != nil || got != tc.target {
			t.Errorf("after rollback --to %d: m -> %q, %v; want %s", tc.to, got, err, tc.target)
		}
		if got, err := os.ReadFile(filepath.Join(link, "config.json")); err != nil || !bytes.Equal(got, tc.config) {
			t.Errorf("after rollback --to %d: m/config.json %q, %v; want %s's", tc.to, got, err, tc.target)
		}
	}

	// m@1 is current and open; a load commits m@3, current, and retention
	// (2) drops m@1: gone from the mount, still readable where open.
	f, err := os.Open(filepath.Join(mnt, "m@1", weightsFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if got := names(t, mnt); got != ".weightfs m m@1 m@2" {
		t.Fatalf("root lists %q", got)
	}
	_, m3 := loadModel(t, st, "m", 3)
	for _, p := range []string{"m@1", "m@1/config.json", "m@1/" + weightsFile} {
		if _, err := os.Lstat(filepath.Join(mnt, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("lstat %s after retention dropped it: %v, want ENOENT", p, err)
		}
	}
	if got := names(t, mnt); got != ".weightfs m m@2 m@3" {
		t.Errorf("root lists %q after the load of m@3, want m@2 and m@3", got)
	}
	if got, err := os.Readlink(link); err != nil || got != "m@3" {
		t.Errorf("m -> %q, %v; want m@3", got, err)
	}
	if got, err := os.ReadFile(filepath.Join(link, "config.json")); err != nil || !bytes.Equal(got, m3["config.json"]) {
		t.Errorf("m/config.json %q, %v; want m@3's", got, err)
	}
	got, err := io.ReadAll(f)
	if err != nil || !bytes.Equal(got, m1[weightsFile]) {
		t.Errorf("reading m@1 opened before it was dropped: %d bytes, %v", len(got), err)
	}
	if d := st.Draining(); len(d) != 1 || d[0].Name() != "m@1" {
		t.Errorf("draining %v, want m@1", d)
	}
	f.Close() // the kernel releases the file after close returns
	for deadline := time.Now().Add(5 * time.Second); len(st.Draining()) != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("draining %v 5 s after the last close, want none", st.Draining())
		}
	}
}
