package integration

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testStateDir is a --state-dir for one test: the daemon mounts a tmpfs on
// its images folder, unmounted when the test ends (after the daemon is
// killed: cleanups run last registered first).
func testStateDir(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "state")
	t.Cleanup(func() { unix.Unmount(filepath.Join(dir, "images"), unix.MNT_DETACH) })
	return dir
}

// rchar is the bytes a process read through read(2) and its kin.
func rchar(t testing.TB, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/io")
	must(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "rchar: "); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			must(t, err)
			return n
		}
	}
	t.Fatalf("no rchar in /proc/%d/io", pid)
	return 0
}

// TestDaemonAdoptAfterKill: SIGKILL, then a restart with the same flags
// serves the same version, byte for byte, without reading the source; a
// changed source is re-read under the next number; a clean stop leaves no
// images and no manifest.
func TestDaemonAdoptAfterKill(t *testing.T) {
	requireFUSE(t)
	src := t.TempDir()
	writeModel(t, src, 11, 500_000) // a 64 MB shard
	var modelBytes int64
	want := map[string][]byte{}
	for rel, p := range sourceFiles(t, src) {
		want[rel] = mustRead(t, p)
		modelBytes += int64(len(want[rel]))
	}
	mnt, state := t.TempDir(), testStateDir(t)
	args := []string{"mount", mnt, "--model", "m=" + src, "--socket", filepath.Join(t.TempDir(), "control.sock"),
		"--state-dir", state}
	shard := "model-00001-of-00002.safetensors"
	served := func(version string) func() bool {
		return func() bool {
			target, err := os.Readlink(filepath.Join(mnt, "m"))
			return err == nil && target == version
		}
	}
	checkBytes := func(version string) {
		t.Helper()
		for rel, b := range want {
			sameBytes(t, rel, mustRead(t, filepath.Join(mnt, version, rel)), b)
		}
	}

	first := startDaemon(t, args...)
	first.waitFor(t, "the first daemon to serve m@1", served("m@1"))
	first.waitFor(t, "the manifest", func() bool { _, err := os.Stat(filepath.Join(state, "state.json")); return err == nil })
	checkBytes("m@1")
	must(t, first.cmd.Process.Signal(syscall.SIGKILL))
	<-first.done

	second := startDaemon(t, args...)
	second.waitFor(t, "the second daemon to serve", func() bool { return strings.Contains(second.log(), "serving") })
	read := rchar(t, second.cmd.Process.Pid)
	t.Logf("the restarted daemon read %d bytes; the model is %d", read, modelBytes)
	if !served("m@1")() || !strings.Contains(second.log(), "adopted") {
		t.Fatalf("m@1 not adopted:\n%s", second.log())
	}
	if read > modelBytes/100 {
		t.Errorf("the restarted daemon read %d bytes, more than 1%% of the model's %d: it re-read the source\n%s", read, modelBytes, second.log())
	}
	checkBytes("m@1")
	must(t, second.cmd.Process.Signal(syscall.SIGKILL))
	<-second.done

	// A changed source is re-read, under the next number.
	later := time.Now().Add(time.Minute)
	must(t, os.Chtimes(filepath.Join(src, shard), later, later))
	third := startDaemon(t, args...)
	third.waitFor(t, "the third daemon to re-read the changed source", served("m@2"))
	if !strings.Contains(third.log(), "dropped at start") || !strings.Contains(third.log(), shard) {
		t.Errorf("the drop is not logged with the changed file:\n%s", third.log())
	}
	if read := rchar(t, third.cmd.Process.Pid); read < modelBytes {
		t.Errorf("the changed source was read for %d bytes, want the model's %d", read, modelBytes)
	}
	checkBytes("m@2")

	// A clean stop leaves nothing.
	must(t, third.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-third.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("daemon did not exit on SIGTERM:\n%s", third.log())
	}
	if entries, err := os.ReadDir(filepath.Join(state, "images")); err == nil && len(entries) > 0 {
		t.Errorf("%d images left after a clean stop", len(entries))
	}
	if _, err := os.Stat(filepath.Join(state, "state.json")); !os.IsNotExist(err) {
		t.Errorf("manifest left after a clean stop: %v", err)
	}
}
