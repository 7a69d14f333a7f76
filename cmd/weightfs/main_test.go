package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/control"
	"github.com/weightfs/weightfs/store/safetensors"
)

// weightfs runs the command line in process.
func weightfs(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(context.Background(), args, &out, &errOut)
	return out.String(), errOut.String(), code
}

// oneLineError checks that stderr is one line with one "weightfs: " prefix.
func oneLineError(t *testing.T, args []string, stderr, want string) {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
	if len(lines) != 1 || !strings.HasPrefix(stderr, "weightfs: ") || strings.Contains(stderr, "weightfs: weightfs") ||
		!strings.Contains(stderr, want) {
		t.Errorf("weightfs %q wrote %q to stderr; want one line with one prefix containing %q", args, stderr, want)
	}
}

func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}, {"ls", "--help"}, {"help", "ls"}, {"help", "list"},
		{"mount", "--help"}, {"help", "mount"}, {"--socket", "/x", "status", "--help"}, {"completion", "--help"}} {
		stdout, stderr, code := weightfs(t, args...)
		if code != 0 || stderr != "" || strings.Count(stdout, "Usage:") != 1 {
			t.Errorf("weightfs %q: exit %d, stdout %q, stderr %q; want help once on stdout, exit 0", args, code, stdout, stderr)
		}
	}
	stdout, _, _ := weightfs(t, "help", "mount")
	for _, flag := range []string{"--model", "--gpu", "--host-memory", "--gpu-memory", "--socket", "--json", "--log-format", "Gi"} {
		if !strings.Contains(stdout, flag) {
			t.Errorf("weightfs help mount does not mention %s:\n%s", flag, stdout)
		}
	}
	// No command at all is a usage mistake: help on stderr, exit 2.
	stdout, stderr, code := weightfs(t)
	if code != 2 || stdout != "" || strings.Count(stderr, "Usage:") != 1 {
		t.Errorf("weightfs: exit %d, stdout %q, stderr %q; want help on stderr, exit 2", code, stdout, stderr)
	}
}

func TestCompletion(t *testing.T) {
	for shell, want := range map[string]string{"bash": "complete -o default -F __start_weightfs weightfs",
		"zsh": "#compdef weightfs", "fish": "complete -c weightfs"} {
		stdout, stderr, code := weightfs(t, "completion", shell)
		if code != 0 || stderr != "" || !strings.Contains(stdout, want) {
			t.Errorf("weightfs completion %s: exit %d, stderr %q, script lacks %q", shell, code, stderr, want)
		}
	}
	_, stderr, code := weightfs(t, "completion", "tcsh")
	if code != 2 {
		t.Errorf("weightfs completion tcsh: exit %d; want 2", code)
	}
	oneLineError(t, []string{"completion", "tcsh"}, stderr, `unknown command "tcsh"`)
	// Completion of a subcommand's name and of mount's folder argument.
	stdout, _, _ := weightfs(t, "__complete", "sta")
	if !strings.Contains(stdout, "status") {
		t.Errorf("completing \"sta\" gave %q", stdout)
	}
}

