package store

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/weightfs/weightfs/cuda"
	"github.com/weightfs/weightfs/store/safetensors"
)

func header(t *testing.T, tensors ...safetensors.TensorInfo) *safetensors.Header {
	t.Helper()
	var off int64
	for i := range tensors {
		n := tensors[i].Elements() * int64(tensors[i].DType.Bits()) / 8
		tensors[i].Begin, tensors[i].End = off, off+n
		off += n
	}
	return &safetensors.Header{Tensors: tensors, HeaderSize: 120}
}

func TestSlabLayout(t *testing.T) {
	bf16 := func(name string, n int64) safetensors.TensorInfo {
		return safetensors.TensorInfo{Name: name, DType: "BF16", Shape: []int64{n}}
	}
	f32 := func(name string, n int64) safetensors.TensorInfo {
		return safetensors.TensorInfo{Name: name, DType: "F32", Shape: []int64{n}}
	}
	cases := []struct {
		name    string
		h       *safetensors.Header
		offsets []int64
		size    int64
		runs    []copyRun
	}{
		{"one tensor", header(t, bf16("a", 10)), []int64{0}, 256, []copyRun{{128, 0, 20}}},
		{"aligned tensors share one copy", header(t, bf16("a", 128), bf16("b", 256)),
			[]int64{0, 256}, 768, []copyRun{{128, 0, 768}}},
		{"3-element BF16 then F32: padding splits the copy", header(t, bf16("a", 3), f32("b", 5)),
			[]int64{0, 256}, 512, []copyRun{{128, 0, 6}, {134, 256, 20}}},
		{"zero-size tensor in the middle", header(t, bf16("a", 3), f32("e", 0), f32("b", 1)),
			[]int64{0, 256, 256}, 512, []copyRun{{128, 0, 6}, {134, 256, 4}}},
		{"no tensors", header(t), nil, 256, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			offsets, size := SlabLayout(c.h)
			if !reflect.DeepEqual(offsets, c.offsets) || size != c.size {
				t.Errorf("layout %v, %d; want %v, %d", offsets, size, c.offsets, c.size)
			}
			if runs := slabCopies(c.h); !reflect.DeepEqual(runs, c.runs) {
				t.Errorf("copies %v, want %v", runs, c.runs)
			}
		})
	}
}

func TestCUDAManifest(t *testing.T) {
	f := &File{header: header(t, safetensors.TensorInfo{Name: "a", DType: "F32", Shape: []int64{4}})}
	if _, ok := f.CUDAManifest(); ok {
		t.Fatal("a file without replicas has a manifest")
	}
	f.buf = &Buffer{size: 144}
	var h cuda.IPCHandle
	for i := range h {
		h[i] = byte(i)
	}
	f.replicas = []*replica{{gpu: &GPU{dev: cuda.Device{UUID: "GPU-00000000-1111-2222-3333-444444444444"}}, handle: h, size: 256}}
	raw, ok := f.CUDAManifest()
	if !ok {
		t.Fatal("no manifest")
	}
	var m Manifest
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	handle, _ := base64.StdEncoding.DecodeString(m.Replicas[0].Handle)
	if m.Schema != 1 || m.FileSize != 144 || m.DataOffset != 128 || m.Align != SlabAlign ||
		m.Replicas[0].GPU != "GPU-00000000-1111-2222-3333-444444444444" || m.Replicas[0].SlabBytes != 256 ||
		!bytes.Equal(handle, h[:]) {
		t.Errorf("manifest %s", raw)
	}
	if got := f.Residency(); !reflect.DeepEqual(got, []string{"host", "GPU-00000000-1111-2222-3333-444444444444"}) {
		t.Errorf("residency %v", got)
	}
}

// TestSlabLayoutConformance runs SlabLayout over every accepted file of the
// conformance corpus (see store/safetensors/conformance_test.go).
func TestSlabLayoutConformance(t *testing.T) {
	dir := filepath.Join("safetensors", "testdata", "conformance")
	raw, err := os.ReadFile(filepath.Join(dir, "cases.json"))
	if err != nil {
		t.Fatal(err)
	}
	var corpus struct {
		Align int64 `json:"align"`
		Cases []struct {
			File     string `json:"file"`
			Verdict  string `json:"verdict"`
			SlabSize int64  `json:"slab_size"`
			Tensors  []struct {
				Name       string `json:"name"`
				SlabOffset int64  `json:"slab_offset"`
			} `json:"tensors"`
		} `json:"cases"`
	}
	if err := json.Unmarshal(raw, &corpus); err != nil {
		t.Fatal(err)
	}
	if corpus.Align != SlabAlign {
		t.Fatalf("corpus align %d, SlabAlign %d", corpus.Align, SlabAlign)
	}
	n := 0
	for _, c := range corpus.Cases {
		if c.Verdict != "accept" {
			continue
		}
		n++
		b, err := os.ReadFile(filepath.Join(dir, c.File))
		if err != nil {
			t.Fatal(err)
		}
		h, err := safetensors.Parse(b)
		if err != nil {
			t.Errorf("%s: %v", c.File, err)
			continue
		}
		offsets, size := SlabLayout(h)
		if len(offsets) != len(c.Tensors) || size != c.SlabSize {
			t.Errorf("%s: %d tensors, slab size %d; want %d, %d", c.File, len(offsets), size, len(c.Tensors), c.SlabSize)
			continue
		}
		for i, want := range c.Tensors {
			if h.Tensors[i].Name != want.Name || offsets[i] != want.SlabOffset {
				t.Errorf("%s: slab position %d: %q at %d, want %q at %d", c.File, i, h.Tensors[i].Name, offsets[i], want.Name, want.SlabOffset)
			}
		}
	}
	if n < 25 {
		t.Errorf("only %d accepted cases", n)
	}
}
