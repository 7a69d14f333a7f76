package store

import (
	"bytes"
	"fmt"
	"maps"
	"math"
	"path"
	"slices"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/weightfs/weightfs/store/safetensors"
)

// Where a pushed version's tensors go: the rules are stated once in
// docs/PROTOCOL.md §6 ("Files of a pushed version").

// DefaultMaxShardSize is the largest shard Hugging Face writes by default
// (huggingface_hub's MAX_SHARD_SIZE, "5GB"): 5×10⁹ bytes of tensor data.
const DefaultMaxShardSize = 5_000_000_000

// SingleWeightsFile is the weights file of a generated layout that fits one
// shard; ShardIndexFile is the index of a sharded one.
const (
	SingleWeightsFile = "model.safetensors"
	ShardIndexFile    = "model.safetensors.index.json"
)

// generatedMetadata is the "__metadata__" of every generated header, as
// transformers' save_pretrained writes it.
var generatedMetadata = map[string]string{"format": "pt"}

// PushTensor is one tensor of a push's manifest: its name, dtype and shape,
// no data.
type PushTensor struct {
	Name  string
	DType safetensors.DType
	Shape []int64
}

// PushLayoutOptions tunes PlanPush.
type PushLayoutOptions struct {
	// MaxShardSize is the most tensor bytes a generated shard holds (a
	// larger tensor gets a shard of its own); 0 means DefaultMaxShardSize.
	MaxShardSize int64
}

// PushPlan is where a pushed version's files and tensors go.
type PushPlan struct {
	// SameAsBase: the manifest's names, dtypes and shapes equal the base
	// version's, so Files are the base's weights files, names and header
	// bytes unchanged.
	SameAsBase bool
	// Files are the version's weights files, in path order.
	Files []*PlannedFile
	// IndexPath and Index are the generated shard index file and its bytes;
	// "" and nil when the layout has one weights file, or when it is the
	// base's (its index, if any, is then among BaseFiles).
	IndexPath string
	Index     []byte
	// BaseFiles are the base's non-weight files the version takes as they
	// are (config, tokenizer, …), in path order: all but those the push
	// gives, and, when the layout is generated, the base's shard indexes.
	BaseFiles []*File
	// Given are the paths of the non-weight files the push gives, sorted.
	Given []string
	// TensorBytes is the sum of the tensors' sizes (an index's total_size).
	TensorBytes int64

	byName map[string][2]int // tensor name → file, tensor
}

// PlannedFile is one weights file of a plan.
type PlannedFile struct {
	// Path is the file's path in the version, '/'-separated.
	Path string
	// Header is the file's first bytes, up to the data section: the 8-byte
	// length, the JSON header and its padding. Parsed is its parse.
	Header   []byte
	Parsed   *safetensors.Header
	Size     int64 // the whole file
	SlabSize int64 // the slab layout's size (SlabLayout)
	// Tensors in the header's data order (Parsed.Tensors).
	Tensors []PlannedTensor
	// Base is the base's file whose name and header this one reuses, nil
	// for a generated file.
	Base *File
}

// PlannedTensor is where one tensor of the manifest goes.
type PlannedTensor struct {
	Name  string
	DType safetensors.DType
	Shape []int64
	// Offset is the file offset of its first byte, Size its byte size.
	Offset, Size int64
	// SlabOffset is its offset on the file's GPU slab (the slab layout rule).
	SlabOffset int64
}

// Lookup returns the file and place of the tensor called name.
func (p *PushPlan) Lookup(name string) (*PlannedFile, PlannedTensor, bool) {
	at, ok := p.byName[name]
	if !ok {
		return nil, PlannedTensor{}, false
	}
	f := p.Files[at[0]]
	return f, f.Tensors[at[1]], true
}

// baseFile is what the planner needs of one file of the base version.
type baseFile struct {
	path   string
	kind   Kind
	header *safetensors.Header
	prefix []byte // the file's bytes before its data section (weights)
	file   *File
}

