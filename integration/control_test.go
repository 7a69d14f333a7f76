package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/control"
)

// The control plane, driven only through the weightfs binary: load, unload,
// ls, status, verify, budgets, metrics and the socket's permissions
// (docs/CONTROL.md).

// findModel is the model of that name in a listing, or nil.
func findModel(l control.List, name string) *control.Model {
	for i := range l.Models {
		if l.Models[i].Name == name {
			return &l.Models[i]
		}
	}
	return nil
}

// modelNames are the names of a listing's models.
func modelNames(l control.List) []string {
	var out []string
	for _, m := range l.Models {
		out = append(out, m.Name)
	}
	return out
}

// runCmd runs a command and returns what it printed and its exit status.
func runCmd(t testing.TB, cmd *exec.Cmd) (stdout, stderr string, code int) {
	t.Helper()
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("%v: %v", cmd.Args, err)
	}
	return o.String(), e.String(), code
}

// cli runs the weightfs binary. (Not named wfs: that is the fs package's
// name in helpers_test.go.)
func cli(t testing.TB, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return runCmd(t, exec.CommandContext(ctx, daemonBinary(t), args...))
}

// oneErrorLine checks that a failed command printed exactly one line on
// stderr, "weightfs: ...", and nothing on stdout; it returns the line.
func oneErrorLine(t testing.TB, args []string, stdout, stderr string) string {
	t.Helper()
	line := strings.TrimSuffix(stderr, "\n")
	if strings.Contains(line, "\n") || !strings.HasPrefix(line, "weightfs: ") {
		t.Errorf("weightfs %v: stderr %q, want one line starting \"weightfs: \"", args, stderr)
	}
	if stdout != "" {
		t.Errorf("weightfs %v: failed but printed %q on stdout", args, stdout)
	}
	return line
}

// controlDaemon is a `weightfs mount` with its control socket.
type controlDaemon struct {
	*daemon
	mnt, sock string
}

// startControl starts a daemon on a fresh mount point with a socket in a
// temporary folder and waits until it serves. It is stopped with SIGTERM at
// the end of the test, so the mount point is left clean.
func startControl(t *testing.T, args ...string) *controlDaemon {
	t.Helper()
	requireFUSE(t)
	mnt := t.TempDir()
	sock := filepath.Join(t.TempDir(), "control.sock")
	return startControlAt(t, mnt, sock, args...)
}

func startControlAt(t *testing.T, mnt, sock string, args ...string) *controlDaemon {
	t.Helper()
	d := startDaemon(t, append([]string{"mount", mnt, "--socket", sock}, args...)...)
	c := &controlDaemon{daemon: d, mnt: mnt, sock: sock}
	t.Cleanup(func() {
		d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.done:
		case <-time.After(20 * time.Second):
			t.Errorf("daemon did not exit on SIGTERM:\n%s", d.log())
		}
		if isMounted(t, mnt) {
			exec.Command("umount", "-l", mnt).Run()
		}
	})
	d.waitFor(t, "the daemon to serve", func() bool {
		return strings.Contains(d.log(), "weightfs: serving") && isMounted(t, mnt)
	})
	return c
}

// run runs a client command against this daemon.
func (c *controlDaemon) run(t testing.TB, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	return cli(t, append(args, "--socket", c.sock)...)
}

// ok runs a client command that must succeed and returns its stdout.
func (c *controlDaemon) ok(t testing.TB, args ...string) string {
	t.Helper()
	out, errOut, code := c.run(t, args...)
	if code != 0 {
		t.Fatalf("weightfs %v: exit status %d: %s%s\ndaemon log:\n%s", args, code, out, errOut, c.log())
	}
	return out
}

// fail runs a client command that must fail with exit status code and one
// line on stderr, and returns that line.
func (c *controlDaemon) fail(t testing.TB, code int, args ...string) string {
	t.Helper()
	out, errOut, got := c.run(t, args...)
	if got != code {
		t.Errorf("weightfs %v: exit status %d, want %d: %s%s", args, got, code, out, errOut)
	}
	return oneErrorLine(t, args, out, errOut)
}

