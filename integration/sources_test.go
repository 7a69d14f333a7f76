package integration

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/weightfs/weightfs/store"
)

// asNobody runs a command as uid/gid 65534 with no supplementary groups.
func asNobody(t *testing.T, args ...string) (string, error) {
	t.Helper()
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("skipping: needs setpriv (util-linux)")
	}
	out, err := exec.Command(setpriv, append([]string{"--reuid=65534", "--regid=65534", "--clear-groups"}, args...)...).CombinedOutput()
	return string(out), err
}

// openTempDir is a t.TempDir whose parent every user may enter.
func openTempDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	must(t, os.Chmod(filepath.Dir(dir), 0o755))
	return dir
}

// TestSourcesShadowStyle: the attack from issue 8, a user's model folder
// with a symlink to a root-only file, is refused and nothing is served.
func TestSourcesShadowStyle(t *testing.T) {
	m := mountStore(t, false)
	must(t, os.Chmod(filepath.Dir(m.dir), 0o755))
	secret := filepath.Join(t.TempDir(), "shadow")
	writeFile(t, secret, "root:$6$secret:19000:0:99999:7:::\n")
	must(t, os.Chmod(secret, 0o600))
	u := openTempDir(t)
	writeModel(t, u, 1, 0)
	link := filepath.Join(u, "tokenizer.json")
	must(t, os.Remove(link))
	must(t, os.Symlink(secret, link))

	_, err := m.store.Load(t.Context(), "u", u, store.LoadOptions{})
	if !errors.Is(err, store.ErrInvalid) || !strings.Contains(err.Error(), link) || !strings.Contains(err.Error(), secret) {
		t.Errorf("load of a folder linking to a root-only file: %v; want ErrInvalid naming %s and %s", err, link, secret)
	}
	out, err := asNobody(t, "cat", filepath.Join(m.dir, "u", "tokenizer.json"))
	if err == nil || strings.Contains(out, "secret") {
		t.Errorf("uid 65534 read the link's target through the mount: %q", out)
	}
}

// TestSourcesPermissions: the mount lets a user read no more than the
// source: modes and owners carry over, and the kernel checks them.
func TestSourcesPermissions(t *testing.T) {
	m := mountStore(t, false)
	must(t, os.Chmod(filepath.Dir(m.dir), 0o755))
	if opts := mountOptions(t, m.dir); !strings.Contains(","+opts+",", ",default_permissions,") {
		t.Errorf("mount options %q lack default_permissions", opts)
	}
	src := openTempDir(t)
	writeModel(t, src, 2, 0)
	files := map[string]os.FileMode{"secret.json": 0o600, "open.json": 0o644, "none.json": 0}
	for name, mode := range files {
		writeFile(t, filepath.Join(src, name), `{"name":"`+name+`"}`)
		must(t, os.Chmod(filepath.Join(src, name), mode))
	}
	must(t, os.Lchown(filepath.Join(src, "open.json"), 65534, 65534))
	private := filepath.Join(openTempDir(t), "private", "m")
	writeModel(t, private, 3, 0)
	must(t, os.Chmod(filepath.Dir(private), 0o700))
	m.load(t, "m", src)
	m.load(t, "p", private)

	for name, want := range map[string]struct {
		mode     os.FileMode
		uid, gid uint32
	}{"secret.json": {0o400, 0, 0}, "open.json": {0o444, 65534, 65534}, "none.json": {0, 0, 0}, "config.json": {0o444, 0, 0}} {
		var st syscall.Stat_t
		must(t, syscall.Stat(filepath.Join(m.dir, "m", name), &st))
		if got := os.FileMode(st.Mode & 0o7777); got != want.mode || st.Uid != want.uid || st.Gid != want.gid {
			t.Errorf("%s on the mount: %v %d:%d, want %v %d:%d", name, got, st.Uid, st.Gid, want.mode, want.uid, want.gid)
		}
	}
	if out, err := asNobody(t, "cat", filepath.Join(m.dir, "m", "secret.json")); err == nil || !strings.Contains(out, "Permission denied") {
		t.Errorf("uid 65534 read a 0600 file through the mount: %v %q", err, out)
	}
	if out, err := asNobody(t, "cat", filepath.Join(m.dir, "m", "none.json")); err == nil {
		t.Errorf("uid 65534 read a 0000 file through the mount: %q", out)
	}
	for _, name := range []string{"open.json", "config.json"} {
		out, err := asNobody(t, "cat", filepath.Join(m.dir, "m", name))
		if want := mustRead(t, filepath.Join(src, name)); err != nil || !bytes.Equal([]byte(out), want) {
			t.Errorf("uid 65534 reading %s through the mount: %v %q, want %q", name, err, out, want)
		}
	}
	// A model in a folder only root may enter stays root's on the mount.
	if out, err := asNobody(t, "cat", filepath.Join(m.dir, "p", "config.json")); err == nil {
		t.Errorf("uid 65534 read a model from a 0700 folder through the mount: %q", out)
	}
	// The mount's own nodes reveal only names and stay readable by all.
	if out, err := asNobody(t, "sh", "-c", "ls "+m.dir+" >/dev/null && readlink "+filepath.Join(m.dir, "m")+
		" && cat "+filepath.Join(m.dir, ".weightfs", "status.json")+" >/dev/null"); err != nil || strings.TrimSpace(out) != "m@1" {
		t.Errorf("uid 65534 listing the mount: %v %q", err, out)
	}
	// root still reads everything, and writes still fail with EROFS.
	sameBytes(t, "secret.json as root", mustRead(t, filepath.Join(m.dir, "m", "secret.json")), mustRead(t, filepath.Join(src, "secret.json")))
	if _, err := os.OpenFile(filepath.Join(m.dir, "m", "open.json"), os.O_WRONLY, 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("open for writing: %v, want EROFS", err)
	}
}

// mountOptions returns the super options of the mount at dir.
func mountOptions(t *testing.T, dir string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	must(t, err)
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 10 || f[4] != dir {
			continue
		}
		for i, x := range f {
			if x == "-" && i+3 < len(f) {
				return f[i+3]
			}
		}
	}
	t.Fatalf("%s not in /proc/self/mountinfo", dir)
	return ""
}