// PlanPush plans the files of a version pushed with manifest on top of base
// (nil for the first version of a name); given are the paths of the
// non-weight files the push brings itself. A manifest whose names, dtypes and
// shapes equal base's, in any order, keeps base's weights files and headers
// byte for byte; any other is laid out as Hugging Face saves a state dict in
// the manifest's order. Non-weight files come from base unless given. It
// allocates nothing; a manifest or a path that cannot be planned is an
// ErrInvalid naming the problem.
func PlanPush(manifest []PushTensor, base *Version, given []string, opts PushLayoutOptions) (*PushPlan, error) {
	var bases []baseFile
	if base != nil {
		for _, f := range base.Files() {
			b := baseFile{path: f.Path(), kind: f.Kind(), header: f.Header(), file: f}
			if f.Kind() == Weights && f.Header() != nil {
				img := f.Bytes()
				n := f.Header().DataOffset()
				if int64(len(img)) < n {
					return nil, errorf(ErrInvalid, "push on %s: the host image of %s is not readable", base.Name(), f.Path())
				}
				b.prefix = bytes.Clone(img[:n])
			}
			bases = append(bases, b)
		}
	}
	return planPush(manifest, bases, given, opts)
}

func planPush(manifest []PushTensor, bases []baseFile, given []string, opts PushLayoutOptions) (*PushPlan, error) {
	limit := opts.MaxShardSize
	if limit == 0 {
		limit = DefaultMaxShardSize
	}
	if limit < 0 {
		return nil, errorf(ErrInvalid, "push: maximum shard size %d is negative", limit)
	}
	sizes, total, err := checkManifest(manifest)
	if err != nil {
		return nil, err
	}
	givenSet, err := checkGiven(given)
	if err != nil {
		return nil, err
	}
	p := &PushPlan{TensorBytes: total, Given: slices.Sorted(maps.Keys(givenSet))}
	if matchesBase(manifest, bases) {
		p.SameAsBase = true
		for _, b := range bases {
			if b.kind != Weights {
				continue
			}
			f, err := plannedFile(b.path, b.prefix, b.header.FileSize())
			if err != nil {
				return nil, err
			}
			f.Base = b.file
			p.Files = append(p.Files, f)
		}
	} else if err := p.generate(manifest, sizes, limit); err != nil {
		return nil, err
	}
	slices.SortFunc(p.Files, func(a, b *PlannedFile) int { return strings.Compare(a.Path, b.Path) })

	paths := map[string]bool{}
	for _, f := range p.Files {
		paths[f.Path] = true
	}
	if p.IndexPath != "" {
		paths[p.IndexPath] = true
	}
	for _, g := range p.Given {
		if paths[g] {
			return nil, errorf(ErrInvalid, "push: file %s is one the push's weights layout writes", g)
		}
		paths[g] = true
	}
	for _, b := range bases {
		if b.kind == Weights || givenSet[b.path] || (!p.SameAsBase && strings.HasSuffix(b.path, IndexSuffix)) {
			continue
		}
		if paths[b.path] {
			return nil, errorf(ErrInvalid, "push: file %s of the base clashes with the push's weights layout", b.path)
		}
		paths[b.path] = true
		p.BaseFiles = append(p.BaseFiles, b.file)
	}
	slices.SortFunc(p.BaseFiles, func(a, b *File) int { return strings.Compare(a.Path(), b.Path()) })
	for q := range paths {
		for d := path.Dir(q); d != "."; d = path.Dir(d) {
			if paths[d] {
				return nil, errorf(ErrInvalid, "push: %s is a file, so %s cannot be in it", d, q)
			}
		}
	}

	p.byName = make(map[string][2]int, len(manifest))
	for i, f := range p.Files {
		for j, t := range f.Tensors {
			p.byName[t.Name] = [2]int{i, j}
		}
	}
	return p, nil
}

