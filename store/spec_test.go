package store

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

func TestParseModelSpec(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if name, path, err := ParseModelSpec("m=" + dir); err != nil || name != "m" || path != dir {
		t.Errorf("ParseModelSpec(m=DIR) = %q, %q, %v", name, path, err)
	}
	for _, c := range []struct{ spec, want string }{
		{"noequals", `"noequals": want NAME=PATH`},
		{"m=", "want NAME=PATH"},
		{"a@b=" + dir, "must not contain"},
		{"=" + dir, "empty"},
		{"m=" + filepath.Join(dir, "missing"), "m: " + filepath.Join(dir, "missing") + ": no such file or directory"},
		{"m=" + file, "m: " + file + " is not a directory"},
	} {
		_, _, err := ParseModelSpec(c.spec)
		if err == nil || !strings.Contains(err.Error(), c.want) || !errors.Is(err, ErrInvalid) {
			t.Errorf("ParseModelSpec(%q) = %v; want an ErrInvalid containing %q", c.spec, err, c.want)
		}
	}
	if err := CheckDir(filepath.Join(dir, "missing")); !errors.Is(err, syscall.ENOENT) {
		t.Errorf("CheckDir(missing) = %v; want ENOENT kept", err)
	}
}