// jsonOut runs a client command with --json that must succeed and decodes
// its output into v.
func (c *controlDaemon) jsonOut(t testing.TB, v any, args ...string) {
	t.Helper()
	out := c.ok(t, append(args, "--json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		t.Fatalf("weightfs %v --json: %v:\n%s", args, err, out)
	}
}

func (c *controlDaemon) list(t testing.TB) control.List {
	t.Helper()
	var l control.List
	c.jsonOut(t, &l, "ls")
	return l
}

func (c *controlDaemon) status(t testing.TB) control.Status {
	t.Helper()
	var s control.Status
	c.jsonOut(t, &s, "status")
	return s
}

// load loads a folder as the next version of name and returns it.
func (c *controlDaemon) load(t testing.TB, name, dir string) control.Version {
	t.Helper()
	var out control.LoadEvent // {"version": …}
	c.jsonOut(t, &out, "load", name, dir)
	if out.Version == nil {
		t.Fatalf("weightfs load %s --json: no version in the answer", name)
	}
	return *out.Version
}

// modelSize is the number of files and bytes the mount should show for a
// model folder.
func modelSize(t testing.TB, dir string) (files int, size int64) {
	t.Helper()
	for _, abs := range sourceFiles(t, dir) {
		st, err := os.Stat(abs)
		must(t, err)
		files++
		size += st.Size()
	}
	return files, size
}

// modelCost is the host memory a model folder takes in the daemon's arena
// (the huge=within_size tmpfs): each file's size rounded up to 4 KiB.
func modelCost(t testing.TB, dir string) (cost int64) {
	t.Helper()
	for _, abs := range sourceFiles(t, dir) {
		st, err := os.Stat(abs)
		must(t, err)
		cost += (st.Size() + 4095) / 4096 * 4096
	}
	return cost
}

// checkVersion compares a listed version with its source folder.
func checkVersion(t testing.TB, v control.Version, name string, number int, current bool, src string) {
	t.Helper()
	files, size := modelSize(t, src)
	want := fmt.Sprintf("%s@%d", name, number)
	if v.Name != want || v.Model != name || v.Number != number || v.State != "ready" || v.Current != current {
		t.Errorf("%s: listed as name %q model %q number %d state %q current %v; want %s, ready, current %v",
			want, v.Name, v.Model, v.Number, v.State, v.Current, want, current)
	}
	if v.Files != files || v.Bytes != size || v.HostBytes != modelCost(t, src) {
		t.Errorf("%s: %d files, %d bytes (%d of host memory); the source has %d files, %d bytes (%d in 4 KiB pages)",
			want, v.Files, v.Bytes, v.HostBytes, files, size, modelCost(t, src))
	}
	if abs, _ := filepath.Abs(src); v.Source != abs && v.Source != src {
		t.Errorf("%s: source %q, want %q", want, v.Source, abs)
	}
	if len(v.Residency) == 0 || v.Residency[0] != "host" {
		t.Errorf("%s: residency %v, want host first", want, v.Residency)
	}
	if _, err := time.Parse(time.RFC3339, v.LoadedAt); err != nil {
		t.Errorf("%s: loaded_at %q: %v", want, v.LoadedAt, err)
	}
	if v.LoadSeconds <= 0 || v.LoadRate <= 0 {
		t.Errorf("%s: load_seconds %v, load_bytes_per_second %v; want both > 0", want, v.LoadSeconds, v.LoadRate)
	}
	if v.HandleHolders == nil {
		t.Errorf("%s: handle_holders is null, want a list", want)
	}
}

// readModel reads every file of a model folder through the mount (under
// name, a model or a version) and compares it with the source.
func readModel(t testing.TB, mnt, name, src string) {
	t.Helper()
	for rel, abs := range sourceFiles(t, src) {
		sameBytes(t, name+"/"+rel, mustRead(t, filepath.Join(mnt, name, rel)), mustRead(t, abs))
	}
}

// sourceBytes reads a model folder's files as the mount should show them.
func sourceBytes(t testing.TB, dir string) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	for rel, abs := range sourceFiles(t, dir) {
		out[rel] = mustRead(t, abs)
	}
	return out
}

// compareTree reads every file of want under dir; for goroutines other than
// the test's.
func compareTree(dir string, want map[string][]byte) error {
	for rel, b := range want {
		got, err := os.ReadFile(filepath.Join(dir, rel))
		if err != nil {
			return err
		}
		if !bytes.Equal(got, b) {
			return fmt.Errorf("%s/%s: %d bytes differ from the source's %d", dir, rel, len(got), len(b))
		}
	}
	return nil
}

// Keys every JSON object must have (docs/CONTROL.md).
var (
	versionKeys = []string{"name", "model", "number", "state", "current", "files", "bytes", "residency",
		"open_files", "handle_holders", "loaded_at", "load_seconds", "load_bytes_per_second", "source"}
	statusKeys = []string{"mountpoint", "read_mode", "host", "gpus", "models", "draining", "loads",
		"requests", "daemon_reads", "handle_requests", "handle_denials"}
	requestTypes = []string{"lookup", "getattr", "readdir", "readlink", "open", "read", "getxattr",
		"listxattr", "ioctl", "statfs"}
)

func hasKeys(t testing.TB, what string, v any, keys ...string) map[string]any {
	t.Helper()
	m, ok := v.(map[string]any)
	if !ok {
		t.Errorf("%s: %T, want an object", what, v)
		return nil
	}
	for _, k := range keys {
		if _, ok := m[k]; !ok {
			t.Errorf("%s: no %q", what, k)
		}
	}
	return m
}

func isList(t testing.TB, what string, v any) []any {
	t.Helper()
	l, ok := v.([]any)
	if !ok {
		t.Errorf("%s: %v (%T), want a list", what, v, v)
	}
	return l
}

// checkListSchema checks the keys of `ls --json` (or the models and draining
// of a status).
func checkListSchema(t testing.TB, what string, m map[string]any) {
	t.Helper()
	for i, model := range isList(t, what+".models", m["models"]) {
		mm := hasKeys(t, fmt.Sprintf("%s.models[%d]", what, i), model, "name", "current", "versions")
		for j, v := range isList(t, fmt.Sprintf("%s.models[%d].versions", what, i), mm["versions"]) {
			hasKeys(t, fmt.Sprintf("%s.models[%d].versions[%d]", what, i, j), v, versionKeys...)
		}
	}
	for i, v := range isList(t, what+".draining", m["draining"]) {
		hasKeys(t, fmt.Sprintf("%s.draining[%d]", what, i), v, versionKeys...)
	}
}