// checkManifest validates the manifest and returns each tensor's byte size
// and their sum.
func checkManifest(manifest []PushTensor) (sizes []int64, total int64, err error) {
	if len(manifest) == 0 {
		return nil, 0, errorf(ErrInvalid, "push: the manifest has no tensors")
	}
	seen := make(map[string]bool, len(manifest))
	sizes = make([]int64, len(manifest))
	for i, t := range manifest {
		switch {
		case t.Name == "":
			return nil, 0, errorf(ErrInvalid, "push: tensor %d has an empty name", i)
		case !utf8.ValidString(t.Name):
			return nil, 0, errorf(ErrInvalid, "push: tensor name %q is not valid UTF-8", t.Name)
		case t.Name == "__metadata__":
			return nil, 0, errorf(ErrInvalid, "push: %q cannot be a tensor name (safetensors keeps it for metadata)", t.Name)
		case seen[t.Name]:
			return nil, 0, errorf(ErrInvalid, "push: tensor %q is named twice", t.Name)
		case !t.DType.Valid():
			return nil, 0, errorf(ErrInvalid, "push: tensor %q: unknown dtype %q", t.Name, string(t.DType))
		}
		seen[t.Name] = true
		size, err := safetensors.ByteSize(t.DType, t.Shape)
		if err != nil {
			return nil, 0, errorf(ErrInvalid, "push: tensor %q: %w", t.Name, err)
		}
		if total > math.MaxInt64-size {
			return nil, 0, errorf(ErrInvalid, "push: the tensors' sizes add up past 2^63 bytes")
		}
		sizes[i], total = size, total+size
	}
	return sizes, total, nil
}

// checkGiven validates the paths of the non-weight files a push gives.
func checkGiven(given []string) (map[string]bool, error) {
	set := make(map[string]bool, len(given))
	for _, g := range given {
		switch {
		case !utf8.ValidString(g) || strings.ContainsRune(g, 0):
			return nil, errorf(ErrInvalid, "push: file name %q is not valid UTF-8 without NUL", g)
		case g == "" || g == "." || path.IsAbs(g) || path.Clean(g) != g || g == ".." || strings.HasPrefix(g, "../"):
			return nil, errorf(ErrInvalid, "push: file name %q is not a clean relative path", g)
		case strings.HasSuffix(g, ".safetensors") || strings.HasSuffix(g, IndexSuffix):
			return nil, errorf(ErrInvalid, "push: file %s is weights or a shard index: the manifest's tensors make those", g)
		case set[g]:
			return nil, errorf(ErrInvalid, "push: file %s is given twice", g)
		}
		// A load skips hidden folders (.git, .cache): so does a version.
		for _, part := range strings.Split(path.Dir(g), "/") {
			if strings.HasPrefix(part, ".") && part != "." {
				return nil, errorf(ErrInvalid, "push: file name %q is in a hidden folder %q, which a version does not serve", g, part)
			}
		}
		set[g] = true
	}
	return set, nil
}

// matchesBase reports whether the base's weights files hold exactly the
// manifest's tensors, each once, with the same dtypes and shapes.
func matchesBase(manifest []PushTensor, bases []baseFile) bool {
	have := map[string]safetensors.TensorInfo{}
	weights := 0
	for _, b := range bases {
		if b.kind != Weights {
			continue
		}
		if b.header == nil || int64(len(b.prefix)) != b.header.DataOffset() {
			return false
		}
		weights++
		for _, t := range b.header.Tensors {
			if _, dup := have[t.Name]; dup {
				return false
			}
			have[t.Name] = t
		}
	}
	if weights == 0 || len(have) != len(manifest) {
		return false
	}
	for _, t := range manifest {
		h, ok := have[t.Name]
		if !ok || h.DType != t.DType || !slices.Equal(h.Shape, t.Shape) {
			return false
		}
	}
	return true
}

