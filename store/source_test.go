package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// These tests use only the store's public API, so that they run (and fail)
// against the code before sources were checked.

// srcModel writes a minimal model folder (config.json, model.safetensors)
// at dir and returns dir.
func srcModel(t *testing.T, dir string) string {
	t.Helper()
	writeFile(t, filepath.Join(dir, "config.json"), []byte(`{"model_type":"tiny"}`))
	writeFile(t, filepath.Join(dir, "model.safetensors"), safetensorsBytes(t, u8("a", 1, 2, 3)))
	return dir
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// hfRepo writes a Hugging Face cache repository models--org--NAME under
// base with snapshots revs (each a model whose files link into blobs/) and
// refs/main naming main ("" : no refs/main).
func hfRepo(t *testing.T, base, name, main string, revs ...string) string {
	t.Helper()
	repo := filepath.Join(base, "models--org--"+name)
	model := srcModel(t, t.TempDir())
	for _, rev := range revs {
		for _, f := range []string{"config.json", "model.safetensors"} {
			b, err := os.ReadFile(filepath.Join(model, f))
			if err != nil {
				t.Fatal(err)
			}
			writeFile(t, filepath.Join(repo, "blobs", rev+"-"+f), b)
			symlink(t, filepath.Join("..", "..", "blobs", rev+"-"+f), filepath.Join(repo, "snapshots", rev, f))
		}
	}
	if main != "" {
		writeFile(t, filepath.Join(repo, "refs", "main"), []byte(main))
	}
	return repo
}

// refused loads dir and wants an ErrInvalid naming every one of want; the
// store must hold nothing afterwards.
func refused(t *testing.T, dir string, want ...string) {
	t.Helper()
	s := newTestStore(t, Budgets{})
	v, err := s.Load(context.Background(), "m", dir, LoadOptions{})
	if err == nil {
		var files []string
		for _, f := range v.Files() {
			files = append(files, f.Path())
		}
		t.Fatalf("load of %s succeeded, serving %v", dir, files)
	}
	if !errors.Is(err, ErrInvalid) {
		t.Errorf("load: %v; want ErrInvalid", err)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("load: %q does not say %q", err, w)
		}
	}
	if len(s.Models()) != 0 || s.Usage().HostReserved != 0 {
		t.Error("a refused load left something behind")
	}
}