// checkStatusSchema checks that b is a status (`status --json`,
// .weightfs/status.json) with every key.
func checkStatusSchema(t testing.TB, what string, b []byte) {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s: %v:\n%s", what, err, b)
	}
	hasKeys(t, what, m, statusKeys...)
	hasKeys(t, what+".host", m["host"], "bytes", "reserved", "budget", "arena")
	hasKeys(t, what+".requests", m["requests"], requestTypes...)
	isList(t, what+".gpus", m["gpus"])
	for i, l := range isList(t, what+".loads", m["loads"]) {
		hasKeys(t, fmt.Sprintf("%s.loads[%d]", what, i), l, "name", "source", "done", "total")
	}
	checkListSchema(t, what, m)
	if rm := m["read_mode"]; rm != "passthrough" && rm != "cached" {
		t.Errorf("%s: read_mode %v, want passthrough or cached", what, rm)
	}
}

func TestControlLoadListRead(t *testing.T) {
	c := startControl(t)
	if l := c.list(t); len(l.Models) != 0 || len(l.Draining) != 0 {
		t.Fatalf("a daemon started without models lists %+v", l)
	}
	srcA, srcB, srcC := t.TempDir(), t.TempDir(), t.TempDir()
	writeModel(t, srcA, 10, 700)
	writeModel(t, srcB, 20, 900)
	writeModel(t, srcC, 30, 400000) // about 50 MB

	// The summary line, then --json.
	out := c.ok(t, "load", "a", srcA)
	if strings.Count(out, "\n") != 1 || !strings.Contains(out, "a@1") {
		t.Errorf("weightfs load a: printed %q, want one line naming a@1", out)
	}
	checkVersion(t, c.load(t, "b", srcB), "b", 1, true, srcB)

	l := c.list(t)
	if got := modelNames(l); !reflect.DeepEqual(got, []string{"a", "b"}) {
		t.Fatalf("ls --json lists %v, want [a b]", got)
	}
	for _, x := range []struct{ name, src string }{{"a", srcA}, {"b", srcB}} {
		m := findModel(l, x.name)
		if m.Current != 1 || len(m.Versions) != 1 {
			t.Errorf("%s: current %d, %d versions; want current 1 of 1", x.name, m.Current, len(m.Versions))
			continue
		}
		checkVersion(t, m.Versions[0], x.name, 1, true, x.src)
	}
	if len(l.Draining) != 0 {
		t.Errorf("draining: %+v, want none", l.Draining)
	}
	var raw map[string]any
	must(t, json.Unmarshal([]byte(c.ok(t, "ls", "--json")), &raw))
	checkListSchema(t, "ls --json", raw)

	table := c.ok(t, "ls")
	lines := strings.Split(strings.TrimSpace(table), "\n")
	if len(lines) != 3 || !strings.Contains(table, "a@1") || !strings.Contains(table, "b@1") {
		t.Errorf("weightfs ls printed\n%s\nwant a header line and rows for a@1 and b@1", table)
	}

	// Reads of a and b go on, from before c starts loading until after it
	// is done.
	wantA, wantB := sourceBytes(t, srcA), sourceBytes(t, srcB)
	stop, readErr := make(chan struct{}), make(chan error, 1)
	var rounds int
	go func() {
		for {
			for _, x := range []struct {
				name string
				want map[string][]byte
			}{{"a", wantA}, {"b@1", wantB}} {
				if err := compareTree(filepath.Join(c.mnt, x.name), x.want); err != nil {
					readErr <- err
					return
				}
			}
			rounds++
			select {
			case <-stop:
				readErr <- nil
				return
			default:
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	bigLoad := exec.CommandContext(ctx, daemonBinary(t), "load", "c", srcC, "--socket", c.sock, "--json")
	var bigOut, bigErr bytes.Buffer
	bigLoad.Stdout, bigLoad.Stderr = &bigOut, &bigErr
	must(t, bigLoad.Start())
	loaded := make(chan error, 1)
	go func() { loaded <- bigLoad.Wait() }()
	// Meanwhile status shows the load in progress (if it lasts long enough
	// to be seen).
	var loadErr error
	sawLoad := false
polling:
	for {
		select {
		case loadErr = <-loaded:
			break polling
		default:
		}
		for _, ld := range c.status(t).Loads {
			abs, _ := filepath.Abs(srcC)
			// Total is 0 while the folder is still being scanned.
			if ld.Name != "c" || ld.Source != abs || ld.Done < 0 || ld.Done > ld.Total {
				t.Errorf("load in progress: %+v; want c from %s, 0 ≤ done ≤ total", ld, abs)
			}
			sawLoad = true
		}
	}
	close(stop)
	if err := <-readErr; err != nil {
		t.Errorf("reading a and b while c loads: %v", err)
	}
	t.Logf("%d rounds of reads of a and b around the load of c; status showed it in progress: %v", rounds, sawLoad)
	if loadErr != nil {
		t.Fatalf("weightfs load c: %v: %s%s", loadErr, bigOut.String(), bigErr.String())
	}
	if st := c.status(t); len(st.Loads) != 0 || st.Host.Reserved != 0 {
		t.Errorf("after the load: loads %+v, host reserved %d; want none, 0", st.Loads, st.Host.Reserved)
	}
	var bigV control.LoadEvent
	must(t, json.Unmarshal(bigOut.Bytes(), &bigV))
	if bigV.Version == nil {
		t.Fatalf("weightfs load c --json: no version in %s", bigOut.String())
	}
	checkVersion(t, *bigV.Version, "c", 1, true, srcC)
	l = c.list(t)
	if got := modelNames(l); !reflect.DeepEqual(got, []string{"a", "b", "c"}) {
		t.Fatalf("after loading c, ls --json lists %v, want [a b c]", got)
	}
	readModel(t, c.mnt, "c", srcC)

	// Loading a again makes a@2 current; a@1 stays.
	out = c.ok(t, "load", "a", srcA)
	if !strings.Contains(out, "a@2") {
		t.Errorf("second load of a printed %q, want a@2", out)
	}
	if target, err := os.Readlink(filepath.Join(c.mnt, "a")); err != nil || target != "a@2" {
		t.Errorf("readlink %s/a: %q, %v; want a@2", c.mnt, target, err)
	}
	readModel(t, c.mnt, "a", srcA)
	readModel(t, c.mnt, "a@1", srcA)
	l = c.list(t)
	if m := findModel(l, "a"); m == nil || m.Current != 2 || len(m.Versions) != 2 {
		t.Errorf("a after a second load: %+v; want current 2 of versions 1 and 2", m)
	} else {
		checkVersion(t, m.Versions[0], "a", 1, false, srcA)
		checkVersion(t, m.Versions[1], "a", 2, true, srcA)
	}

	// status --json and .weightfs/status.json agree with ls --json.
	statusOut := c.ok(t, "status", "--json")
	checkStatusSchema(t, "status --json", []byte(statusOut))
	var st control.Status
	must(t, json.Unmarshal([]byte(statusOut), &st))
	if !reflect.DeepEqual(st.Models, l.Models) {
		t.Errorf("status --json models differ from ls --json:\n%+v\n%+v", st.Models, l.Models)
	}
	var total int64
	for _, m := range l.Models {
		for _, v := range m.Versions {
			total += v.HostBytes
		}
	}
	if st.Host.Bytes != total || st.Host.Reserved != 0 || len(st.Loads) != 0 {
		t.Errorf("status: host bytes %d reserved %d, loads %d; want %d, 0, none", st.Host.Bytes, st.Host.Reserved, len(st.Loads), total)
	}
	if st.Mountpoint != c.mnt {
		t.Errorf("status: mountpoint %q, want %q", st.Mountpoint, c.mnt)
	}
	if st.Requests["open"] == 0 && st.Requests["lookup"] == 0 {
		t.Errorf("status: requests %v after reads", st.Requests)
	}
	file := mustRead(t, filepath.Join(c.mnt, ".weightfs", "status.json"))
	checkStatusSchema(t, ".weightfs/status.json", file)
	var fileSt control.Status
	must(t, json.Unmarshal(file, &fileSt))
	if !reflect.DeepEqual(fileSt.Models, l.Models) || fileSt.Mountpoint != c.mnt || fileSt.Host.Bytes != total {
		t.Errorf(".weightfs/status.json differs from ls --json:\n%s", file)
	}
	if err := os.WriteFile(filepath.Join(c.mnt, ".weightfs", "status.json"), []byte("{}"), 0o644); err == nil {
		t.Errorf(".weightfs/status.json is writable")
	}
	text := c.ok(t, "status")
	for _, want := range []string{c.mnt, "a@2", "b@1", "c@1"} {
		if !strings.Contains(text, want) {
			t.Errorf("weightfs status does not mention %s:\n%s", want, text)
		}
	}
}

func TestControlUnloadWhileOpen(t *testing.T) {
	c := startControl(t)
	srcKeep, srcM := t.TempDir(), t.TempDir()
	writeModel(t, srcKeep, 40, 300)
	writeModel(t, srcM, 50, 20000) // a 2.5 MB weights file
	keep := c.load(t, "keep", srcKeep)
	mv := c.load(t, "m", srcM)
	before := c.status(t).Host.Bytes
	if before != keep.HostBytes+mv.HostBytes {
		t.Fatalf("status host bytes %d, want %d + %d", before, keep.HostBytes, mv.HostBytes)
	}

	const weights = "model-00001-of-00002.safetensors"
	want := mustRead(t, filepath.Join(srcM, weights))
	f, err := os.Open(filepath.Join(c.mnt, "m@1", weights))
	must(t, err)
	defer f.Close()
	head := make([]byte, 4096)
	_, err = io.ReadFull(f, head)
	must(t, err)

	var un control.Unloaded
	c.jsonOut(t, &un, "unload", "m")
	if len(un.Unloaded) != 1 || un.Unloaded[0].Name != "m@1" || un.Unloaded[0].State != "draining" || un.Unloaded[0].OpenFiles < 1 {
		t.Errorf("unload m --json: %+v; want m@1 draining with an open file", un.Unloaded)
	}

	// Gone from the mount at once.
	for _, p := range []string{"m", "m@1", "m@1/config.json", "m@1/" + weights} {
		if _, err := os.Lstat(filepath.Join(c.mnt, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("lstat %s after unload: %v, want ENOENT", p, err)
		}
	}
	if g, err := os.Open(filepath.Join(c.mnt, "m@1", weights)); err == nil {
		g.Close()
		t.Errorf("a new open of m@1/%s succeeded after the unload", weights)
	}
	names, err := os.ReadDir(c.mnt)
	must(t, err)
	for _, e := range names {
		if e.Name() == "m" || e.Name() == "m@1" {
			t.Errorf("%s still listed in the mount's root after the unload", e.Name())
		}
	}

	// Listed as draining with its open file; its memory is still counted.
	checkDraining := func(what string, models []control.Model, draining []control.Version) {
		t.Helper()
		for _, m := range models {
			if m.Name == "m" {
				t.Errorf("%s: m still listed among the models: %+v", what, m)
			}
		}
		if len(draining) != 1 || draining[0].Name != "m@1" || draining[0].State != "draining" ||
			draining[0].OpenFiles < 1 || draining[0].Current {
			t.Errorf("%s: draining %+v; want m@1, state draining, ≥1 open file, not current", what, draining)
		}
	}
	l := c.list(t)
	checkDraining("ls --json", l.Models, l.Draining)
	st := c.status(t)
	checkDraining("status --json", st.Models, st.Draining)
	if st.Host.Bytes != before {
		t.Errorf("status host bytes %d while m@1 drains, want %d still", st.Host.Bytes, before)
	}
	if table := c.ok(t, "ls"); !strings.Contains(table, "m@1") || !strings.Contains(table, "draining") {
		t.Errorf("weightfs ls does not show m@1 draining:\n%s", table)
	}

	// The reader goes on to the end with the right bytes.
	rest, err := io.ReadAll(f)
	must(t, err)
	sameBytes(t, "m@1/"+weights+" read through the fd kept open across the unload", append(head, rest...), want)
	must(t, f.Close())

	// Freed once closed.
	deadline := time.Now().Add(10 * time.Second)
	for {
		st = c.status(t)
		if len(st.Draining) == 0 && st.Host.Bytes == before-mv.HostBytes {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("10 s after the last close: draining %+v, host bytes %d; want none and %d", st.Draining, st.Host.Bytes, before-mv.HostBytes)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if l := c.list(t); len(l.Draining) != 0 || !reflect.DeepEqual(modelNames(l), []string{"keep"}) {
		t.Errorf("after m@1 was freed, ls --json: %+v", l)
	}
	readModel(t, c.mnt, "keep", srcKeep)

	// Unloading a version that is not current keeps the current one.
	c.load(t, "n", srcKeep)
	c.load(t, "n", srcKeep)
	c.ok(t, "unload", "n", "--version", "1")
	if target, err := os.Readlink(filepath.Join(c.mnt, "n")); err != nil || target != "n@2" {
		t.Errorf("readlink n after unloading n@1: %q, %v; want n@2", target, err)
	}
	if _, err := os.Lstat(filepath.Join(c.mnt, "n@1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lstat n@1 after unloading it: %v, want ENOENT", err)
	}
	readModel(t, c.mnt, "n", srcKeep)
	if m := findModel(c.list(t), "n"); m == nil || m.Current != 2 || len(m.Versions) != 1 || m.Versions[0].Number != 2 || !m.Versions[0].Current {
		t.Errorf("n after unloading version 1: %+v; want only n@2, current", m)
	}

	for _, x := range []struct {
		args []string
		want []string
	}{
		{[]string{"unload", "nosuch"}, []string{"nosuch"}},
		{[]string{"unload", "n", "--version", "7"}, []string{"n", "7"}},
		{[]string{"unload", "n", "--version", "1"}, []string{"n", "1"}}, // already gone
		{[]string{"verify", "nosuch"}, []string{"nosuch"}},
	} {
		line := c.fail(t, 1, x.args...)
		for _, w := range x.want {
			if !strings.Contains(line, w) {
				t.Errorf("weightfs %v: %q does not mention %q", x.args, line, w)
			}
		}
	}
	if m := findModel(c.list(t), "n"); m == nil || m.Current != 2 {
		t.Errorf("failed unloads changed n: %+v", m)
	}
}

// TestControlNumbersNotReused: docs/CONTROL.md says version numbers are never
// reused while the daemon runs, also after every version of a model was
// unloaded (and while the old one still drains).
func TestControlNumbersNotReused(t *testing.T) {
	c := startControl(t)
	src := t.TempDir()
	writeModel(t, src, 60, 300)
	c.load(t, "m", src)
	f, err := os.Open(filepath.Join(c.mnt, "m@1", "config.json"))
	must(t, err)
	defer f.Close()
	c.ok(t, "unload", "m")
	v := c.load(t, "m", src)
	if v.Number != 2 {
		t.Errorf("loading m again after unloading m@1 (still draining) gave %s; want m@2 (numbers are never reused)", v.Name)
	}
	l := c.list(t)
	seen := map[string]int{}
	for _, m := range l.Models {
		for _, v := range m.Versions {
			seen[v.Name]++
		}
	}
	for _, v := range l.Draining {
		seen[v.Name]++
	}
	for name, n := range seen {
		if n > 1 {
			t.Errorf("ls --json lists %s %d times: %+v", name, n, l)
		}
	}
	readModel(t, c.mnt, "m", src)
	b, err := io.ReadAll(f)
	must(t, err)
	sameBytes(t, "the draining m@1/config.json", b, mustRead(t, filepath.Join(src, "config.json")))
}

func TestControlBudget(t *testing.T) {
	requireFUSE(t)
	srcA, srcB := t.TempDir(), t.TempDir()
	writeModel(t, srcA, 70, 8000)
	writeModel(t, srcB, 80, 8000)
	// Budgets count host memory: each file rounded up to its 4 KiB pages.
	sizeA, sizeB := modelCost(t, srcA), modelCost(t, srcB)
	budget := sizeA + sizeB/2
	c := startControl(t, "--host-memory", strconv.FormatInt(budget, 10))
	if st := c.status(t); st.Host.Budget != budget {
		t.Errorf("status host budget %d, want %d", st.Host.Budget, budget)
	}

	c.load(t, "a", srcA)
	before := c.list(t)
	line := c.fail(t, 1, "load", "b", srcB)
	// The flag's name (--host-memory) is the command line's to add.
	for _, want := range []string{"host memory", "needs", "free"} {
		if !strings.Contains(line, want) {
			t.Errorf("refused load: %q does not mention %q", line, want)
		}
	}
	// The same refusal through the Go client: 507 with the numbers.
	_, err := control.NewClient(c.sock).Load(context.Background(), "b", srcB, nil)
	var ce *control.Error
	var be *store.BudgetError
	if !errors.As(err, &ce) || ce.Status != http.StatusInsufficientStorage || !errors.Is(err, store.ErrNoMemory) || !errors.As(err, &be) {
		t.Fatalf("over-budget load through control.Client: %v; want a 507 *control.Error with a *store.BudgetError", err)
	}
	if abs, _ := filepath.Abs(srcB); be.Tier != store.TierHost || be.Need != sizeB || be.Budget != budget || be.Free != budget-sizeA || be.Source != abs {
		t.Errorf("budget refusal %+v; want host, need %d, free %d of %d, from %s", be, sizeB, budget-sizeA, budget, abs)
	}
	if after := c.list(t); !reflect.DeepEqual(after, before) {
		t.Errorf("a refused load changed ls --json:\n%+v\n%+v", before, after)
	}
	if _, err := os.Lstat(filepath.Join(c.mnt, "b")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("lstat b after a refused load: %v", err)
	}
	readModel(t, c.mnt, "a", srcA)
	if st := c.status(t); st.Host.Bytes != sizeA || st.Host.Reserved != 0 || len(st.Loads) != 0 {
		t.Errorf("after a refused load: host bytes %d reserved %d loads %d; want %d, 0, none", st.Host.Bytes, st.Host.Reserved, len(st.Loads), sizeA)
	}

	// Over the budget by the current version alone: a second version of a
	// does not fit either.
	c.fail(t, 1, "load", "a", srcA)

	c.ok(t, "unload", "a")
	checkVersion(t, c.load(t, "b", srcB), "b", 1, true, srcB)
	readModel(t, c.mnt, "b", srcB)
	if st := c.status(t); st.Host.Bytes != sizeB {
		t.Errorf("host bytes %d after swapping a for b, want %d", st.Host.Bytes, sizeB)
	}
}

func TestControlVerify(t *testing.T) {
	c := startControl(t)
	src := t.TempDir()
	writeModel(t, src, 90, 500)
	c.load(t, "v", src)
	files := sourceFiles(t, src)

	out := c.ok(t, "verify", "v")
	if !strings.Contains(out, "v@1") {
		t.Errorf("weightfs verify v printed %q, want it to name v@1", out)
	}
	var vr control.Verified
	c.jsonOut(t, &vr, "verify", "v")
	if !vr.OK || vr.Version != "v@1" || len(vr.Files) != len(files) {
		t.Fatalf("verify --json of an unchanged model: %+v; want v@1 ok with %d files", vr, len(files))
	}
	for _, f := range vr.Files {
		abs, ok := files[f.Path]
		if !ok {
			t.Errorf("verify lists %q, not a file of the model", f.Path)
			continue
		}
		sum := sha256.Sum256(mustRead(t, abs))
		if h := hex.EncodeToString(sum[:]); !f.OK || f.Problem != "" || f.SHA256 != h || f.SourceSHA256 != h {
			t.Errorf("%s: %+v; want ok with sha256 %s", f.Path, f, h)
		}
	}

	// Same size, other bytes.
	const changed = "model-00002-of-00002.safetensors"
	orig := mustRead(t, filepath.Join(src, changed))
	mod := bytes.Clone(orig)
	mod[len(mod)-1] ^= 0xff
	must(t, os.WriteFile(filepath.Join(src, changed), mod, 0o644))
	check := func(wantBad map[string]string) {
		t.Helper()
		out, errOut, code := c.run(t, "verify", "v")
		if code != 1 || !strings.Contains(out+errOut, changed) {
			t.Errorf("verify v after changing %s: exit status %d, printed %s%s; want 1 naming the file", changed, code, out, errOut)
		}
		args := []string{"verify", "v", "--json"}
		out, errOut, code = c.run(t, args...)
		if code != 1 {
			t.Errorf("verify --json: exit status %d, want 1", code)
		}
		var vr control.Verified
		if err := json.Unmarshal([]byte(out), &vr); err != nil {
			t.Fatalf("verify --json: %v:\n%s%s", err, out, errOut)
		}
		if vr.OK {
			t.Errorf("verify --json: ok although sources changed")
		}
		for _, f := range vr.Files {
			want, bad := wantBad[f.Path]
			switch {
			case bad && (f.OK || !strings.Contains(f.Problem, want)):
				t.Errorf("%s: %+v; want not ok, problem mentioning %q", f.Path, f, want)
			case bad && f.SHA256 == f.SourceSHA256:
				t.Errorf("%s: served and source checksums are equal: %+v", f.Path, f)
			case !bad && !f.OK:
				t.Errorf("%s: %+v; it did not change", f.Path, f)
			}
		}
		if len(vr.Files) != len(files) {
			t.Errorf("verify --json lists %d files, want %d", len(vr.Files), len(files))
		}
	}
	check(map[string]string{changed: ""})
	// What is served has not changed.
	sameBytes(t, "v/"+changed, mustRead(t, filepath.Join(c.mnt, "v", changed)), orig)

	must(t, os.Remove(filepath.Join(src, "tokenizer.json")))
	check(map[string]string{changed: "", "tokenizer.json": "no such file"})
}

// promSample is one line of Prometheus text.
type promSample struct {
	name   string
	labels map[string]string
	value  float64
}

func parseProm(t testing.TB, text string) []promSample {
	t.Helper()
	var out []promSample
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		s := promSample{labels: map[string]string{}}
		i := strings.IndexAny(line, "{ ")
		if i < 0 {
			t.Fatalf("metrics: bad line %q", line)
		}
		s.name, line = line[:i], line[i:]
		if line[0] == '{' {
			line = line[1:]
			for {
				line = strings.TrimLeft(line, ", ")
				if strings.HasPrefix(line, "}") {
					line = line[1:]
					break
				}
				eq := strings.Index(line, `="`)
				if eq < 0 {
					t.Fatalf("metrics: bad labels in %q", sc.Text())
				}
				key := line[:eq]
				line = line[eq+2:]
				var val strings.Builder
				for len(line) > 0 && line[0] != '"' {
					if line[0] == '\\' && len(line) > 1 {
						switch line[1] {
						case 'n':
							val.WriteByte('\n')
						default:
							val.WriteByte(line[1])
						}
						line = line[2:]
						continue
					}
					val.WriteByte(line[0])
					line = line[1:]
				}
				if line == "" {
					t.Fatalf("metrics: unterminated label in %q", sc.Text())
				}
				line = line[1:]
				if v := val.String(); v != "" { // an empty label is no label
					s.labels[key] = v
				}
			}
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			t.Fatalf("metrics: no value in %q", sc.Text())
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			t.Fatalf("metrics: %q: %v", sc.Text(), err)
		}
		s.value = v
		out = append(out, s)
	}
	return out
}

// promValue finds the sample of that name whose labels include labels.
func promValue(samples []promSample, name string, labels map[string]string) (float64, bool) {
next:
	for _, s := range samples {
		if s.name != name {
			continue
		}
		for k, v := range labels {
			if s.labels[k] != v {
				continue next
			}
		}
		return s.value, true
	}
	return 0, false
}

func freePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	addr := l.Addr().String()
	l.Close()
	return addr
}

func TestControlMetrics(t *testing.T) {
	requireFUSE(t)
	addr := freePort(t)
	c := startControl(t, "--metrics-addr", addr)
	src, bad := t.TempDir(), t.TempDir()
	writeModel(t, src, 100, 600)
	writeFile(t, filepath.Join(bad, "config.json"), "{}")
	corrupt := rawSafetensors(`{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,99]}}`, make([]byte, 16))
	must(t, os.WriteFile(filepath.Join(bad, "model.safetensors"), corrupt, 0o644))

	v := c.load(t, "good", src)
	line := c.fail(t, 1, "load", "bad", bad)
	if !strings.Contains(line, "model.safetensors") {
		t.Errorf("failed load: %q does not name the bad file", line)
	}
	readModel(t, c.mnt, "good", src)

	resp, err := http.Get("http://" + addr + "/metrics")
	must(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	must(t, err)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s\n%s", resp.Status, body)
	}
	samples := parseProm(t, string(body))
	for _, x := range []struct {
		name   string
		labels map[string]string
		check  func(float64) bool
		want   string
	}{
		{"weightfs_loads_total", map[string]string{"result": "ok"}, func(f float64) bool { return f >= 1 }, "≥ 1"},
		{"weightfs_loads_total", map[string]string{"result": "error"}, func(f float64) bool { return f >= 1 }, "≥ 1"},
		{"weightfs_resident_bytes", map[string]string{"tier": "host"}, func(f float64) bool { return f == float64(v.HostBytes) }, fmt.Sprint(v.HostBytes)},
		{"weightfs_fuse_requests_total", map[string]string{"type": "open"}, func(f float64) bool { return f > 0 }, "> 0"},
		{"weightfs_load_seconds_count", nil, func(f float64) bool { return f >= 1 }, "≥ 1"},
		{"weightfs_errors_total", map[string]string{"kind": "load"}, func(f float64) bool { return f >= 1 }, "≥ 1"},
		{"weightfs_daemon_reads_total", nil, func(f float64) bool { return f >= 0 }, "present"},
		{"weightfs_handle_requests_total", nil, func(f float64) bool { return f == 0 }, "0 (no GPU)"},
		{"weightfs_handle_denials_total", nil, func(f float64) bool { return f == 0 }, "0 (no GPU)"},
	} {
		got, ok := promValue(samples, x.name, x.labels)
		if !ok || !x.check(got) {
			t.Errorf("%s%v = %v (present: %v), want %s", x.name, x.labels, got, ok, x.want)
		}
	}
	for _, typ := range requestTypes {
		if _, ok := promValue(samples, "weightfs_fuse_requests_total", map[string]string{"type": typ}); !ok {
			t.Errorf("no weightfs_fuse_requests_total{type=%q}", typ)
		}
	}
	if st := c.status(t); st.Requests["open"] == 0 {
		t.Errorf("status --json requests.open = 0 after reads")
	}
}

func TestControlSocketPermission(t *testing.T) {
	requireFUSE(t)
	// Folders others may enter: t.TempDir's are 0700.
	shared := func() string {
		dir, err := os.MkdirTemp("", "weightfs-shared-")
		must(t, err)
		t.Cleanup(func() { os.RemoveAll(dir) })
		must(t, os.Chmod(dir, 0o755))
		return dir
	}
	sockDir, binDir := shared(), shared()
	c := startControlAt(t, t.TempDir(), filepath.Join(sockDir, "control.sock"))
	var st syscall.Stat_t
	must(t, syscall.Stat(c.sock, &st))
	if st.Mode&0o777 != 0o600 || st.Uid != 0 || st.Mode&syscall.S_IFMT != syscall.S_IFSOCK {
		t.Errorf("control socket: mode %o owner %d, want a socket, 0600, root", st.Mode, st.Uid)
	}

	bin := filepath.Join(binDir, "weightfs")
	must(t, os.WriteFile(bin, mustRead(t, daemonBinary(t)), 0o755))
	must(t, os.Chmod(bin, 0o755))
	src := t.TempDir()
	writeModel(t, src, 110, 100)
	asNobody := func(args ...string) (string, string, int) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, append(args, "--socket", c.sock)...)
		cmd.Dir = binDir
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}}
		return runCmd(t, cmd)
	}
	for _, args := range [][]string{{"ls"}, {"status", "--json"}, {"load", "x", src}, {"unload", "x"}, {"verify", "x"}} {
		out, errOut, code := asNobody(args...)
		if code != 1 {
			t.Errorf("weightfs %v as uid 65534: exit status %d, want 1: %s%s", args, code, out, errOut)
		}
		if line := oneErrorLine(t, args, out, errOut); !strings.Contains(line, "permission denied") {
			t.Errorf("weightfs %v as uid 65534: %q does not say permission denied", args, line)
		}
	}
	if l := c.list(t); len(l.Models) != 0 {
		t.Errorf("refused callers changed the daemon: %+v", l)
	}
}

