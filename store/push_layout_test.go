package store

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	nlp "github.com/nlpodyssey/safetensors"

	"github.com/weightfs/weightfs/store/safetensors"
)

func pt(name string, dt safetensors.DType, shape ...int64) PushTensor {
	return PushTensor{Name: name, DType: dt, Shape: shape}
}

// u8s is a manifest of U8 tensors t0, t1, … of the given byte sizes.
func u8s(sizes ...int64) []PushTensor {
	var m []PushTensor
	for i, n := range sizes {
		m = append(m, pt(fmt.Sprintf("t%d", i), safetensors.U8, n))
	}
	return m
}

// buildPlanned makes every weights file of p with random tensor data and
// returns the files and each tensor's data.
func buildPlanned(t *testing.T, p *PushPlan, seed uint64) (map[string][]byte, map[string][]byte) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 1))
	files, data := map[string][]byte{}, map[string][]byte{}
	for _, f := range p.Files {
		b := make([]byte, f.Size)
		copy(b, f.Header)
		for _, pt := range f.Tensors {
			d := b[pt.Offset : pt.Offset+pt.Size]
			for i := range d {
				d[i] = byte(r.Uint32())
			}
			data[pt.Name] = d
		}
		files[f.Path] = b
	}
	return files, data
}

// checkPlanned builds p's files and reads them back with the strict parser
// and with nlpodyssey's, which must see every tensor of manifest with its
// dtype, shape and bytes.
func checkPlanned(t *testing.T, p *PushPlan, manifest []PushTensor) {
	t.Helper()
	files, data := buildPlanned(t, p, 7)
	seen := map[string]bool{}
	for _, f := range p.Files {
		b := files[f.Path]
		h, err := safetensors.Parse(b)
		if err != nil {
			t.Fatalf("%s: strict parser: %v", f.Path, err)
		}
		if !reflect.DeepEqual(h.Tensors, f.Parsed.Tensors) || h.DataOffset() != int64(len(f.Header)) {
			t.Errorf("%s: parsed header differs from the plan's", f.Path)
		}
		for _, pt := range f.Tensors {
			seen[pt.Name] = true
		}
		st, err := nlp.Deserialize(b)
		if err != nil && nlpKnows(f) {
			t.Fatalf("%s: nlpodyssey: %v", f.Path, err)
		}
		if err != nil {
			continue
		}
		if st.Len() != len(f.Tensors) {
			t.Errorf("%s: nlpodyssey sees %d tensors, plan has %d", f.Path, st.Len(), len(f.Tensors))
		}
		for _, pt := range f.Tensors {
			if _, err := nlp.ParseDType(string(pt.DType)); err != nil {
				continue // a dtype nlpodyssey does not know (C64, F8_E8M0, F4, …)
			}
			v, ok := st.Tensor(pt.Name)
			if !ok {
				t.Errorf("%s: nlpodyssey lacks %s", f.Path, pt.Name)
				continue
			}
			shape := make([]int64, len(v.Shape()))
			for i, d := range v.Shape() {
				shape[i] = int64(d)
			}
			if v.DType().String() != string(pt.DType) || !slices.Equal(shape, pt.Shape) || !bytes.Equal(v.Data(), data[pt.Name]) {
				t.Errorf("%s/%s: nlpodyssey sees %s %v, plan %s %v", f.Path, pt.Name, v.DType(), shape, pt.DType, pt.Shape)
			}
		}
	}
	for _, m := range manifest {
		f, pt, ok := p.Lookup(m.Name)
		if !ok || !seen[m.Name] || pt.DType != m.DType || !slices.Equal(pt.Shape, m.Shape) {
			t.Errorf("tensor %s: planned %v in %v", m.Name, pt, f != nil)
		}
	}
	if _, _, ok := p.Lookup("absent"); ok {
		t.Error("Lookup found an absent tensor")
	}
	checkInvariants(t, p, manifest, math.MaxInt64)
}