func TestVersion(t *testing.T) {
	stdout, stderr, code := weightfs(t, "--version")
	if code != 0 || stderr != "" || !strings.HasPrefix(stdout, "weightfs dev\n") ||
		!strings.Contains(stdout, "module:  github.com/weightfs/weightfs") || !strings.Contains(stdout, "commit:  ") {
		t.Errorf("weightfs --version: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

func TestUsageErrors(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"stauts"}, `unknown command "stauts" (did you mean "status"?)`},
		{[]string{"lst"}, `did you mean "ls"?`},
		{[]string{"--nope"}, "unknown flag: --nope"},
		{[]string{"help", "stauts"}, `did you mean "status"?`},
		{[]string{"load", "x"}, "usage: weightfs load NAME PATH"},
		{[]string{"load", "a@b", dir}, "must not contain"},
		{[]string{"unload"}, "usage: weightfs unload NAME"},
		{[]string{"unload", "m", "--version", "-1"}, "want a version number"},
		{[]string{"rollback"}, "usage: weightfs rollback NAME [--to N]"},
		{[]string{"rollback", "m", "--to", "-2"}, "rollback: --to -2: want a version number"},
		{[]string{"rollback", "m", "--to", "x"}, "--to"},
		{[]string{"mount", dir, "--keep-versions", "-1"}, "--keep-versions -1"},
		{[]string{"ls", "extra"}, "usage: weightfs ls"},
		{[]string{"status", "--bogus"}, "status: unknown flag: --bogus"},
		{[]string{"verify", "m", "--version", "x"}, "--version"},
		{[]string{"--log-format", "xml", "ls"}, "want text or json"},
		{[]string{"mount"}, "usage: weightfs mount MOUNTPOINT"},
		{[]string{"mount", dir, "--model", "noequals"}, "want NAME=PATH"},
		{[]string{"mount", dir, "--model", "m=" + dir, "--model", "m=" + dir}, "given twice"},
		{[]string{"mount", dir, "--model", "m=" + filepath.Join(dir, "missing")}, "no such file or directory"},
		{[]string{"mount", filepath.Join(dir, "missing")}, "no such file or directory"},
		{[]string{"mount", dir, "--host-memory", "lots"}, "--host-memory"},
		{[]string{"mount", dir, "--host-memory", "120%"}, "percentage"},
		{[]string{"mount", dir, "--host-memory", "1000Ti"}, "more than the machine's RAM"},
		{[]string{"mount", dir, "--gpu-memory", "10Gi"}, "--gpu-memory needs --gpu"},
		{[]string{"mount", dir, "--memory-reserve", "lots"}, "--memory-reserve"},
		{[]string{"mount", dir, "--push-timeout", "-1s"}, "--push-timeout -1s: want a duration of 0"},
		{[]string{"mount", dir, "--push-timeout", "soon"}, "--push-timeout"},
		{[]string{"mount", dir, "--push-allow-uid", "-1"}, "--push-allow-uid"},
		{[]string{"mount", dir, "--push-allow-uid", "4294967295"}, "--push-allow-uid 4294967295: want a uid or gid below"},
		{[]string{"mount", dir, "--push-allow-gid", "x"}, "--push-allow-gid"},
	}
	for _, c := range cases {
		stdout, stderr, code := weightfs(t, c.args...)
		if code != 2 || stdout != "" {
			t.Errorf("weightfs %q: exit %d, stdout %q; want exit 2 and nothing on stdout", c.args, code, stdout)
		}
		oneLineError(t, c.args, stderr, c.want)
	}
}

// writeModel writes a one-file model folder of about size bytes.
func writeModel(t *testing.T, size int) string {
	t.Helper()
	dir := t.TempDir()
	var buf bytes.Buffer
	err := safetensors.Write(&buf, []safetensors.Tensor{{Name: "w", DType: "U8", Shape: []int64{int64(size)},
		Data: make([]byte, size)}}, nil)
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, "model.safetensors"), buf.Bytes(), 0o644)
	}
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, "config.json"), []byte(`{"model_type":"test"}`), 0o644)
	}
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// serve runs a control server over a store of memfds on a temporary socket.
func serve(t *testing.T, h func(*store.Store) http.Handler, budgets store.Budgets) string {
	t.Helper()
	st := store.New(store.OpenMemfdArena(), store.Options{Budgets: budgets})
	sock := filepath.Join(t.TempDir(), "control.sock")
	l, err := control.Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { control.Serve(ctx, l, h(st), slogDiscard(), "test"); close(done) }()
	t.Cleanup(func() { cancel(); <-done; st.Close() })
	return sock
}

func controlHandler(st *store.Store) http.Handler {
	return control.NewServer(st, control.Options{Logger: slogDiscard()}).Handler()
}

