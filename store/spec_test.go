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

func TestParseModelSpecs(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	got, err := ParseModelSpecs([]string{"x=" + a, "y=" + b}, "demo")
	if err != nil || len(got) != 2 || got[0] != (ModelSpec{Name: "x", Path: a}) || got[1] != (ModelSpec{Name: "y", Path: b}) {
		t.Fatalf("ParseModelSpecs = %+v, %v", got, err)
	}
	for _, c := range []struct {
		specs []string
		taken []string
		want  string
	}{
		{[]string{"x=" + a, "x=" + b}, nil, "x: name given twice"},
		{[]string{"demo=" + a}, []string{"demo"}, "demo: name given twice"},
		{[]string{"x=" + a, "bad"}, nil, `"bad": want NAME=PATH`},
	} {
		_, err := ParseModelSpecs(c.specs, c.taken...)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ParseModelSpecs(%q, %q) = %v; want an ErrInvalid containing %q", c.specs, c.taken, err, c.want)
		}
	}
}
