package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/weightfs/weightfs/store/safetensors"
)

func safetensorsBytes(t *testing.T, tensors ...safetensors.Tensor) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := safetensors.Write(&b, tensors, nil); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func u8(name string, data ...byte) safetensors.Tensor {
	return safetensors.Tensor{Name: name, DType: safetensors.U8, Shape: []int64{int64(len(data))}, Data: data}
}

func index(t *testing.T, weightMap map[string]string) []byte {
	t.Helper()
	b, err := json.Marshal(map[string]any{"weight_map": weightMap})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestLoadRefusals checks that a folder that cannot be served is refused with
// an error naming the file and the problem, and leaves nothing behind.
func TestLoadRefusals(t *testing.T) {
	good := safetensorsBytes(t, u8("a", 1, 2, 3), u8("b", 4))
	cases := []struct {
		name  string
		files map[string][]byte // relative path → content; nil map: no folder
		file  string            // the file the error must name ("" : the folder)
		sub   string            // a word of the problem
	}{
		{"missing folder", nil, "", "no such file"},
		{"empty folder", map[string][]byte{}, "", "no .safetensors file"},
		{"truncated weights", map[string][]byte{"model.safetensors": good[:len(good)-1]}, "model.safetensors", ""},
		{"header is not JSON", map[string][]byte{"model.safetensors": append([]byte{4, 0, 0, 0, 0, 0, 0, 0}, "nope"...)},
			"model.safetensors", ""},
		{"index is not JSON", map[string][]byte{"model.safetensors": good, "model.safetensors.index.json": []byte("{")},
			"model.safetensors.index.json", "JSON"},
		{"index without weight_map", map[string][]byte{"model.safetensors": good, "model.safetensors.index.json": []byte(`{"metadata":{}}`)},
			"model.safetensors.index.json", "weight_map"},
		{"index names a missing shard", map[string][]byte{"model.safetensors": good,
			"model.safetensors.index.json": index(t, map[string]string{"a": "model.safetensors", "b": "model.safetensors", "c": "other.safetensors"})},
			"model.safetensors.index.json", "other.safetensors"},
		{"shard holds an unmapped tensor", map[string][]byte{"model.safetensors": good,
			"model.safetensors.index.json": index(t, map[string]string{"a": "model.safetensors"})},
			"model.safetensors.index.json", `"b"`},
		{"index maps a tensor the shard lacks", map[string][]byte{"model.safetensors": good,
			"model.safetensors.index.json": index(t, map[string]string{"a": "model.safetensors", "b": "model.safetensors", "z": "model.safetensors"})},
			"model.safetensors.index.json", `"z"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := newTestStore(t, Budgets{})
			dir := filepath.Join(t.TempDir(), "model")
			if c.files != nil {
				if err := os.Mkdir(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				for rel, b := range c.files {
					writeFile(t, filepath.Join(dir, rel), b)
				}
				if len(c.files) > 0 { // a model folder, but for the fault
					writeFile(t, filepath.Join(dir, "config.json"), []byte("{}"))
				}
			}
			_, err := s.Load(context.Background(), "m", dir, LoadOptions{})
			if err == nil {
				t.Fatal("load succeeded")
			}
			if want := filepath.Join(dir, c.file); !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not name %s", err, want)
			}
			if !strings.Contains(err.Error(), c.sub) {
				t.Errorf("error %q does not say %q", err, c.sub)
			}
			if s.Model("m") != nil || len(s.Models()) != 0 || s.Usage().HostReserved != 0 || len(s.Loads()) != 0 {
				t.Error("a failed load left something behind")
			}
		})
	}
	t.Run("folder is a file", func(t *testing.T) {
		s := newTestStore(t, Budgets{})
		f := filepath.Join(t.TempDir(), "config.json")
		writeFile(t, f, []byte("{}"))
		if _, err := s.Load(context.Background(), "m", f, LoadOptions{}); err == nil || !strings.Contains(err.Error(), "not a directory") {
			t.Errorf("load of a file: %v", err)
		}
	})
	t.Run("bad model name", func(t *testing.T) {
		s := newTestStore(t, Budgets{})
		if _, err := s.Load(context.Background(), "a@1", t.TempDir(), LoadOptions{}); err == nil || !strings.Contains(err.Error(), "a@1") {
			t.Errorf("load as a@1: %v", err)
		}
	})
}

func TestValidateModelName(t *testing.T) {
	for name, ok := range map[string]bool{
		"qwen3-8b": true, "Llama 3.1 (8B)": true, "": false, ".hidden": false, "a/b": false, "a@2": false,
		"nul\x00": false, "bad\xffutf8": false, strings.Repeat("x", 201): false, strings.Repeat("x", 200): true,
		"a\nb": false, "evil\x1b[2J": false, "del\x7f": false, "tab\t": false, "cr\r": false, "c1\u0085": false,
		"ls\u2028": false, "ps\u2029": false, "Qwen3 日本語 é": true,
	} {
		err := ValidateModelName(name)
		if (err == nil) != ok {
			t.Errorf("ValidateModelName(%q) = %v, want ok=%v", name, err, ok)
		}
		if err != nil && name != "" && (!errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), fmt.Sprintf("%q", name)) ||
			strings.ContainsFunc(err.Error(), isControl)) {
			t.Errorf("ValidateModelName(%q) = %q: want ErrInvalid quoting the name safely", name, err)
		}
	}
	// Through the store: load, unload and verify.
	s := newTestStore(t, Budgets{})
	for _, name := range []string{"a\nb", "esc\x1b]0;pwned\x07"} {
		if _, err := s.Load(context.Background(), name, t.TempDir(), LoadOptions{}); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "control characters") {
			t.Errorf("load as %q: %v", name, err)
		}
		if _, err := s.Unload(name, 0); !errors.Is(err, ErrInvalid) {
			t.Errorf("unload of %q: %v", name, err)
		}
		if _, _, err := s.Verify(context.Background(), name, 0); !errors.Is(err, ErrInvalid) {
			t.Errorf("verify of %q: %v", name, err)
		}
	}
}

// TestHuggingFaceSnapshot loads a cache snapshot: files are symlinks into
// blobs/, bookkeeping directories are skipped, subfolders become directories.
func TestHuggingFaceSnapshot(t *testing.T) {
	repo := filepath.Join(t.TempDir(), "models--org--tiny")
	weights := safetensorsBytes(t, u8("w", 9, 8, 7))
	blobs := map[string][]byte{"aaa": []byte(`{"model_type":"tiny"}`), "bbb": weights, "ccc": []byte("merges")}
	for name, b := range blobs {
		writeFile(t, filepath.Join(repo, "blobs", name), b)
	}
	snap := filepath.Join(repo, "snapshots", "0123abcd")
	for rel, blob := range map[string]string{"config.json": "aaa", "model.safetensors": "bbb", "tokenizer/merges.txt": "ccc"} {
		p := filepath.Join(snap, rel)
		os.MkdirAll(filepath.Dir(p), 0o755)
		target, _ := filepath.Rel(filepath.Dir(p), filepath.Join(repo, "blobs", blob))
		if err := os.Symlink(target, p); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, filepath.Join(snap, ".cache", "huggingface", "download", "x.lock"), []byte("lock"))
	writeFile(t, filepath.Join(snap, ".git", "HEAD"), []byte("ref"))

	s := newTestStore(t, Budgets{})
	v := load(t, s, "tiny", snap)
	var paths []string
	for _, f := range v.Files() {
		paths = append(paths, f.Path())
		if !strings.HasPrefix(f.Source(), snap) {
			t.Errorf("%s: source %s is outside the snapshot", f.Path(), f.Source())
		}
	}
	if want := []string{"config.json", "model.safetensors", "tokenizer/merges.txt"}; !reflect.DeepEqual(paths, want) {
		t.Fatalf("files %v, want %v", paths, want)
	}
	checkHostBytes(t, v)
	root := v.Root()
	sub, none := root.Lookup("tokenizer")
	if sub == nil || none != nil || sub.Name() != "tokenizer" || len(sub.Files()) != 1 || sub.Files()[0].Name() != "merges.txt" {
		t.Fatalf("tokenizer dir: %+v", sub)
	}
	if d, f := root.Lookup("model.safetensors"); d != nil || f == nil || f.Kind() != Weights || f.Kind().String() != "weights" {
		t.Errorf("lookup of the weights file: %v %v", d, f)
	}
	if d, f := root.Lookup("absent"); d != nil || f != nil {
		t.Error("lookup of an absent name found something")
	}
	if root.Name() != "" || len(root.Dirs()) != 1 || len(root.Files()) != 2 || Plain.String() != "plain" {
		t.Errorf("root: %q %d dirs %d files", root.Name(), len(root.Dirs()), len(root.Files()))
	}
	inos := map[uint64]bool{root.Ino(): true, sub.Ino(): true, s.Model("tiny").Ino(): true}
	for _, f := range v.Files() {
		inos[f.Ino()] = true
		if f.Ino() <= ReservedInos || f.BackingFd() < 0 {
			t.Errorf("%s: ino %d, fd %d", f.Path(), f.Ino(), f.BackingFd())
		}
	}
	if len(inos) != 6 {
		t.Errorf("inode numbers are not unique: %v", inos)
	}
}

func TestStoreAccessors(t *testing.T) {
	s := newTestStore(t, Budgets{})
	if s.GPUs() != nil || s.Arena().Kind() != "memfd" || s.Arena().FallbackReason() == "" {
		t.Errorf("GPUs %v, arena %s (%s)", s.GPUs(), s.Arena().Kind(), s.Arena().FallbackReason())
	}
	var removed []string
	var mu sync.Mutex
	s.OnRemove(func(v *Version) { mu.Lock(); removed = append(removed, v.Name()); mu.Unlock() })
	dir := writeFolder(t, 4096)
	v1 := load(t, s, "b", dir)
	v2 := load(t, s, "b", dir)
	load(t, s, "a", dir)
	if st := s.Stats(); st.Models != 2 || st.Versions != 3 || st.Files != 6 || st.Bytes != 3*v1.Bytes() {
		t.Errorf("stats %+v", st)
	}
	if ms := s.Models(); len(ms) != 2 || ms[0].Name() != "a" || ms[1].Name() != "b" {
		t.Errorf("models %v", ms)
	}
	if s.Version("b", 2) != v2 || s.Version("b", 3) != nil || s.Version("zz", 1) != nil || s.Model("b").Current() != v2 {
		t.Error("version lookup")
	}
	if vs := s.Model("b").Versions(); len(vs) != 2 || vs[0] != v1 {
		t.Errorf("versions %v", vs)
	}
	if v1.Model() != "b" || v1.Number() != 1 || v1.Name() != "b@1" || v1.Source() != dir || v1.LoadedAt().IsZero() ||
		v1.LoadTime() <= 0 || v1.State() != StateReady || v1.OpenFiles() != 0 || v1.GPUError() != nil ||
		!reflect.DeepEqual(v1.Residency(), []string{"host"}) {
		t.Errorf("version accessors: %s %d %s %s %v", v1.Model(), v1.Number(), v1.Source(), v1.State(), v1.Residency())
	}
	if _, err := s.Unload("b", 5); err == nil || !strings.Contains(err.Error(), "1, 2") {
		t.Errorf("unload of a missing version should list the versions: %v", err)
	}
	if _, err := s.Unload("b", 2); err != nil {
		t.Fatal(err)
	}
	if s.Model("b").Current() != v1 {
		t.Error("the newest remaining version is not current")
	}
	if _, err := s.Unload("b", 0); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !reflect.DeepEqual(removed, []string{"b@2", "b@1"}) {
		t.Errorf("OnRemove saw %v", removed)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := s.Load(context.Background(), "c", dir, LoadOptions{}); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("load into a closed store: %v", err)
	}
}

func TestLoadsInProgress(t *testing.T) {
	s := newTestStore(t, Budgets{})
	dir := writeFolder(t, 1<<20)
	var once sync.Once
	var seen []*Load
	var done, total int64
	progress := func(d, tot int64) {
		if d == 0 {
			return // the load's first report: admitted, nothing copied yet
		}
		once.Do(func() {
			seen = s.Loads()
			if len(seen) == 1 {
				done, total = seen[0].Progress()
			}
		})
	}
	v, err := s.Load(context.Background(), "m", dir, LoadOptions{Progress: progress, ChunkSize: 64 << 10, Readers: 2})
	if err != nil {
		t.Fatal(err)
	}
	if len(seen) != 1 || seen[0].Name != "m" || seen[0].Source != dir || seen[0].Started.IsZero() {
		t.Fatalf("loads during the load: %+v", seen)
	}
	if total != v.Bytes() || done <= 0 || done > total {
		t.Errorf("progress %d of %d, want some of %d", done, total, v.Bytes())
	}
	if len(s.Loads()) != 0 {
		t.Error("the load is still listed after it finished")
	}
}

func TestLoadCancelled(t *testing.T) {
	s := newTestStore(t, Budgets{})
	dir := writeFolder(t, 1<<20)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err := s.Load(ctx, "m", dir, LoadOptions{ChunkSize: 4096, Readers: 1, Progress: func(int64, int64) { cancel() }})
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), dir) {
		t.Fatalf("cancelled load: %v", err)
	}
	if s.Model("m") != nil || s.Usage().HostBytes != 0 || len(s.Loads()) != 0 {
		t.Error("a cancelled load left something behind")
	}
}

func TestVerifySizeChange(t *testing.T) {
	s := newTestStore(t, Budgets{})
	dir := writeFolder(t, 4096)
	load(t, s, "m", dir)
	writeFile(t, filepath.Join(dir, "config.json"), []byte(`{"longer": true}`))
	_, checks, err := s.Verify(context.Background(), "m", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range checks {
		switch c.Path {
		case "config.json":
			if c.OK || !strings.Contains(c.Problem, "bytes") || c.SourceSHA256 == "" || c.SourceSHA256 == c.SHA256 {
				t.Errorf("grown source verified as %+v", c)
			}
		case "model.safetensors":
			if !c.OK || c.SHA256 != c.SourceSHA256 {
				t.Errorf("unchanged file verified as %+v", c)
			}
		}
	}
	if _, _, err := s.Verify(context.Background(), "nope", 0); err == nil || !strings.Contains(err.Error(), "nope") {
		t.Errorf("verify of a missing model: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, err := s.Verify(ctx, "m", 0); !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled verify: %v", err)
	}
}

func TestHumanBytesUnits(t *testing.T) {
	for n, want := range map[int64]string{
		1536: "1.5 KiB", 5 << 20: "5.0 MiB", 1 << 40: "1.0 TiB", 3 << 50: "3.0 PiB", 1 << 62: "4.0 EiB",
	} {
		if got := HumanBytes(n); got != want {
			t.Errorf("HumanBytes(%d) = %q, want %q", n, got, want)
		}
	}
}

func TestArena(t *testing.T) {
	a, err := OpenArena(64 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	switch a.Kind() {
	case "tmpfs":
		if a.FallbackReason() != "" {
			t.Errorf("tmpfs arena with a fallback reason %q", a.FallbackReason())
		}
	case "memfd":
		if a.FallbackReason() == "" {
			t.Error("memfd arena without saying why")
		}
		t.Logf("no private tmpfs here: %s", a.FallbackReason())
	default:
		t.Fatalf("arena kind %q", a.Kind())
	}
	b, err := a.NewBuffer("x", 8192)
	if err != nil {
		t.Fatal(err)
	}
	copy(b.Bytes(), "hello")
	got := make([]byte, 5)
	if _, err := b.File().ReadAt(got, 0); err != nil || string(got) != "hello" || b.Fd() < 0 || b.Size() != 8192 {
		t.Errorf("backing file reads %q, %v", got, err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	empty, err := a.NewBuffer("empty", 0)
	if err != nil || len(empty.Bytes()) != 0 {
		t.Fatalf("empty buffer: %v", err)
	}
	empty.Close()
	if _, err := a.NewBuffer("neg", -1); err == nil || !strings.Contains(err.Error(), "neg") {
		t.Errorf("negative size: %v", err)
	}
}
