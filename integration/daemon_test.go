package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// buildDaemon builds the weightfs binary once per test binary run.
var buildDaemon = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "weightfs-bin-")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "weightfs")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/weightfs/weightfs/cmd/weightfs").CombinedOutput()
	if err != nil {
		return "", &buildError{out: string(out), err: err}
	}
	return bin, nil
})

type buildError struct {
	out string
	err error
}

func (e *buildError) Error() string { return e.err.Error() + ": " + e.out }

func daemonBinary(t testing.TB) string {
	t.Helper()
	bin, err := buildDaemon()
	if err != nil {
		t.Fatalf("build weightfs: %v", err)
	}
	return bin
}

// daemon is a weightfs process.
type daemon struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	output bytes.Buffer
	done   chan struct{}
}

// startDaemon starts the built daemon; a mount gets a state directory of
// its own unless args name one (never the machine's /run/weightfs).
func startDaemon(t testing.TB, args ...string) *daemon {
	t.Helper()
	if len(args) > 0 && args[0] == "mount" && !slices.Contains(args, "--state-dir") {
		args = append(args, "--state-dir", testStateDir(t))
	}
	d := &daemon{cmd: exec.Command(daemonBinary(t), args...), done: make(chan struct{})}
	pr, pw, err := os.Pipe()
	must(t, err)
	d.cmd.Stdout, d.cmd.Stderr = pw, pw
	must(t, d.cmd.Start())
	pw.Close()
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			d.mu.Lock()
			d.output.WriteString(sc.Text() + "\n")
			d.mu.Unlock()
		}
		d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		d.cmd.Process.Signal(syscall.SIGKILL)
		<-d.done
		if len(args) > 1 && args[0] == "mount" {
			// A killed daemon leaves its mount behind (ENOTCONN): detach it.
			unix.Unmount(args[1], unix.MNT_DETACH)
		}
	})
	return d
}

func (d *daemon) log() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.output.String()
}

// waitFor polls until cond holds or the daemon exits.
func (d *daemon) waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		if cond() {
			return
		}
		select {
		case <-d.done:
			t.Fatalf("daemon exited while waiting for %s:\n%s", what, d.log())
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("timed out waiting for %s:\n%s", what, d.log())
}

func isMounted(t testing.TB, dir string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	must(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == dir {
			return true
		}
	}
	return false
}

func TestDaemonKillAndRestart(t *testing.T) {
	requireFUSE(t)
	src := t.TempDir()
	writeModel(t, src, 8, 500)
	mnt := t.TempDir()
	file := filepath.Join(mnt, "m", "model-00001-of-00002.safetensors")
	want := mustRead(t, filepath.Join(src, "model-00001-of-00002.safetensors"))
	ready := func() bool { b, err := os.ReadFile(file); return err == nil && bytes.Equal(b, want) }

	sock := filepath.Join(t.TempDir(), "control.sock")
	first := startDaemon(t, "mount", mnt, "--model", "m="+src, "--socket", sock)
	first.waitFor(t, "the first daemon to serve", ready)
	must(t, first.cmd.Process.Signal(syscall.SIGKILL))
	<-first.done
	if _, err := os.Stat(file); err == nil {
		t.Fatal("mount still answers after SIGKILL")
	}

	second := startDaemon(t, "mount", mnt, "--model", "m="+src, "--socket", sock)
	second.waitFor(t, "the second daemon to serve on the stale mount point", ready)
	if !strings.Contains(second.log(), "stale") {
		t.Errorf("second daemon did not say it recovered a stale mount:\n%s", second.log())
	}

	// A clean stop unmounts.
	must(t, second.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-second.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("daemon did not exit on SIGTERM:\n%s", second.log())
	}
	if code := second.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("exit status %d after SIGTERM:\n%s", code, second.log())
	}
	if isMounted(t, mnt) {
		t.Errorf("%s still mounted after SIGTERM", mnt)
	}
}

func TestDaemonDemo(t *testing.T) {
	requireFUSE(t)
	mnt := t.TempDir()
	d := startDaemon(t, "mount", mnt, "--demo", "--socket", filepath.Join(t.TempDir(), "control.sock"))
	d.waitFor(t, "the demo model", func() bool {
		_, err := os.Stat(filepath.Join(mnt, "demo", "config.json"))
		return err == nil
	})
	for _, name := range []string{"config.json", "tokenizer.json", "model.safetensors.index.json",
		"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} {
		if _, err := os.Stat(filepath.Join(mnt, "demo", name)); err != nil {
			t.Errorf("demo model lacks %s: %v", name, err)
		}
	}
	d.waitFor(t, "the serving line", func() bool { return strings.Contains(d.log(), "serving") })
	must(t, d.cmd.Process.Signal(syscall.SIGINT))
	<-d.done
	if isMounted(t, mnt) {
		t.Errorf("%s still mounted after SIGINT", mnt)
	}
}