// checkInvariants checks what holds for every plan: tensors tile each
// file's data section in order after a header of the file's own making,
// each naturally aligned; slab offsets follow the layout rule; every tensor
// of the manifest is in exactly one file; generated shards respect limit.
func checkInvariants(t *testing.T, p *PushPlan, manifest []PushTensor, limit int64) {
	t.Helper()
	count := 0
	var total int64
	for _, f := range p.Files {
		if f.Parsed.DataOffset() != int64(len(f.Header)) || f.Parsed.FileSize() != f.Size {
			t.Fatalf("%s: header %d bytes, data offset %d, size %d, parsed size %d", f.Path, len(f.Header), f.Parsed.DataOffset(), f.Size, f.Parsed.FileSize())
		}
		if f.Base == nil && f.Parsed.DataOffset()%safetensors.DataAlign != 0 {
			t.Errorf("%s: data starts at %d", f.Path, f.Parsed.DataOffset())
		}
		off, slabEnd := f.Parsed.DataOffset(), int64(0)
		var data int64
		for i, pt := range f.Tensors {
			if pt.Offset != off {
				t.Fatalf("%s/%s: at %d, previous ended at %d", f.Path, pt.Name, pt.Offset, off)
			}
			if f.Base == nil && pt.Offset%int64(pt.DType.Alignment()) != 0 {
				t.Errorf("%s/%s: %s at %d is not aligned", f.Path, pt.Name, pt.DType, pt.Offset)
			}
			if pt.SlabOffset%SlabAlign != 0 || (i > 0 && pt.SlabOffset != alignUp(slabEnd, SlabAlign)) || (i == 0 && pt.SlabOffset != 0) {
				t.Errorf("%s/%s: slab offset %d after end %d", f.Path, pt.Name, pt.SlabOffset, slabEnd)
			}
			slabEnd = pt.SlabOffset + pt.Size
			off += pt.Size
			data += pt.Size
			count++
		}
		if off != f.Size || f.SlabSize < slabEnd || f.SlabSize%SlabAlign != 0 || f.SlabSize < SlabAlign {
			t.Errorf("%s: data ends at %d of %d, slab %d of %d", f.Path, off, f.Size, slabEnd, f.SlabSize)
		}
		if f.Base == nil && data > limit && len(f.Tensors) > 1 {
			t.Errorf("%s: %d tensor bytes over the limit %d", f.Path, data, limit)
		}
		total += data
	}
	if count != len(manifest) || total != p.TensorBytes {
		t.Errorf("%d tensors of %d bytes planned, manifest has %d of %d", count, total, len(manifest), p.TensorBytes)
	}
	for _, m := range manifest {
		if _, _, ok := p.Lookup(m.Name); !ok {
			t.Errorf("%s is not planned", m.Name)
		}
	}
}

type indexFile struct {
	Metadata  map[string]int64  `json:"metadata"`
	WeightMap map[string]string `json:"weight_map"`
}

