package store

import (
	"encoding/base64"
	"encoding/json"

	"github.com/weightfs/weightfs/store/safetensors"
)

// SlabAlign is the slab layout rule's alignment, the one definition of it in
// Go: each tensor starts on the slab at the previous one's end rounded up to
// SlabAlign. The manifest's "align" says it to loaders.
const SlabAlign = 256

func alignUp(n, a int64) int64 { return (n + a - 1) / a * a }

// SlabLayout places a weights file's tensors on its GPU slab by the slab
// layout rule, stated once in docs/PROTOCOL.md §2 ("The slab layout rule"):
// tensors in ascending order of (data_offsets begin, end, name as bytes),
// which is the order of h.Tensors; the first at 0, each next one at the
// previous one's end rounded up to SlabAlign. It returns every tensor's slab
// offset, in h.Tensors order, and the layout's size: the last end rounded up
// to SlabAlign, at least SlabAlign (the allocation, slab_bytes, rounds that
// up further). A loader derives the same offsets from the file's own header:
// the header is the manifest. The conformance corpus
// (safetensors/testdata/conformance) pins the offsets and sizes.
func SlabLayout(h *safetensors.Header) (offsets []int64, size int64) {
	var end int64
	for i, t := range h.Tensors {
		off := int64(0)
		if i > 0 {
			off = alignUp(end, SlabAlign)
		}
		offsets = append(offsets, off)
		end = off + t.Size()
	}
	return offsets, max(alignUp(end, SlabAlign), SlabAlign)
}

// copyRun is one contiguous host-to-slab copy: bytes [src, src+n) of the
// file to [dst, dst+n) of the slab.
type copyRun struct{ src, dst, n int64 }

// slabCopies merges the layout into as few copies as possible: where the
// source is contiguous and no padding was inserted, tensors share a copy.
func slabCopies(h *safetensors.Header) []copyRun {
	offsets, _ := SlabLayout(h)
	return slabCopiesExcept(h, offsets, func(string) bool { return false })
}

// slabCopiesExcept is slabCopies at the given slab offsets over the tensors
// skip does not name (a push's tensors already written on that GPU).
func slabCopiesExcept(h *safetensors.Header, offsets []int64, skip func(name string) bool) []copyRun {
	var runs []copyRun
	for i, t := range h.Tensors {
		if t.Size() == 0 || skip(t.Name) {
			continue
		}
		r := copyRun{src: h.DataOffset() + t.Begin, dst: offsets[i], n: t.Size()}
		if k := len(runs) - 1; k >= 0 && runs[k].src+runs[k].n == r.src && runs[k].dst+runs[k].n == r.dst {
			runs[k].n += r.n
			continue
		}
		runs = append(runs, r)
	}
	return runs
}

// Manifest is the value of user.weightfs.cuda: where a weights file's
// replicas are and how to open them.
type Manifest struct {
	Schema     int               `json:"schema"`
	FileSize   int64             `json:"file_size"`
	DataOffset int64             `json:"data_offset"`
	Align      int               `json:"align"`
	Replicas   []ManifestReplica `json:"replicas"`
}

// ManifestReplica is one GPU's slab.
type ManifestReplica struct {
	GPU       string `json:"gpu"`        // "GPU-<uuid>"
	Handle    string `json:"handle"`     // base64 of the 64-byte CUipcMemHandle
	SlabBytes int64  `json:"slab_bytes"` // the allocation's size
}

// CUDAManifest returns the file's manifest as JSON, or false when the file
// has no GPU replica.
func (f *File) CUDAManifest() ([]byte, bool) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if len(f.replicas) == 0 {
		return nil, false
	}
	m := Manifest{Schema: 1, FileSize: f.Size(), DataOffset: f.header.DataOffset(), Align: SlabAlign}
	for _, r := range f.replicas {
		m.Replicas = append(m.Replicas, ManifestReplica{
			GPU: r.gpu.UUID(), Handle: base64.StdEncoding.EncodeToString(r.handle[:]), SlabBytes: r.size,
		})
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, false
	}
	return b, true
}
