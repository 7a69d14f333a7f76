package fs

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/safetensors"
)

// quiet keeps the tests' output to their own messages.
var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// requireFUSE skips a test that mounts unless it runs as root with /dev/fuse:
// Mount uses DirectMount (mount(2) itself, no fusermount).
func requireFUSE(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: mounting needs root (fs.Mount uses DirectMount; run the tests as root, as CI does)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("skipping: mounting needs /dev/fuse: %v", err)
	}
}

// newStore makes an empty store on memfds, closed when the test ends.
func newStore(t testing.TB) *store.Store {
	t.Helper()
	return newStoreOn(t, store.OpenMemfdArena())
}

func newStoreOn(t testing.TB, arena *store.Arena) *store.Store {
	t.Helper()
	st := store.New(arena, store.Options{Logger: quiet})
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("close store: %v", err)
		}
	})
	return st
}

// model is a model folder written by writeModel: its files' bytes by
// '/'-separated path.
type model map[string][]byte

const weightsFile = "model.safetensors"

// paths are the model's file paths in order.
func (m model) paths() []string {
	var out []string
	for p := range m {
		out = append(out, p)
	}
	sort.Strings(out)
	return out
}

// writeModel writes a small model folder into dir: a config, a weights file
// whose size is not a multiple of the page size (nor of a huge page), and a tokenizer in a
// subdirectory with a directory of its own. seed makes versions differ.
func writeModel(t testing.TB, dir string, seed byte) model {
	t.Helper()
	fill := func(n int, salt byte) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i*7) ^ seed ^ salt
		}
		return b
	}
	var w bytes.Buffer
	err := safetensors.Write(&w, []safetensors.Tensor{
		// 2.2 MB: on the tmpfs arena, one 2 MiB huge page and a tail of
		// 4 KiB pages, so the read suite covers both kinds of page.
		{Name: "embed.weight", DType: "BF16", Shape: []int64{1100, 1000}, Data: fill(2200000, 1)},
		{Name: "norm.weight", DType: "F32", Shape: []int64{7}, Data: fill(28, 2)},
	}, map[string]string{"format": "pt"})
	if err != nil {
		t.Fatal(err)
	}
	config, _ := json.Marshal(map[string]any{"model_type": "tiny", "seed": seed})
	m := model{
		"config.json":                   config,
		weightsFile:                     w.Bytes(),
		"tokenizer/tokenizer.json":      []byte(`{"version":"1.0","seed":` + string('0'+seed%10) + `}`),
		"tokenizer/extra/merges.txt":    []byte("#version: 0.2\na b\n"),
		"tokenizer/extra/vocab.txt.bin": fill(5000, 3),
	}
	for p, b := range m {
		full := filepath.Join(dir, filepath.FromSlash(p))
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return m
}

// loadModel writes a model folder and loads it as the next version of name.
func loadModel(t testing.TB, st *store.Store, name string, seed byte) (*store.Version, model) {
	t.Helper()
	dir := t.TempDir()
	// t.TempDir's parent is 0700: open it so that the version's directory
	// carries the model folder's own mode (0755 → 0555), as for a model
	// folder every user can reach.
	if err := os.Chmod(filepath.Dir(dir), 0o755); err != nil {
		t.Fatal(err)
	}
	m := writeModel(t, dir, seed)
	v, err := st.Load(context.Background(), name, dir, store.LoadOptions{})
	if err != nil {
		t.Fatalf("load %s: %v", name, err)
	}
	return v, m
}

// storeFile finds a version's file by path.
func storeFile(t testing.TB, v *store.Version, path string) *store.File {
	t.Helper()
	for _, f := range v.Files() {
		if f.Path() == path {
			return f
		}
	}
	t.Fatalf("%s has no file %s", v.Name(), path)
	return nil
}

// mountStore mounts st on a fresh temporary directory until the test ends.
func mountStore(t testing.TB, st *store.Store, opts Options) *Server {
	t.Helper()
	requireFUSE(t)
	if opts.Logger == nil {
		opts.Logger = quiet
	}
	srv, err := Mount(t.TempDir(), st, opts)
	if err != nil {
		t.Fatalf("mount: %v", err)
	}
	t.Cleanup(func() { unmount(t, srv) })
	return srv
}

func unmount(t testing.TB, srv *Server) {
	t.Helper()
	if err := srv.Unmount(); err != nil {
		t.Errorf("unmount: %v", err)
		if err := srv.Detach(); err != nil {
			t.Errorf("detach: %v", err)
		}
	}
}
