package integration

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
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

func startDaemon(t testing.TB, args ...string) *daemon {
	t.Helper()
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

// TestCommandLineErrors: bad flags and paths get one clear line and a
// non-zero exit, before anything is mounted.
func TestCommandLineErrors(t *testing.T) {
	bin := daemonBinary(t)
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	writeFile(t, file, "x")
	cases := []struct {
		args []string
		want string
	}{
		{[]string{}, "Usage"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"mount"}, "missing MOUNTPOINT"},
		{[]string{"mount", dir, "--nope"}, "unknown flag: --nope"},
		{[]string{"mount", dir, "--model", "noequals"}, "want NAME=PATH"},
		{[]string{"mount", dir, "--model", "a@b=" + dir}, "must not contain"},
		{[]string{"mount", dir, "--model", "m=" + filepath.Join(dir, "missing")}, "no such file or directory"},
		{[]string{"mount", dir, "--model", "m=" + file}, "not a directory"},
		{[]string{"mount", filepath.Join(dir, "missing")}, "no such file or directory"},
		{[]string{"mount", file}, "not a directory"},
		{[]string{"mount", dir, "--model", "m=" + dir, "--model", "m=" + dir}, "given twice"},
		{[]string{"mount", dir, "--log-format", "xml"}, "want text or json"},
		{[]string{"mount", dir, "--host-memory", "lots"}, "--host-memory"},
		{[]string{"mount", dir, "--host-memory", "120%"}, "percentage"},
		{[]string{"mount", dir, "--gpu-memory", "10GiB"}, "--gpu-memory needs --gpu"},
		{[]string{"load", "x"}, "usage: weightfs load NAME PATH"},
		{[]string{"unload"}, "usage: weightfs unload NAME"},
		{[]string{"ls", "extra"}, "usage: weightfs ls"},
		{[]string{"status", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"verify", "m", "--version", "x"}, "--version"},
		{[]string{"ls", "--socket", filepath.Join(dir, "none.sock")}, "no weightfs daemon at"},
	}
	for _, c := range cases {
		out, err := exec.Command(bin, c.args...).CombinedOutput()
		if err == nil {
			t.Errorf("weightfs %v succeeded", c.args)
			continue
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		if !strings.Contains(string(out), c.want) || (c.want != "Usage" && len(lines) != 1) {
			t.Errorf("weightfs %v printed %q; want one line containing %q", c.args, out, c.want)
		}
	}
}
