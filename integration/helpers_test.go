package integration

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	wfs "github.com/weightfs/weightfs/fs"
	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/safetensors"
)

// requireFUSE skips tests that mount unless they run as root with /dev/fuse.
func requireFUSE(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: mounting needs root (run the tests as root, as CI does)")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("skipping: mounting needs /dev/fuse: %v", err)
	}
}

// mounted is a store served on a temporary mount point.
type mounted struct {
	store *store.Store
	srv   *wfs.Server
	dir   string
}

// mountStore mounts an empty store; cached forces the non-passthrough path.
func mountStore(t testing.TB, cached bool) *mounted {
	t.Helper()
	requireFUSE(t)
	arena, err := store.OpenArena(0)
	if err != nil {
		t.Fatal(err)
	}
	st := store.New(arena, store.Options{})
	dir := t.TempDir()
	srv, err := wfs.Mount(dir, st, wfs.Options{ForceCached: cached, AllowOther: true})
	if err != nil {
		st.Close()
		t.Fatalf("mount: %v", err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
			srv.Detach()
		}
		if err := st.Close(); err != nil {
			t.Errorf("close store: %v", err)
		}
	})
	return &mounted{store: st, srv: srv, dir: dir}
}

func (m *mounted) load(t testing.TB, name, dir string) *store.Version {
	t.Helper()
	v, err := m.store.Load(context.Background(), name, dir, store.LoadOptions{ChunkSize: 1 << 20, Readers: 4})
	if err != nil {
		t.Fatalf("load %s: %v", name, err)
	}
	return v
}

// testTensors makes deterministic tensors of several dtypes and shapes,
// including a 0-rank and a zero-size tensor.
func testTensors(seed uint64, prefix string, big int) []safetensors.Tensor {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	fill := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return b
	}
	return []safetensors.Tensor{
		{Name: prefix + "embed.weight", DType: "BF16", Shape: []int64{int64(big), 64}, Data: fill(big * 64 * 2)},
		{Name: prefix + "proj.weight", DType: "F32", Shape: []int64{33, 17}, Data: fill(33 * 17 * 4)},
		{Name: prefix + "odd.bf16", DType: "BF16", Shape: []int64{3}, Data: fill(6)},
		{Name: prefix + "ids", DType: "I64", Shape: []int64{5}, Data: fill(40)},
		{Name: prefix + "mask", DType: "U8", Shape: []int64{7, 3}, Data: fill(21)},
		{Name: prefix + "half", DType: "F16", Shape: []int64{2, 2, 2}, Data: fill(16)},
		{Name: prefix + "scalar", DType: "F32", Shape: []int64{}, Data: fill(4)},
		{Name: prefix + "empty", DType: "F32", Shape: []int64{0, 4}, Data: nil},
	}
}

func writeSafetensors(t testing.TB, path string, tensors []safetensors.Tensor) {
	t.Helper()
	var buf bytes.Buffer
	if err := safetensors.Write(&buf, tensors, map[string]string{"format": "pt"}); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// writeModel writes a two-shard model folder with an index, a config, a
// tokenizer and a file in a subdirectory. big scales the largest tensor.
func writeModel(t testing.TB, dir string, seed uint64, big int) {
	t.Helper()
	shards := map[string][]safetensors.Tensor{
		"model-00001-of-00002.safetensors": testTensors(seed, "a.", big),
		"model-00002-of-00002.safetensors": testTensors(seed+1, "b.", 16),
	}
	weightMap := map[string]string{}
	for name, ts := range shards {
		writeSafetensors(t, filepath.Join(dir, name), ts)
		for _, x := range ts {
			weightMap[x.Name] = name
		}
	}
	writeJSON(t, filepath.Join(dir, "model.safetensors.index.json"),
		map[string]any{"metadata": map[string]any{"total_size": 0}, "weight_map": weightMap})
	writeJSON(t, filepath.Join(dir, "config.json"), map[string]any{"model_type": "test", "seed": seed})
	writeFile(t, filepath.Join(dir, "tokenizer.json"), strings.Repeat(`{"x":1}`, 1000))
	writeFile(t, filepath.Join(dir, "original", "params.json"), `{"dim": 64}`)
	writeFile(t, filepath.Join(dir, ".git", "HEAD"), "ref: refs/heads/main\n")
}

func writeJSON(t testing.TB, path string, v any) {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, string(b))
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// rawSafetensors builds a file from a literal header and data, for inputs
// the writer refuses to make.
func rawSafetensors(header string, data []byte) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, uint64(len(header)))
	b.WriteString(header)
	b.Write(data)
	return b.Bytes()
}

// sourceFiles lists a model folder's files as the mount should show them.
func sourceFiles(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && strings.HasPrefix(d.Name(), ".") && p != dir {
			return filepath.SkipDir
		}
		if !d.IsDir() {
			rel, _ := filepath.Rel(dir, p)
			out[rel] = p
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func mustRead(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sameBytes(t testing.TB, what string, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	if len(got) != len(want) {
		t.Fatalf("%s: %d bytes, want %d", what, len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("%s: first difference at byte %d: %#x, want %#x", what, i, got[i], want[i])
		}
	}
}
