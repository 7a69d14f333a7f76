package store

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/weightfs/weightfs/store/safetensors"
)

var updatePushed = flag.Bool("update-pushed", false, "rewrite testdata/pushed from the cases in push_corpus_test.go")

// pushedDir holds files laid out by PlanPush, with made-up tensor data, so
// that the reference safetensors library can check them on the GPU machine
// (integration/gpu/gpu_test.py, check "(pushed)"): `go test ./store -run
// TestPushedCorpus -update-pushed` rewrites them.
const pushedDir = "testdata/pushed"

// pushedTensor is what cases.json says a file holds.
type pushedTensor struct {
	Name  string            `json:"name"`
	DType safetensors.DType `json:"dtype"`
	Shape []int64           `json:"shape"`
}

func TestPushedCorpus(t *testing.T) {
	cases := []struct {
		name     string
		manifest []PushTensor
		limit    int64
	}{
		{"single-file", []PushTensor{pt("model.embed.weight", safetensors.BF16, 16, 8), pt("model.norm.weight", safetensors.F32, 8),
			pt("lm_head.weight", safetensors.F16, 16, 8)}, 0},
		{"sharded", u8s(6, 6, 2, 6, 2, 2), 10},
		{"oversized-tensor", u8s(2, 20, 3, 11, 9), 10},
		{"zero-size-and-scalar", []PushTensor{pt("e", safetensors.F32, 0), pt("s", safetensors.F32), pt("z", safetensors.BF16, 3, 0),
			pt("w", safetensors.I64, 3)}, 0},
		{"dtypes", []PushTensor{pt("a.u8", safetensors.U8, 3), pt("b.bf16", safetensors.BF16, 3, 5), pt("c.f64", safetensors.F64, 7),
			pt("d.i32", safetensors.I32, 2, 2), pt("e.bool", safetensors.BOOL, 9), pt("f.f16", safetensors.F16, 1),
			pt("g.f8", safetensors.F8_E4M3, 5), pt("h.i8", safetensors.I8), pt("i.u64", safetensors.U64, 1, 1, 1),
			pt("j.f8", safetensors.F8_E5M2, 2, 3)}, 0},
		{"escaped-names", []PushTensor{pt("q\"\\\n\u00e9\U0001F600", safetensors.F32, 2), pt("x/y.z", safetensors.F32, 2)}, 8},
	}
	want := map[string][]byte{} // path under pushedDir → bytes
	index := map[string]map[string][]pushedTensor{}
	for i, c := range cases {
		p, err := PlanPush(c.manifest, nil, nil, PushLayoutOptions{MaxShardSize: c.limit})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		files, _ := buildPlanned(t, p, uint64(i+1))
		index[c.name] = map[string][]pushedTensor{}
		for _, f := range p.Files {
			want[filepath.Join(c.name, f.Path)] = files[f.Path]
			for _, pt := range f.Tensors {
				index[c.name][f.Path] = append(index[c.name][f.Path], pushedTensor{pt.Name, pt.DType, pt.Shape})
			}
		}
		if p.IndexPath != "" {
			want[filepath.Join(c.name, p.IndexPath)] = p.Index
		}
	}
	b, err := json.MarshalIndent(index, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	want["cases.json"] = append(b, '\n')
	if *updatePushed {
		if err := os.RemoveAll(pushedDir); err != nil {
			t.Fatal(err)
		}
		for p, b := range want {
			if err := os.MkdirAll(filepath.Dir(filepath.Join(pushedDir, p)), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(pushedDir, p), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	seen := 0
	err = filepath.WalkDir(pushedDir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(pushedDir, p)
		got, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if w, ok := want[rel]; !ok {
			t.Errorf("%s: not made by the cases (run with -update-pushed)", rel)
		} else if !bytes.Equal(got, w) {
			t.Errorf("%s differs from what PlanPush lays out now (run with -update-pushed)", rel)
		}
		seen++
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen != len(want) {
		t.Errorf("%s holds %d files, the cases make %d (run with -update-pushed)", pushedDir, seen, len(want))
	}
}