// TestCommandLineErrors: bad flags and paths get one clear line, exit
// status 2 for a usage mistake and 1 for a failure, before anything is
// mounted.
func TestCommandLineErrors(t *testing.T) {
	bin := daemonBinary(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	writeFile(t, file, "x")
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{}, 2, "Usage:"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"stauts"}, 2, `did you mean "status"?`},
		{[]string{"mount"}, 2, "usage: weightfs mount MOUNTPOINT"},
		{[]string{"mount", dir, "--nope"}, 2, "unknown flag: --nope"},
		{[]string{"mount", dir, "--model", "noequals"}, 2, "want NAME=PATH"},
		{[]string{"mount", dir, "--model", "a@b=" + dir}, 2, "must not contain"},
		{[]string{"mount", dir, "--model", "m=" + filepath.Join(dir, "missing")}, 2, "no such file or directory"},
		{[]string{"mount", dir, "--model", "m=" + file}, 2, "not a directory"},
		{[]string{"mount", filepath.Join(dir, "missing")}, 2, "no such file or directory"},
		{[]string{"mount", file}, 2, "not a directory"},
		{[]string{"mount", dir, "--model", "m=" + dir, "--model", "m=" + dir}, 2, "given twice"},
		{[]string{"mount", dir, "--log-format", "xml"}, 2, "want text or json"},
		{[]string{"mount", dir, "--host-memory", "lots"}, 2, "--host-memory"},
		{[]string{"mount", dir, "--host-memory", "120%"}, 2, "percentage"},
		{[]string{"mount", dir, "--host-memory", "1000Ti"}, 2, "more than the machine's RAM"},
		{[]string{"mount", dir, "--gpu-memory", "10Gi"}, 2, "--gpu-memory needs --gpu"},
		{[]string{"load", "x"}, 2, "usage: weightfs load NAME PATH"},
		{[]string{"unload"}, 2, "usage: weightfs unload NAME"},
		{[]string{"ls", "extra"}, 2, "usage: weightfs ls"},
		{[]string{"status", "--bogus"}, 2, "unknown flag: --bogus"},
		{[]string{"verify", "m", "--version", "x"}, 2, "--version"},
		{[]string{"ls", "--socket", filepath.Join(dir, "none.sock")}, 1, "no weightfs daemon at"},
		{[]string{"--socket", filepath.Join(dir, "none.sock"), "status"}, 1, "no weightfs daemon at"},
	}
	for _, c := range cases {
		var stdout, stderr bytes.Buffer
		cmd := exec.Command(bin, c.args...)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		cmd.Run()
		out := stderr.String()
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if code := cmd.ProcessState.ExitCode(); code != c.code || stdout.Len() != 0 {
			t.Errorf("weightfs %q: exit %d, stdout %q; want exit %d and nothing on stdout", c.args, code, stdout.String(), c.code)
		}
		if !strings.Contains(out, c.want) || (c.want != "Usage:" && (len(lines) != 1 || !strings.HasPrefix(out, "weightfs: ") ||
			strings.Contains(out, "weightfs: weightfs"))) {
			t.Errorf("weightfs %q printed %q; want one line with one prefix containing %q", c.args, out, c.want)
		}
	}
}

// TestDaemonJSONLogs: with --log-format json every line the daemon writes,
// on stdout and stderr, is one JSON object: mount, loads (one failing),
// go-fuse's own log (--debug), shutdown on SIGTERM.
func TestDaemonJSONLogs(t *testing.T) {
	requireFUSE(t)
	bad := t.TempDir()
	writeFile(t, filepath.Join(bad, "model.safetensors"), "not a safetensors file")
	mnt := t.TempDir()
	var stdout, stderr syncBuffer
	cmd := exec.Command(daemonBinary(t), "mount", mnt, "--log-format", "json", "--demo", "--model", "bad="+bad,
		"--debug", "--socket", filepath.Join(t.TempDir(), "control.sock"), "--state-dir", testStateDir(t))
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	must(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(stderr.String(), `"msg":"serving"`) {
		if time.Now().After(deadline) {
			t.Fatalf("no serving record:\n%s%s", stdout.String(), stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	mustRead(t, filepath.Join(mnt, "demo", "config.json"))
	must(t, cmd.Process.Signal(syscall.SIGTERM))
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("daemon exited with %v after SIGTERM", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("daemon did not exit on SIGTERM")
	}
	records := map[string]int{}
	for name, out := range map[string]string{"stdout": stdout.String(), "stderr": stderr.String()} {
		for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
			var rec struct{ Msg, Logger string }
			if line == "" && out == "" {
				continue
			}
			if err := json.Unmarshal([]byte(line), &rec); err != nil {
				t.Errorf("%s line is not one JSON object: %q", name, line)
			}
			records[rec.Msg]++
			if rec.Logger == "log" {
				records["go-fuse"]++
			}
		}
	}
	for _, msg := range []string{"loaded", "load failed", "serving", "unmounted", "go-fuse"} {
		if records[msg] == 0 {
			t.Errorf("no %q record in the daemon's output:\n%s", msg, stderr.String())
		}
	}
}

// syncBuffer is a bytes.Buffer safe for a process's writes and our reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}
func (b *syncBuffer) String() string { b.mu.Lock(); defer b.mu.Unlock(); return b.b.String() }