func TestPlanPushGenerated(t *testing.T) {
	cases := []struct {
		name     string
		manifest []PushTensor
		limit    int64
		shards   [][]string // tensor names per file, in path order
	}{
		{name: "one shard", manifest: u8s(3, 4, 5), limit: 12, shards: [][]string{{"t0", "t1", "t2"}}},
		{name: "default limit", manifest: u8s(3, 4, 5), shards: [][]string{{"t0", "t1", "t2"}}},
		{name: "exactly the limit", manifest: u8s(5, 5), limit: 10, shards: [][]string{{"t0", "t1"}}},
		// huggingface_hub's own example: [6, 6, 2, 6, 2, 2] under 10 → [6], [6+2], [6+2+2].
		{name: "greedy in order", manifest: u8s(6, 6, 2, 6, 2, 2), limit: 10, shards: [][]string{{"t0"}, {"t1", "t2"}, {"t3", "t4", "t5"}}},
		// A tensor over the limit is a shard of its own, appended when it is
		// met, before the shard still being filled.
		{name: "oversized tensor", manifest: u8s(2, 20, 3, 11, 9), limit: 10, shards: [][]string{{"t1"}, {"t3"}, {"t0", "t2"}, {"t4"}}},
		{name: "only oversized", manifest: u8s(11, 12), limit: 10, shards: [][]string{{"t0"}, {"t1"}}},
		{name: "zero-size tensors", manifest: []PushTensor{pt("e", safetensors.F32, 0), pt("s", safetensors.F32), pt("z", safetensors.BF16, 3, 0)}, limit: 1, shards: [][]string{{"s"}, {"e", "z"}}},
		{name: "dtypes sorted by alignment", manifest: []PushTensor{
			pt("a.u8", safetensors.U8, 3), pt("b.bf16", safetensors.BF16, 3, 5), pt("c.f64", safetensors.F64, 7),
			pt("d.i32", safetensors.I32, 2, 2), pt("e.bool", safetensors.BOOL, 9), pt("f.f16", safetensors.F16, 1),
			pt("g.c64", safetensors.C64, 2), pt("h.i8", safetensors.I8), pt("i.u64", safetensors.U64, 1, 1, 1),
		}, limit: 1 << 20, shards: [][]string{{"c.f64", "g.c64", "i.u64", "d.i32", "b.bf16", "f.f16", "a.u8", "e.bool", "h.i8"}}},
		{name: "escaped names", manifest: []PushTensor{pt("q\"\\\n\u00e9\U0001F600", safetensors.F32, 2), pt("x/y.z", safetensors.F32, 2)}, limit: 16, shards: [][]string{{"q\"\\\n\u00e9\U0001F600", "x/y.z"}}},
		{name: "escaped names sharded", manifest: []PushTensor{pt("q\"\\\n\u00e9\U0001F600", safetensors.F32, 2), pt("x/y.z", safetensors.F32, 2)}, limit: 8, shards: [][]string{{"q\"\\\n\u00e9\U0001F600"}, {"x/y.z"}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := planPush(c.manifest, nil, nil, PushLayoutOptions{MaxShardSize: c.limit})
			if err != nil {
				t.Fatal(err)
			}
			if p.SameAsBase || len(p.BaseFiles) != 0 {
				t.Errorf("same as base %v, base files %v", p.SameAsBase, p.BaseFiles)
			}
			var got [][]string
			var paths []string
			for _, f := range p.Files {
				paths = append(paths, f.Path)
				var names []string
				for _, pt := range f.Tensors {
					names = append(names, pt.Name)
				}
				got = append(got, names)
				if f.Parsed.Metadata["format"] != "pt" {
					t.Errorf("%s: metadata %v", f.Path, f.Parsed.Metadata)
				}
			}
			if !reflect.DeepEqual(got, c.shards) {
				t.Errorf("shards %q, want %q", got, c.shards)
			}
			n := len(c.shards)
			var want []string
			for i := range n {
				want = append(want, fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, n))
			}
			if n == 1 {
				want = []string{"model.safetensors"}
			}
			if !slices.Equal(paths, want) {
				t.Errorf("files %v, want %v", paths, want)
			}
			checkPlanned(t, p, c.manifest)
			limit := c.limit
			if limit == 0 {
				limit = DefaultMaxShardSize
			}
			checkInvariants(t, p, c.manifest, limit)

			if n == 1 {
				if p.IndexPath != "" || p.Index != nil {
					t.Errorf("one shard has an index %s", p.IndexPath)
				}
				return
			}
			if p.IndexPath != "model.safetensors.index.json" {
				t.Errorf("index %q", p.IndexPath)
			}
			var idx indexFile
			if err := json.Unmarshal(p.Index, &idx); err != nil {
				t.Fatalf("index: %v\n%s", err, p.Index)
			}
			wantMap := map[string]string{}
			for i, names := range c.shards {
				for _, name := range names {
					wantMap[name] = want[i]
				}
			}
			if !reflect.DeepEqual(idx.WeightMap, wantMap) || len(idx.Metadata) != 1 || idx.Metadata["total_size"] != p.TensorBytes {
				t.Errorf("index %+v, want weight_map %v and total_size %d", idx, wantMap, p.TensorBytes)
			}
		})
	}
}

// TestShardIndexJSON pins the index's bytes to what Python's
// json.dumps(index, indent=2, sort_keys=True) + "\n" writes.
func TestShardIndexJSON(t *testing.T) {
	got := string(shardIndexJSON(42, map[string]string{
		"b": "model-00002-of-00002.safetensors", "a\"\\\b\f\n\r\t\x01\x7f~ é😀": "model-00001-of-00002.safetensors",
	}))
	want := `{
  "metadata": {
    "total_size": 42
  },
  "weight_map": {
    "a\"\\\b\f\n\r\t\u0001\u007f~ \u00e9\ud83d\ude00": "model-00001-of-00002.safetensors",
    "b": "model-00002-of-00002.safetensors"
  }
}
`
	if got != want {
		t.Errorf("index\n%s\nwant\n%s", got, want)
	}
}