// generate lays the manifest out as Hugging Face does
// (huggingface_hub.split_state_dict_into_shards_factory): in the manifest's
// order, a tensor larger than limit gets a shard of its own, appended at
// once; any other joins the current shard unless that would take it past
// limit, which then closes. One shard is model.safetensors; n shards are
// model-0000i-of-0000n.safetensors with an index.
func (p *PushPlan) generate(manifest []PushTensor, sizes []int64, limit int64) error {
	var shards [][]int
	var current []int
	var currentSize int64
	for i, size := range sizes {
		if size > limit {
			shards = append(shards, []int{i})
			continue
		}
		if currentSize+size > limit {
			shards = append(shards, current)
			current, currentSize = nil, 0
		}
		current = append(current, i)
		currentSize += size
	}
	if len(current) > 0 {
		shards = append(shards, current)
	}
	weightMap := make(map[string]string, len(manifest))
	for k, shard := range shards {
		name := SingleWeightsFile
		if len(shards) > 1 {
			name = fmt.Sprintf("model-%05d-of-%05d.safetensors", k+1, len(shards))
		}
		infos := make([]safetensors.TensorInfo, len(shard))
		var data int64
		for j, i := range shard {
			t := manifest[i]
			infos[j] = safetensors.TensorInfo{Name: t.Name, DType: t.DType, Shape: t.Shape}
			data += sizes[i]
			weightMap[t.Name] = name
		}
		prefix, _, err := safetensors.EncodeHeader(infos, generatedMetadata)
		if err != nil {
			return errorf(ErrInvalid, "push: %s: %w", name, err)
		}
		if int64(len(prefix)) > math.MaxInt64-data {
			return errorf(ErrInvalid, "push: %s would exceed 2^63 bytes", name)
		}
		f, err := plannedFile(name, prefix, int64(len(prefix))+data)
		if err != nil {
			return err
		}
		p.Files = append(p.Files, f)
	}
	if len(shards) > 1 {
		p.IndexPath = ShardIndexFile
		p.Index = shardIndexJSON(p.TensorBytes, weightMap)
	}
	return nil
}

// plannedFile places the tensors of a file whose first bytes are prefix and
// whose size is size. The strict parser reads the header, so a generated
// one is checked as a reader of the mount will check it.
func plannedFile(name string, prefix []byte, size int64) (*PlannedFile, error) {
	h, err := safetensors.ReadHeader(bytes.NewReader(prefix), size)
	if err != nil {
		return nil, errorf(ErrInvalid, "push: header of %s: %w", name, err)
	}
	if h.DataOffset() != int64(len(prefix)) {
		return nil, errorf(ErrInvalid, "push: header of %s is %d bytes, its length says %d", name, len(prefix), h.DataOffset())
	}
	offsets, slab := SlabLayout(h)
	f := &PlannedFile{Path: name, Header: prefix, Parsed: h, Size: size, SlabSize: slab}
	f.Tensors = make([]PlannedTensor, len(h.Tensors))
	for i, t := range h.Tensors {
		f.Tensors[i] = PlannedTensor{
			Name: t.Name, DType: t.DType, Shape: t.Shape,
			Offset: h.DataOffset() + t.Begin, Size: t.Size(), SlabOffset: offsets[i],
		}
	}
	return f, nil
}

// shardIndexJSON is model.safetensors.index.json as transformers'
// save_pretrained writes it: json.dumps({"metadata": {"total_size": …},
// "weight_map": …}, indent=2, sort_keys=True) and a newline.
func shardIndexJSON(total int64, weightMap map[string]string) []byte {
	b := []byte("{\n  \"metadata\": {\n    \"total_size\": ")
	b = strconv.AppendInt(b, total, 10)
	b = append(b, "\n  },\n  \"weight_map\": {"...)
	for i, name := range slices.Sorted(maps.Keys(weightMap)) {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, "\n    "...)
		b = appendPyString(b, name)
		b = append(b, ": "...)
		b = appendPyString(b, weightMap[name])
	}
	return append(b, "\n  }\n}\n"...)
}

// appendPyString appends s, valid UTF-8, as Python's json.dumps writes a
// string (ensure_ascii): '"', '\\' and \b \f \n \r \t escaped by name, every
// other character outside ' '…'~' as \uXXXX (UTF-16, surrogate pairs above
// the BMP).
func appendPyString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	u4 := func(b []byte, r rune) []byte {
		return append(b, '\\', 'u', hex[r>>12&0xf], hex[r>>8&0xf], hex[r>>4&0xf], hex[r&0xf])
	}
	b = append(b, '"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b = append(b, '\\', byte(r))
		case r == '\b':
			b = append(b, '\\', 'b')
		case r == '\f':
			b = append(b, '\\', 'f')
		case r == '\n':
			b = append(b, '\\', 'n')
		case r == '\r':
			b = append(b, '\\', 'r')
		case r == '\t':
			b = append(b, '\\', 't')
		case r >= ' ' && r <= '~':
			b = append(b, byte(r))
		case r > 0xffff:
			hi, lo := utf16.EncodeRune(r)
			b = u4(u4(b, hi), lo)
		default:
			b = u4(b, r)
		}
	}
	return append(b, '"')
}
