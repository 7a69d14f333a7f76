package store

import (
	"context"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// chmod and chown set a fixture's mode and owner (the tests run as root).
func chmod(t *testing.T, p string, mode fs.FileMode) {
	t.Helper()
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
}

func chown(t *testing.T, p string, uid, gid int) {
	t.Helper()
	if err := os.Lchown(p, uid, gid); err != nil {
		t.Skipf("chown needs root: %v", err)
	}
}

func fileOf(t *testing.T, v *Version, path string) *File {
	t.Helper()
	for _, f := range v.Files() {
		if f.Path() == path {
			return f
		}
	}
	t.Fatalf("%s not in the version", path)
	return nil
}

// TestSourcePermissions: a served file keeps its source's owner, group and
// read bits, a directory its read and search bits, and a class of users the
// folders above keep out loses its bits.
func TestSourcePermissions(t *testing.T) {
	base := t.TempDir()
	chmod(t, filepath.Dir(base), 0o755) // t.TempDir's parent is 0700
	dir := srcModel(t, filepath.Join(base, "m"))
	for name, mode := range map[string]fs.FileMode{"secret.json": 0o600, "none.json": 0, "run.sh": 0o755, "group.json": 0o640} {
		writeFile(t, filepath.Join(dir, name), []byte("x"))
		chmod(t, filepath.Join(dir, name), mode)
	}
	chown(t, filepath.Join(dir, "secret.json"), 65534, 65534)
	writeFile(t, filepath.Join(dir, "tok", "vocab.txt"), []byte("a b"))
	chmod(t, filepath.Join(dir, "tok"), 0o750)
	chown(t, filepath.Join(dir, "tok"), 0, 65534)

	s := newTestStore(t, Budgets{})
	v, err := s.Load(context.Background(), "m", dir, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]struct {
		perm     fs.FileMode
		uid, gid uint32
	}{
		"config.json": {0o444, 0, 0}, "secret.json": {0o400, 65534, 65534}, "none.json": {0, 0, 0},
		"run.sh": {0o444, 0, 0}, "group.json": {0o440, 0, 0}, "tok/vocab.txt": {0o444, 0, 0},
	} {
		f := fileOf(t, v, path)
		uid, gid := f.Owner()
		if f.Perm() != want.perm || uid != want.uid || gid != want.gid {
			t.Errorf("%s: %v %d:%d, want %v %d:%d", path, f.Perm(), uid, gid, want.perm, want.uid, want.gid)
		}
	}
	if root := v.Root(); root.Perm() != 0o555 {
		t.Errorf("version root %v, want the model folder's 0755 without write bits", root.Perm())
	}
	tok, _ := v.Root().Lookup("tok")
	if uid, gid := tok.Owner(); tok.Perm() != 0o550 || uid != 0 || gid != 65534 {
		t.Errorf("tok/: %v %d:%d, want 0550 0:65534", tok.Perm(), uid, gid)
	}

	// A folder nobody but its owner may enter keeps everyone else out of
	// the version, whatever the modes inside.
	private := filepath.Join(base, "private")
	hidden := srcModel(t, filepath.Join(private, "m"))
	chmod(t, private, 0o700)
	v, err = s.Load(context.Background(), "p", hidden, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := v.Root().Perm(); got != 0o500 {
		t.Errorf("version root of a model in a 0700 folder: %v, want 0500", got)
	}
	// The same for a blob in a blobs/ folder only its owner may enter.
	repo := hfRepo(t, base, "tiny", "r1", "r1")
	chmod(t, filepath.Join(repo, "blobs"), 0o700)
	v, err = s.Load(context.Background(), "hf", filepath.Join(repo, "snapshots", "r1"), LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if f := fileOf(t, v, "config.json"); f.Perm() != 0o400 {
		t.Errorf("blob in a 0700 blobs/: %v, want 0400", f.Perm())
	}
}

// TestSourceReach works through the classes of the reach rule.
func TestSourceReach(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		dirMode        fs.FileMode
		dirUID, dirGID int
		uid, gid       uint32
		perm, want     fs.FileMode
		why            string
	}{
		{0o755, 0, 0, 1000, 1000, 0o444, 0o444, "open folder"},
		{0o700, 1000, 1000, 1000, 1000, 0o444, 0o400, "home folder of the owner"},
		{0o750, 1000, 1000, 1000, 1000, 0o444, 0o440, "home folder shared with the group"},
		{0o711, 0, 0, 1000, 1000, 0o444, 0o444, "search-only folder"},
		{0o700, 0, 0, 0, 0, 0o444, 0o400, "root's folder"},
		{0o750, 0, 1000, 1000, 1000, 0o444, 0o040, "group folder: the owner's membership is unknown"},
		{0o701, 0, 2000, 2000, 2000, 0o444, 0o004, "folder open to others but not its group"},
	} {
		p := filepath.Join(dir, strings.ReplaceAll(c.why, " ", "_"))
		if err := os.Mkdir(p, c.dirMode); err != nil {
			t.Fatal(err)
		}
		chmod(t, p, c.dirMode)
		chown(t, p, c.dirUID, c.dirGID)
		if got := (attrs{uid: c.uid, gid: c.gid, perm: c.perm}).reach([]string{p}); got != c.want {
			t.Errorf("%s: %v for %d:%d under %v %d:%d, want %v", c.why, got, c.uid, c.gid, c.dirMode, c.dirUID, c.dirGID, c.want)
		}
	}
}

// TestSourceSwappedFileRefused: between the scan and the copy, a file
// replaced by a symlink or by another file is refused, not followed.
func TestSourceSwappedFileRefused(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "shadow")
	writeFile(t, secret, []byte("root:$6$secret\n"))
	dir := srcModel(t, t.TempDir())
	writeFile(t, filepath.Join(dir, "tokenizer.json"), []byte("{}"))
	_, files, err := scanFolder(dir, slog.Default())
	if err != nil {
		t.Fatal(err)
	}
	byRel := map[string]*sourceFile{}
	for _, f := range files {
		byRel[f.rel] = f
	}
	tok := filepath.Join(dir, "tokenizer.json")
	if err := os.Remove(tok); err != nil {
		t.Fatal(err)
	}
	symlink(t, secret, tok)
	if fh, err := byRel["tokenizer.json"].open(); err == nil || !strings.Contains(err.Error(), "symlink") {
		if fh != nil {
			fh.Close()
		}
		t.Errorf("open of a file swapped for a symlink: %v", err)
	}
	other := filepath.Join(dir, "other")
	writeFile(t, other, []byte("{}"))
	if err := os.Rename(other, filepath.Join(dir, "config.json")); err != nil {
		t.Fatal(err)
	}
	if fh, err := byRel["config.json"].open(); err == nil || !strings.Contains(err.Error(), "replaced") {
		if fh != nil {
			fh.Close()
		}
		t.Errorf("open of a file replaced by another: %v", err)
	}
	fh, err := byRel["model.safetensors"].open()
	if err != nil {
		t.Fatalf("open of an untouched file: %v", err)
	}
	fh.Close()
}