func TestPlanPushRefusals(t *testing.T) {
	big := int64(1) << 40
	cases := []struct {
		name     string
		manifest []PushTensor
		given    []string
		limit    int64
		want     string
	}{
		{name: "empty", manifest: nil, want: "no tensors"},
		{name: "duplicate", manifest: []PushTensor{pt("a", "U8", 1), pt("b", "U8"), pt("a", "F32", 1)}, want: `"a" is named twice`},
		{name: "unknown dtype", manifest: []PushTensor{pt("a", "F128", 1)}, want: `unknown dtype "F128"`},
		{name: "lowercase dtype", manifest: []PushTensor{pt("a", "bf16", 1)}, want: `unknown dtype "bf16"`},
		{name: "negative dim", manifest: []PushTensor{pt("a", "U8", 2, -1)}, want: "negative dimension"},
		{name: "element overflow", manifest: []PushTensor{pt("a", "U8", 1<<32, 1<<32)}, want: "overflows"},
		{name: "bit overflow", manifest: []PushTensor{pt("a", "F64", 1<<61)}, want: "overflows"},
		{name: "sum overflow", manifest: u8s(1<<60, 1<<60, 1<<60, 1<<60, 1<<60, 1<<60, 1<<60, 1<<60), want: "past 2^63"},
		{name: "file overflow", manifest: u8s(1<<60, 1<<60, 1<<60, 1<<60, 1<<60), limit: math.MaxInt64, want: "too large"},
		{name: "half bytes", manifest: []PushTensor{pt("a", "F4", 3)}, want: "whole number of bytes"},
		{name: "metadata name", manifest: []PushTensor{pt("__metadata__", "U8", 1)}, want: "cannot be a tensor name"},
		{name: "empty name", manifest: []PushTensor{pt("", "U8", 1)}, want: "empty name"},
		{name: "bad UTF-8 name", manifest: []PushTensor{pt("a\xff", "U8", 1)}, want: "not valid UTF-8"},
		{name: "negative limit", manifest: u8s(1), limit: -1, want: "negative"},
		{name: "given weights", manifest: u8s(1), given: []string{"extra.safetensors"}, want: "weights or a shard index"},
		{name: "given index", manifest: u8s(1), given: []string{"model.safetensors.index.json"}, want: "weights or a shard index"},
		{name: "given twice", manifest: u8s(1), given: []string{"config.json", "config.json"}, want: "given twice"},
		{name: "given absolute", manifest: u8s(1), given: []string{"/etc/passwd"}, want: "clean relative"},
		{name: "given dotdot", manifest: u8s(1), given: []string{"../x"}, want: "clean relative"},
		{name: "given unclean", manifest: u8s(1), given: []string{"a//b"}, want: "clean relative"},
		{name: "given empty", manifest: u8s(1), given: []string{""}, want: "clean relative"},
		{name: "given hidden", manifest: u8s(1), given: []string{"a/.git/x"}, want: "hidden"},
		{name: "given hidden at the top", manifest: u8s(1), given: []string{".cache/x"}, want: "hidden"},
		{name: "given NUL", manifest: u8s(1), given: []string{"a\x00"}, want: "NUL"},
		{name: "given under a file", manifest: u8s(1), given: []string{"a", "a/b"}, want: "a is a file"},
		{name: "given under weights", manifest: u8s(1), given: []string{"model.safetensors/x"}, want: "is a file"},
		{name: "huge but valid is planned", manifest: []PushTensor{pt("a", "BF16", big)}, want: ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := planPush(c.manifest, nil, c.given, PushLayoutOptions{MaxShardSize: c.limit})
			if c.want == "" {
				if err != nil || p.Files[0].Size != int64(len(p.Files[0].Header))+2*big {
					t.Fatalf("%v", err)
				}
				return
			}
			if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v, want ErrInvalid with %q", err, c.want)
			}
		})
	}
}

// writeModel writes files into a new folder.
func writeModel(t *testing.T, files map[string][]byte) string {
	t.Helper()
	dir := t.TempDir()
	for rel, b := range files {
		writeFile(t, filepath.Join(dir, filepath.FromSlash(rel)), b)
	}
	return dir
}