func TestClientCommands(t *testing.T) {
	sock := serve(t, controlHandler, store.Budgets{})
	src := writeModel(t, 4096)
	// Global flags before the subcommand, and after it.
	stdout, stderr, code := weightfs(t, "--socket", sock, "load", "m", src)
	if code != 0 || !strings.HasPrefix(stdout, "loaded m@1: 2 files") || stderr != "" {
		t.Fatalf("load: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	stdout, _, code = weightfs(t, "--json", "--socket", sock, "load", "m", src)
	var loaded struct{ Version control.Version }
	if err := json.Unmarshal([]byte(stdout), &loaded); code != 0 || err != nil || loaded.Version.Name != "m@2" {
		t.Fatalf("load --json: exit %d, %v, %q", code, err, stdout)
	}
	stdout, _, code = weightfs(t, "ls", "--socket", sock)
	if code != 0 || !strings.Contains(stdout, "m@2 *") || !strings.Contains(stdout, "m@1") {
		t.Errorf("ls: exit %d:\n%s", code, stdout)
	}
	stdout, _, code = weightfs(t, "list", "--json", "--socket="+sock)
	var list control.List
	if err := json.Unmarshal([]byte(stdout), &list); code != 0 || err != nil || len(list.Models) != 1 {
		t.Errorf("list --json: exit %d, %v:\n%s", code, err, stdout)
	}
	if stdout, _, code = weightfs(t, "status", "--socket", sock); code != 0 || !strings.Contains(stdout, "host:") {
		t.Errorf("status: exit %d:\n%s", code, stdout)
	}
	if stdout, _, code = weightfs(t, "verify", "m", "--socket", sock); code != 0 || !strings.Contains(stdout, "every file equals its source") {
		t.Errorf("verify: exit %d:\n%s", code, stdout)
	}
	stdout, _, code = weightfs(t, "__complete", "--socket", sock, "unload", "")
	if code != 0 || !strings.HasPrefix(stdout, "m\n") {
		t.Errorf("completing a model name: exit %d, %q", code, stdout)
	}
	if stdout, _, code = weightfs(t, "unload", "m", "--version", "1", "--socket", sock); code != 0 || stdout != "unloaded m@1\n" {
		t.Errorf("unload: exit %d, %q", code, stdout)
	}
	// Failures exit 1 with one line.
	for _, args := range [][]string{{"unload", "nosuch"}, {"verify", "m", "--version", "7"}, {"load", "x", t.TempDir()}} {
		stdout, stderr, code := weightfs(t, append(args, "--socket", sock)...)
		if code != 1 || stdout != "" {
			t.Errorf("weightfs %q: exit %d, stdout %q; want exit 1", args, code, stdout)
		}
		oneLineError(t, args, stderr, "")
	}
	_, stderr, code = weightfs(t, "ls", "--socket", filepath.Join(t.TempDir(), "none.sock"))
	if code != 1 {
		t.Errorf("ls without a daemon: exit %d", code)
	}
	oneLineError(t, []string{"ls"}, stderr, "no weightfs daemon at")
	// With --log-format json the error is one JSON record.
	_, stderr, code = weightfs(t, "--log-format", "json", "ls", "--socket", filepath.Join(t.TempDir(), "none.sock"))
	var rec struct {
		Level, Msg string
		Exit       int
	}
	if err := json.Unmarshal([]byte(stderr), &rec); err != nil || code != 1 || rec.Level != "ERROR" || rec.Exit != 1 ||
		strings.Count(stderr, "\n") != 1 || !strings.Contains(rec.Msg, "no weightfs daemon") {
		t.Errorf("--log-format json error: exit %d, %v, %q", code, err, stderr)
	}
	_, stderr, _ = weightfs(t, "--log-format=json", "--nope")
	if err := json.Unmarshal([]byte(stderr), &rec); err != nil || rec.Exit != 2 {
		t.Errorf("--log-format=json usage error: %v, %q", err, stderr)
	}
}

// TestRollbackCommand: weightfs rollback moves the symlink, in text and
// JSON, and refusals exit 1 with one line.
func TestRollbackCommand(t *testing.T) {
	sock := serve(t, controlHandler, store.Budgets{})
	src := writeModel(t, 4096)
	for range 3 {
		if _, _, code := weightfs(t, "--socket", sock, "load", "m", src); code != 0 {
			t.Fatal("load")
		}
	}
	for _, tc := range []struct {
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{args: []string{"rollback", "m"}, stdout: "m -> m@2\n"},
		{args: []string{"rollback", "m", "--to", "3"}, stdout: "m -> m@3\n"},
		{args: []string{"rollback", "m", "--to=1"}, stdout: "m -> m@1\n"},
		{args: []string{"rollback", "m"}, code: 1, stderr: "no version older than the current m@1"},
		{args: []string{"rollback", "m", "--to", "9"}, code: 1, stderr: "no version 9 (versions: 1, 2, 3)"},
		{args: []string{"rollback", "nosuch"}, code: 1, stderr: "no such model"},
	} {
		stdout, stderr, code := weightfs(t, append(tc.args, "--socket", sock)...)
		if code != tc.code || stdout != tc.stdout {
			t.Errorf("weightfs %q: exit %d, stdout %q; want exit %d, %q", tc.args, code, stdout, tc.code, tc.stdout)
		}
		if tc.code != 0 {
			oneLineError(t, tc.args, stderr, tc.stderr)
		}
	}
	stdout, _, code := weightfs(t, "rollback", "m", "--to", "2", "--json", "--socket", sock)
	var out struct{ Version control.Version }
	if err := json.Unmarshal([]byte(stdout), &out); code != 0 || err != nil || out.Version.Name != "m@2" || !out.Version.Current {
		t.Errorf("rollback --json: exit %d, %v, %q", code, err, stdout)
	}
	if stdout, _, _ := weightfs(t, "ls", "--socket", sock); !strings.Contains(stdout, "m@2 *") {
		t.Errorf("ls after the rollback does not mark m@2 current:\n%s", stdout)
	}
}

// TestBudgetError: a load a budget refuses names the daemon's flag and the
// numbers, for each tier.
func TestBudgetError(t *testing.T) {
	src := writeModel(t, 1<<20)
	for _, c := range []struct {
		be   store.BudgetError
		want string
	}{
		{store.BudgetError{Tier: store.TierHost, Need: 3 << 20, Free: 1 << 20, Budget: 2 << 20},
			"needs 3.0 MiB of host memory, only 1.0 MiB is free of the daemon's --host-memory budget of 2.0 MiB"},
		{store.BudgetError{Tier: store.TierGPU, GPU: "GPU-1234", Need: 3 << 30, Free: 1 << 30, Budget: 2 << 30},
			"needs 3.0 GiB of GPU memory on GPU-1234, only 1.0 GiB is free of the daemon's --gpu-memory budget of 2.0 GiB"},
		{store.BudgetError{Tier: store.TierSystem, Need: 3 << 30, Free: 1 << 30, Budget: 24 << 30, Reserve: 1 << 30},
			"needs 3.0 GiB of host memory, but the machine can give only 1.0 GiB more (what MemAvailable says of its 24.0 GiB, less a reserve of 1.0 GiB, the daemon's --memory-reserve)"},
		{store.BudgetError{Tier: store.TierSystem, Cgroup: "/sys/fs/cgroup/x", Need: 1 << 30, Free: 0, Budget: 1 << 30, Reserve: 1 << 30},
			"needs 1.0 GiB of host memory, but memory cgroup /sys/fs/cgroup/x can give only 0 B more (of its 1.0 GiB limit, less a reserve of 1.0 GiB, the daemon's --memory-reserve)"},
	} {
		sock := serve(t, func(*store.Store) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				var req control.LoadRequest
				json.NewDecoder(r.Body).Decode(&req)
				be := c.be
				be.Model, be.Source = req.Name, req.Path
				json.NewEncoder(w).Encode(control.LoadEvent{Error: &control.ErrorBody{Code: control.CodeNoMemory,
					Message: be.Error(), Budget: &be}})
			})
		}, store.Budgets{})
		_, stderr, code := weightfs(t, "load", "m", src, "--socket", sock)
		if code != 1 {
			t.Errorf("budget refusal: exit %d", code)
		}
		oneLineError(t, []string{"load"}, stderr, "load m from "+src+": "+c.want)
	}
}