func TestControlErrors(t *testing.T) {
	// A socket nobody listens on: a path that is not there, and a socket
	// file left behind.
	dir := t.TempDir()
	stale := filepath.Join(dir, "stale.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	must(t, err)
	l.SetUnlinkOnClose(false)
	l.Close()
	src := t.TempDir()
	for _, sock := range []string{"/nonexistent/sock", stale} {
		for _, args := range [][]string{{"ls"}, {"ls", "--json"}, {"status"}, {"load", "m", src}, {"unload", "m"}, {"verify", "m"}} {
			args := append(args, "--socket", sock)
			out, errOut, code := cli(t, args...)
			if code != 1 {
				t.Errorf("weightfs %v: exit status %d, want 1", args, code)
			}
			if line := oneErrorLine(t, args, out, errOut); !strings.Contains(line, "no weightfs daemon at "+sock) {
				t.Errorf("weightfs %v: %q; want it to say no daemon runs at %s", args, line, sock)
			}
		}
	}

	for _, x := range []struct {
		args []string
		want string
	}{
		{[]string{"unload"}, "usage: weightfs unload NAME"},
		{[]string{"unload", "a", "b"}, "usage: weightfs unload NAME"},
		{[]string{"unload", "m", "--version", "x"}, "--version"},
		{[]string{"unload", "m", "--version", "-1"}, "--version"},
		{[]string{"load"}, "usage: weightfs load NAME PATH"},
		{[]string{"load", "m"}, "usage: weightfs load NAME PATH"},
		{[]string{"load", "m@1", src}, "must not contain"},
		{[]string{"load", ".m", src}, "must not start with"},
		{[]string{"ls", "extra"}, "usage: weightfs ls"},
		{[]string{"ls", "--nope"}, "unknown flag: --nope"},
		{[]string{"status", "--bogus"}, "unknown flag: --bogus"},
		{[]string{"verify"}, "usage: weightfs verify NAME"},
		{[]string{"verify", "m", "--version", "x"}, "--version"},
		{[]string{"ls", "--socket"}, "--socket"},
	} {
		out, errOut, code := cli(t, x.args...)
		if code != 2 {
			t.Errorf("weightfs %v: exit status %d, want 2", x.args, code)
		}
		if line := oneErrorLine(t, x.args, out, errOut); !strings.Contains(line, x.want) {
			t.Errorf("weightfs %v: %q does not contain %q", x.args, line, x.want)
		}
	}
}

// TestKeepVersionsAndRollback: the daemon's --keep-versions reaches the
// store, and weightfs rollback moves the mount's symlink at once.
func TestKeepVersionsAndRollback(t *testing.T) {
	src := filepath.Join(t.TempDir(), "m")
	writeModel(t, src, 50, 300)
	c := startControl(t, "--keep-versions", "2")
	for range 3 {
		if _, stderr, code := c.run(t, "load", "m", src); code != 0 {
			t.Fatalf("load: exit %d: %s", code, stderr)
		}
	}
	if _, err := os.Lstat(filepath.Join(c.mnt, "m@1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("m@1 after m@3 with --keep-versions 2: %v, want ENOENT", err)
	}
	if !strings.Contains(c.log(), `msg="dropped an old version" version=m@1`) {
		t.Errorf("the daemon did not log dropping m@1:\n%s", c.log())
	}
	if stdout, stderr, code := c.run(t, "rollback", "m"); code != 0 || stdout != "m -> m@2\n" {
		t.Fatalf("rollback: exit %d, %q, %s", code, stdout, stderr)
	}
	if target, err := os.Readlink(filepath.Join(c.mnt, "m")); err != nil || target != "m@2" {
		t.Errorf("m -> %q, %v after the rollback; want m@2", target, err)
	}
	if _, stderr, code := c.run(t, "rollback", "m"); code != 1 || !strings.Contains(stderr, "no version older than the current m@2") {
		t.Errorf("a second rollback: exit %d, %q; want 1, nothing older", code, stderr)
	}
}