// TestSourceSymlinksOutsideRefused: a file is served only from inside the
// model folder or, for a Hugging Face snapshot, its own repository's blobs.
func TestSourceSymlinksOutsideRefused(t *testing.T) {
	elsewhere := t.TempDir()
	secret := filepath.Join(elsewhere, "shadow")
	writeFile(t, secret, []byte("root:$6$secret\n"))
	if err := os.Chmod(secret, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Run("symlink to a root-only file", func(t *testing.T) {
		dir := srcModel(t, t.TempDir())
		link := filepath.Join(dir, "tokenizer.json")
		symlink(t, secret, link)
		refused(t, dir, link, secret, "outside the model folder")
	})
	t.Run("relative symlink climbing out", func(t *testing.T) {
		dir := srcModel(t, filepath.Join(t.TempDir(), "m"))
		link := filepath.Join(dir, "sub", "vocab.txt")
		target, err := filepath.Rel(filepath.Dir(link), secret)
		if err != nil {
			t.Fatal(err)
		}
		symlink(t, target, link)
		if _, err := os.Stat(link); err != nil {
			t.Fatalf("fixture: %v", err)
		}
		refused(t, dir, link, target)
	})
	t.Run("symlink to another folder", func(t *testing.T) {
		dir := srcModel(t, t.TempDir())
		link := filepath.Join(dir, "extra")
		symlink(t, elsewhere, link)
		refused(t, dir, link, elsewhere)
	})
	t.Run("symlink to another repository's blobs", func(t *testing.T) {
		cache := t.TempDir()
		other := hfRepo(t, cache, "other", "r1", "r1")
		repo := hfRepo(t, cache, "mine", "r1", "r1")
		link := filepath.Join(repo, "snapshots", "r1", "tokenizer.json")
		symlink(t, filepath.Join("..", "..", "..", filepath.Base(other), "blobs", "r1-config.json"), link)
		refused(t, filepath.Join(repo, "snapshots", "r1"), link, filepath.Join(other, "blobs", "r1-config.json"))
	})
	t.Run("dangling symlink", func(t *testing.T) {
		dir := srcModel(t, t.TempDir())
		link := filepath.Join(dir, "gone.json")
		symlink(t, filepath.Join(elsewhere, "nothing"), link)
		refused(t, dir, link, "no such file")
	})
	t.Run("symlink inside the folder is served", func(t *testing.T) {
		dir := srcModel(t, t.TempDir())
		symlink(t, "config.json", filepath.Join(dir, "alias.json"))
		s := newTestStore(t, Budgets{})
		v, err := s.Load(context.Background(), "m", dir, LoadOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, f := v.Root().Lookup("alias.json"); f == nil || string(f.Bytes()) != `{"model_type":"tiny"}` {
			t.Errorf("alias.json not served as config.json's bytes: %v", f)
		}
	})
}

// TestSourceNotAModel: a folder without a .safetensors file, or without a
// config.json beside its weights, is refused naming what is missing.
func TestSourceNotAModel(t *testing.T) {
	t.Run("/etc", func(t *testing.T) {
		refused(t, "/etc", "/etc is not a model", "no .safetensors file")
	})
	t.Run("not a model, with a link outside", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "config.json"), []byte("{}"))
		symlink(t, "/etc/passwd", filepath.Join(dir, "passwd"))
		refused(t, dir, dir+" is not a model", "no .safetensors file")
	})
	t.Run("no safetensors", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "config.json"), []byte("{}"))
		writeFile(t, filepath.Join(dir, "passwd"), []byte("root:x:0:0\n"))
		refused(t, dir, dir, "no .safetensors file")
	})
	t.Run("no config.json", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "sub", "model.safetensors"), safetensorsBytes(t, u8("a", 1)))
		refused(t, dir, dir, "config.json", "sub/model.safetensors")
	})
	t.Run("config.json only in another branch", func(t *testing.T) {
		dir := t.TempDir()
		writeFile(t, filepath.Join(dir, "a", "config.json"), []byte("{}"))
		writeFile(t, filepath.Join(dir, "b", "model.safetensors"), safetensorsBytes(t, u8("a", 1)))
		refused(t, dir, "config.json", "b/model.safetensors")
	})
	for name, files := range map[string][]string{
		"PEFT adapter":           {"adapter_config.json", "adapter_model.safetensors"},
		"config above a variant": {"config.json", "fp8/model.safetensors"},
		"components with configs": {"model_index.json", "unet/config.json", "unet/model.safetensors",
			"vae/config.json", "vae/model.safetensors"},
	} {
		t.Run(name+" is a model", func(t *testing.T) {
			dir := t.TempDir()
			for _, f := range files {
				b := []byte("{}")
				if strings.HasSuffix(f, ".safetensors") {
					b = safetensorsBytes(t, u8("a", 1))
				}
				writeFile(t, filepath.Join(dir, f), b)
			}
			s := newTestStore(t, Budgets{})
			if _, err := s.Load(context.Background(), "m", dir, LoadOptions{}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestSourceHuggingFaceRepository: a models--* folder is loaded as the
// snapshot refs/main names, or refused with the snapshots to choose from.
func TestSourceHuggingFaceRepository(t *testing.T) {
	cache := t.TempDir()
	repo := hfRepo(t, cache, "tiny", "bbbb2222\n", "aaaa1111", "bbbb2222")
	s := newTestStore(t, Budgets{})
	v, err := s.Load(context.Background(), "m", repo, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(repo, "snapshots", "bbbb2222"); v.Source() != want {
		t.Errorf("source %s, want the snapshot refs/main names, %s", v.Source(), want)
	}
	var paths []string
	for _, f := range v.Files() {
		paths = append(paths, f.Path())
	}
	if strings.Join(paths, " ") != "config.json model.safetensors" {
		t.Errorf("served %v, want the snapshot's files only", paths)
	}

	noRef := hfRepo(t, cache, "noref", "", "aaaa1111", "bbbb2222")
	refused(t, noRef, noRef, "refs/main", "aaaa1111, bbbb2222", filepath.Join(noRef, "snapshots"))
	badRef := hfRepo(t, cache, "badref", "../../../etc", "aaaa1111")
	refused(t, badRef, "does not name a snapshot")
	goneRef := hfRepo(t, cache, "goneref", "cccc3333", "aaaa1111")
	refused(t, goneRef, "cccc3333", "not a folder")
}

// TestSourceFolderIsSymlink: a model folder path that is itself a symlink
// is resolved first, and containment is checked against what it points to.
func TestSourceFolderIsSymlink(t *testing.T) {
	base := t.TempDir()
	real := srcModel(t, filepath.Join(base, "m1"))
	current := filepath.Join(base, "current")
	symlink(t, "m1", current)
	s := newTestStore(t, Budgets{})
	v, err := s.Load(context.Background(), "m", current, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if v.Source() != real || len(v.Files()) != 2 {
		t.Errorf("source %s with %d files, want %s with 2", v.Source(), len(v.Files()), real)
	}

	// A snapshot reached through a symlink still serves its own blobs.
	repo := hfRepo(t, base, "tiny", "r1", "r1")
	snap := filepath.Join(base, "snap")
	symlink(t, filepath.Join(repo, "snapshots", "r1"), snap)
	v, err = s.Load(context.Background(), "hf", snap, LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, f := v.Root().Lookup("config.json"); f == nil || string(f.Bytes()) != `{"model_type":"tiny"}` {
		t.Errorf("config.json not served from the blob: %v", f)
	}
}