// TestBudgetErrorStore: the same through a real store with a budget, once
// the store returns *store.BudgetError.
func TestBudgetErrorStore(t *testing.T) {
	src := writeModel(t, 1<<20)
	sock := serve(t, controlHandler, store.Budgets{Host: 64 << 10})
	_, err := control.NewClient(sock).Load(context.Background(), "m", src, nil)
	if be := (*store.BudgetError)(nil); !errors.As(err, &be) {
		t.Skipf("the store's budget refusal is not a *store.BudgetError yet: %v", err)
	}
	_, stderr, code := weightfs(t, "load", "m", src, "--socket", sock)
	if code != 1 {
		t.Errorf("budget refusal: exit %d", code)
	}
	oneLineError(t, []string{"load"}, stderr, "of the daemon's --host-memory budget of 64.0 KiB")
}

// TestJSONLogsAsked: the final error is JSON even when flag parsing failed.
func TestJSONLogsAsked(t *testing.T) {
	for args, want := range map[string]bool{"--log-format json --x": true, "--x --log-format=json": true,
		"--log-format text": false, "--log-formatjson": false, "": false} {
		if got := jsonLogsAsked(strings.Fields(args)); got != want {
			t.Errorf("jsonLogsAsked(%q) = %v", args, got)
		}
	}
}

func slogDiscard() *slog.Logger { return slog.New(slog.DiscardHandler) }
