package store

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/weightfs/weightfs/store/safetensors"
)

// newTestStore makes a store on memfds, which needs no privileges.
func newTestStore(t *testing.T, budgets Budgets) *Store {
	t.Helper()
	s := New(OpenMemfdArena(), Options{Budgets: budgets})
	t.Cleanup(func() { s.Close() })
	return s
}

// writeFolder writes a one-file model of about size bytes.
func writeFolder(t *testing.T, size int) string {
	t.Helper()
	dir := t.TempDir()
	var b bytes.Buffer
	err := safetensors.Write(&b, []safetensors.Tensor{
		{Name: "w", DType: "U8", Shape: []int64{int64(size)}, Data: bytes.Repeat([]byte{7}, size)},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{"model.safetensors": b.Bytes(), "config.json": []byte("{}")} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func load(t *testing.T, s *Store, name, dir string) *Version {
	t.Helper()
	v, err := s.Load(context.Background(), name, dir, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestUnloadDrainsUntilReleased(t *testing.T) {
	s := newTestStore(t, Budgets{})
	dir := writeFolder(t, 1<<20)
	v1 := load(t, s, "m", dir)
	v2 := load(t, s, "m", dir)
	if !v1.Acquire() {
		t.Fatal("acquire v1")
	}
	gone, err := s.Unload("m", 1)
	if err != nil || len(gone) != 1 || gone[0] != v1 {
		t.Fatalf("unload m@1: %v %v", gone, err)
	}
	if s.Model("m").Current() != v2 || s.Version("m", 1) != nil {
		t.Fatal("m@1 still visible or m@2 not current")
	}
	if d := s.Draining(); len(d) != 1 || d[0] != v1 || v1.State() != StateDraining {
		t.Fatalf("draining %v, state %s", d, v1.State())
	}
	if got := s.Usage().HostBytes; got != v1.Bytes()+v2.Bytes() {
		t.Errorf("usage %d while draining, want both versions %d", got, v1.Bytes()+v2.Bytes())
	}
	if !bytes.Equal(v1.Files()[1].Bytes()[v1.Files()[1].Header().DataOffset():][:4], []byte{7, 7, 7, 7}) {
		t.Error("draining version's bytes are gone while open")
	}
	v1.Release()
	if d := s.Draining(); len(d) != 0 {
		t.Fatalf("still draining after the last release: %v", d)
	}
	if v1.Acquire() {
		t.Error("a freed version could be acquired")
	}
	if got := s.Usage().HostBytes; got != v2.Bytes() {
		t.Errorf("usage %d after free, want %d", got, v2.Bytes())
	}
	if _, err := s.Unload("m", 7); err == nil || !strings.Contains(err.Error(), "no version 7") {
		t.Errorf("unload m@7: %v", err)
	}
	if _, err := s.Unload("nope", 0); err == nil || !strings.Contains(err.Error(), "no such model") {
		t.Errorf("unload nope: %v", err)
	}
	if _, err := s.Unload("m", 0); err != nil || s.Model("m") != nil {
		t.Errorf("unload all of m: %v", err)
	}
}

func TestHostBudget(t *testing.T) {
	small, big := writeFolder(t, 1<<20), writeFolder(t, 3<<20)
	s := newTestStore(t, Budgets{Host: 4 << 20})
	v := load(t, s, "a", small)
	_, err := s.Load(context.Background(), "b", big, LoadOptions{})
	if err == nil || !strings.Contains(err.Error(), "--host-memory") || !strings.Contains(err.Error(), "needs 3.0 MiB") {
		t.Fatalf("over-budget load: %v", err)
	}
	if s.Model("b") != nil || s.Model("a").Current() != v || s.Usage().HostReserved != 0 {
		t.Fatal("a refused load disturbed the store")
	}
	if _, err := s.Unload("a", 0); err != nil {
		t.Fatal(err)
	}
	load(t, s, "b", big)
}

func TestVerify(t *testing.T) {
	s := newTestStore(t, Budgets{})
	dir := writeFolder(t, 4096)
	load(t, s, "m", dir)
	v, checks, err := s.Verify(context.Background(), "m", 0)
	if err != nil || v.Number() != 1 || len(checks) != 2 || !checks[0].OK || !checks[1].OK {
		t.Fatalf("verify unchanged: %+v %v", checks, err)
	}
	f := filepath.Join(dir, "model.safetensors")
	b, _ := os.ReadFile(f)
	b[len(b)-1] ^= 0xff
	os.WriteFile(f, b, 0o644)
	os.Remove(filepath.Join(dir, "config.json"))
	_, checks, _ = s.Verify(context.Background(), "m", 1)
	for _, c := range checks {
		if c.OK {
			t.Errorf("%s: verified OK after its source changed", c.Path)
		}
	}
	if _, _, err := s.Verify(context.Background(), "m", 9); err == nil {
		t.Error("verify of a missing version succeeded")
	}
}

func TestHumanBytes(t *testing.T) {
	for n, want := range map[int64]string{0: "0 B", 1023: "1023 B", 1024: "1.0 KiB", 3 << 29: "1.5 GiB"} {
		if got := HumanBytes(n); got != want {
			t.Errorf("HumanBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestThreadGroup(t *testing.T) {
	pid := os.Getpid()
	if got := threadGroup(pid); got != pid {
		t.Errorf("threadGroup(own pid) = %d, want %d", got, pid)
	}
	if got := threadGroup(1 << 30); got != 1<<30 {
		t.Errorf("threadGroup(no such task) = %d", got)
	}
}