// sharded is a two-shard model whose headers are not the writer's own: a
// different key order, metadata, no padding.
func shardedBase(t *testing.T) map[string][]byte {
	t.Helper()
	return map[string][]byte{
		"model-00001-of-00002.safetensors": rawHeader(`{"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}, "__metadata__":{"format":"pt","who":"x"},"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}`, bytes.Repeat([]byte{1}, 12)),
		"model-00002-of-00002.safetensors": rawHeader(`{"c":{"dtype":"BF16","shape":[3,1],"data_offsets":[0,6]}}`, bytes.Repeat([]byte{2}, 6)),
		"model.safetensors.index.json":     index(t, map[string]string{"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}),
		"config.json":                      []byte(`{"model_type":"tiny"}`),
		"tokenizer/tokenizer.json":         []byte(`{}`),
	}
}

func TestPlanPushSameAsBase(t *testing.T) {
	s := newTestStore(t, Budgets{})
	base := load(t, s, "m", writeModel(t, shardedBase(t)))
	manifest := []PushTensor{pt("c", "BF16", 3, 1), pt("a", "U8", 4), pt("b", "F32", 2)}
	p, err := PlanPush(manifest, base, []string{"config.json", "generation_config.json"}, PushLayoutOptions{MaxShardSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	if !p.SameAsBase || p.IndexPath != "" || p.Index != nil {
		t.Fatalf("same as base %v, index %q", p.SameAsBase, p.IndexPath)
	}
	var paths []string
	for _, f := range p.Files {
		paths = append(paths, f.Path)
		img := f.Base.Bytes()
		if f.Base == nil || f.Base.Path() != f.Path || !bytes.Equal(f.Header, img[:f.Base.Header().DataOffset()]) || f.Size != f.Base.Size() {
			t.Errorf("%s: header is not the base's bytes:\n%q\n%q", f.Path, f.Header, img[:f.Base.Header().DataOffset()])
		}
		if len(img) > 0 && &f.Header[0] == &img[0] {
			t.Errorf("%s: the plan's header aliases the base's host image", f.Path)
		}
	}
	if want := []string{"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}; !slices.Equal(paths, want) {
		t.Errorf("files %v", paths)
	}
	var kept []string
	for _, f := range p.BaseFiles {
		kept = append(kept, f.Path())
	}
	if want := []string{"model.safetensors.index.json", "tokenizer/tokenizer.json"}; !slices.Equal(kept, want) {
		t.Errorf("base files %v, want %v", kept, want)
	}
	if !slices.Equal(p.Given, []string{"config.json", "generation_config.json"}) {
		t.Errorf("given %v", p.Given)
	}
	f, b, ok := p.Lookup("b")
	if !ok || f.Path != "model-00001-of-00002.safetensors" || b.Offset != f.Parsed.DataOffset()+4 || b.Size != 8 || b.SlabOffset != 256 {
		t.Errorf("b: %+v in %s", b, f.Path)
	}
	checkPlanned(t, p, manifest)

	// Anything else than the same names, dtypes and shapes: generated.
	for _, c := range []struct {
		name     string
		manifest []PushTensor
	}{
		{"shape", []PushTensor{pt("c", "BF16", 1, 3), pt("a", "U8", 4), pt("b", "F32", 2)}},
		{"dtype", []PushTensor{pt("c", "F16", 3, 1), pt("a", "U8", 4), pt("b", "F32", 2)}},
		{"extra", []PushTensor{pt("c", "BF16", 3, 1), pt("a", "U8", 4), pt("b", "F32", 2), pt("d", "U8")}},
		{"missing", []PushTensor{pt("c", "BF16", 3, 1), pt("a", "U8", 4)}},
		{"renamed", []PushTensor{pt("c", "BF16", 3, 1), pt("a", "U8", 4), pt("B", "F32", 2)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			p, err := PlanPush(c.manifest, base, []string{"config.json"}, PushLayoutOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if p.SameAsBase || len(p.Files) != 1 || p.Files[0].Path != "model.safetensors" || p.Files[0].Base != nil || p.Index != nil {
				t.Fatalf("plan %+v", p)
			}
			var kept []string
			for _, f := range p.BaseFiles {
				kept = append(kept, f.Path())
			}
			if want := []string{"tokenizer/tokenizer.json"}; !slices.Equal(kept, want) {
				t.Errorf("base files %v, want %v (the base's index is dropped)", kept, want)
			}
			checkPlanned(t, p, c.manifest)
		})
	}
}

func TestPlanPushBaseRefusals(t *testing.T) {
	s := newTestStore(t, Budgets{})
	// A base with a file where the layout puts a folder's worth of nothing:
	// "model.safetensors.d" is fine, but a base folder named like a
	// generated file's parent cannot be, so check the clash with a given file.
	base := load(t, s, "m", writeModel(t, map[string][]byte{
		"model.safetensors": safetensorsBytes(t, u8("w", 1, 2)),
		"config.json":       []byte("{}"),
		"notes/readme.md":   []byte("x"),
	}))
	if _, err := PlanPush(u8s(2), base, []string{"notes"}, PushLayoutOptions{}); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "notes is a file") {
		t.Errorf("given file over a base folder: %v", err)
	}
	// The same manifest as the base's keeps its file, even named alone.
	p, err := PlanPush([]PushTensor{pt("w", "U8", 2)}, base, nil, PushLayoutOptions{})
	if err != nil || !p.SameAsBase || len(p.BaseFiles) != 2 {
		t.Fatalf("%v %+v", err, p)
	}
	// A base whose tensor names repeat across files is never "the same".
	dup := load(t, s, "d", writeModel(t, map[string][]byte{
		"a/model.safetensors": safetensorsBytes(t, u8("w", 1, 2)),
		"b/model.safetensors": safetensorsBytes(t, u8("w", 1, 2)),
		"config.json":         []byte("{}"),
	}))
	p, err = PlanPush([]PushTensor{pt("w", "U8", 2)}, dup, nil, PushLayoutOptions{})
	if err != nil || p.SameAsBase || len(p.Files) != 1 || p.Files[0].Path != "model.safetensors" || len(p.BaseFiles) != 1 {
		t.Fatalf("%v %+v", err, p)
	}
	// A base without weights (unusual, but a plan's input) is never the same.
	if matchesBase(u8s(1), []baseFile{{path: "config.json", kind: Plain}}) {
		t.Error("a base without weights matched")
	}
}

// FuzzPlanPush plans random manifests under random shard limits: a plan is
// refused as invalid or keeps every invariant, and its files parse.
func FuzzPlanPush(f *testing.F) {
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 8, 9}, uint16(16))
	f.Add([]byte{0, 0, 0}, uint16(0))
	f.Add([]byte{200, 13, 77, 5, 5, 5, 5, 1, 1, 1, 1, 90}, uint16(7))
	f.Fuzz(func(t *testing.T, b []byte, limit uint16) {
		var manifest []PushTensor
		for i := 0; i+2 < len(b) && len(manifest) < 64; i += 3 {
			dt := safetensors.DTypes[int(b[i])%(len(safetensors.DTypes)+1)%len(safetensors.DTypes)]
			if b[i] == 255 {
				dt = "X"
			}
			var shape []int64
			for k := range int(b[i+1] % 4) {
				shape = append(shape, int64(b[i+2]>>(2*k)&15)-1)
			}
			name := fmt.Sprintf("t%d", b[i+1]%32)
			if b[i+2]%61 == 0 {
				name = "__metadata__"
			}
			manifest = append(manifest, PushTensor{Name: name, DType: dt, Shape: shape})
		}
		p, err := planPush(manifest, nil, nil, PushLayoutOptions{MaxShardSize: int64(limit)})
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error of no kind: %v", err)
			}
			return
		}
		lim := int64(limit)
		if lim == 0 {
			lim = DefaultMaxShardSize
		}
		checkInvariants(t, p, manifest, lim)
		files, _ := buildPlanned(t, p, 1)
		for path, file := range files {
			if _, err := safetensors.Parse(file); err != nil {
				t.Fatalf("%s: %v", path, err)
			}
		}
		if len(p.Files) > 1 {
			var idx indexFile
			if err := json.Unmarshal(p.Index, &idx); err != nil || len(idx.WeightMap) != len(manifest) || idx.Metadata["total_size"] != p.TensorBytes {
				t.Fatalf("index %s: %v", p.Index, err)
			}
		}
	})
}

// nlpKnows reports whether nlpodyssey knows every dtype of f.
func nlpKnows(f *PlannedFile) bool {
	for _, t := range f.Tensors {
		if _, err := nlp.ParseDType(string(t.DType)); err != nil {
			return false
		}
	}
	return true
}
