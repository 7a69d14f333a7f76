package store

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"path"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/weightfs/weightfs/cuda"
	"github.com/weightfs/weightfs/store/safetensors"
)

// A staged version is a push in progress (issue 9): its files are allocated
// in the arena, laid out by PlanPush against the model's current version, and
// its slabs on every GPU of the store, but nothing is on the mount until
// Commit. Its memory has one owner: the Staged until it commits, then the
// Version; Abort, a failed Commit and Store.Close free it.

// StageOptions tune Store.Stage.
type StageOptions struct {
	// Writer says who pushes (e.g. "pid 123"): a second push of the same
	// name is refused naming it, and the logs name it.
	Writer string
	// Layout tunes the generated layout (PlanPush).
	Layout PushLayoutOptions
}

// Staged is a version being pushed: allocated, invisible until Commit.
// Its methods are safe for concurrent use; WriteTensor calls for different
// tensors may run in parallel.
type Staged struct {
	s       *Store
	name    string
	writer  string
	started time.Time
	plan    *PushPlan
	v       *Version // unnumbered; holds every host image and slab
	tensors map[string]stagedTensor
	release func() // the reservation

	// copies is held for reading by a host write in flight and for writing
	// by Commit and Abort, which so wait for writes in flight.
	copies sync.RWMutex

	mu      sync.Mutex
	state   stageState
	written map[string]string // tensor → "" (host image) or the GPU's UUID
	done    int64             // bytes of the tensors written
}

type stageState int

const (
	stageOpen stageState = iota
	stageCommitting
	stageCommitted
	stageAborted
)

// stagedTensor is where one tensor of a staged version goes.
type stagedTensor struct {
	file *File
	t    StagedTensor
}

// StagedTensor is one tensor of a staged version: its weights file and its
// place in it (file offset, byte size, slab offset).
type StagedTensor struct {
	File string // the weights file's path in the version
	PlannedTensor
}

// Stage starts a push of model name: the next version, laid out by PlanPush
// with the model's current version as base (none for a name's first push),
// with the base's non-weight files unless given holds them (path → bytes).
// It reserves the version's host memory (and one slab per weights file on
// each GPU of the store) and refuses, with a *BudgetError or ErrNoMemory,
// before anything is allocated; then it allocates every file with its known
// bytes written: weights files' headers, the shard index, the base's files,
// the given ones. Tensor bytes are left to WriteTensor or MarkWritten.
// Nothing is visible on the mount until Commit. A bad name, manifest or given
// path is ErrInvalid; a push of a name that has one in progress is ErrBusy
// naming its writer.
func (s *Store) Stage(name string, manifest []PushTensor, given map[string][]byte, opts StageOptions) (*Staged, error) {
	if err := ValidateModelName(name); err != nil {
		return nil, fmt.Errorf("push: %w", err)
	}
	st := &Staged{s: s, name: name, writer: opts.Writer, started: time.Now(), written: map[string]string{}}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, errorf(ErrBusy, "push %s: the store is closed", name)
	}
	if other := s.staged[name]; other != nil {
		s.mu.Unlock()
		return nil, errorf(ErrBusy, "push %s: a push is in progress by %s since %s", name, other.writerName(),
			other.started.Format(time.RFC3339))
	}
	s.staged[name] = st // holds the name while staging
	s.mu.Unlock()
	if err := st.stage(manifest, given, opts.Layout); err != nil {
		s.dropStaged(st)
		return nil, err
	}
	s.log.Info("push staged", "model", name, "writer", st.writerName(), "files", len(st.v.files),
		"tensors", len(st.tensors), "tensor_bytes", st.plan.TensorBytes, "same_layout", st.plan.SameAsBase,
		"seconds", time.Since(st.started).Seconds())
	return st, nil
}

func (st *Staged) writerName() string {
	if st.writer == "" {
		return "an unnamed writer"
	}
	return st.writer
}

// pushSource starts the Source of a pushed version (and of its budget
// refusal, which words it "push NAME by WRITER").
const pushSource = "a push by "

// source is what the version's Source and a budget refusal say of a push.
func (st *Staged) source() string { return pushSource + st.writerName() }

// dropStaged frees the name st held.
func (s *Store) dropStaged(st *Staged) {
	s.mu.Lock()
	if s.staged[st.name] == st {
		delete(s.staged, st.name)
	}
	s.mu.Unlock()
}

// stage plans, reserves and allocates st's version.
func (st *Staged) stage(manifest []PushTensor, given map[string][]byte, layout PushLayoutOptions) (err error) {
	s := st.s
	var base *Version
	if m := s.Model(st.name); m != nil {
		base = m.Current()
	}
	if base != nil {
		if !base.Acquire() {
			return errorf(ErrBusy, "push %s: its current version %s was just unloaded; push again", st.name, base.Name())
		}
		defer base.Release()
		// Unchanged files are copied from the base's host images.
		if err := base.EnsureHost(context.Background()); err != nil {
			return fmt.Errorf("push %s: %w", st.name, err)
		}
	}
	plan, err := PlanPush(manifest, base, slices.Sorted(maps.Keys(given)), layout)
	if err != nil {
		return err
	}
	st.plan = plan

	gpus := s.gpus.List()
	var host, gpuNeed int64
	for _, f := range plan.Files {
		host += s.arena.Cost(f.Size)
		if len(gpus) > 0 {
			gpuNeed += slabAllocSize(f.SlabSize)
		}
	}
	host += s.arena.Cost(int64(len(plan.Index)))
	for _, f := range plan.BaseFiles {
		host += s.arena.Cost(f.Size())
	}
	for _, b := range given {
		host += s.arena.Cost(int64(len(b)))
	}
	// Versions that drained meanwhile count as free, but freeing tens of GB
	// takes seconds: only a refused push waits for it (Store.Run frees them
	// in the background otherwise).
	admit := func() (func(), error) {
		release, err := s.reserveEvicting(context.Background(), st.name, st.source(), host, gpuNeed)
		if err != nil || len(gpus) == 0 {
			return release, err
		}
		if err := checkGPUMemory(s.gpus, gpuNeed, "push "+st.name); err != nil {
			release()
			return nil, err
		}
		return release, nil
	}
	release, err := admit()
	if err != nil && len(s.Draining()) > 0 {
		s.reap()
		release, err = admit()
	}
	if err != nil {
		return err
	}
	v := &Version{source: st.source()}
	defer func() {
		if err != nil {
			v.free()
			release()
		}
	}()

	// Owners and permission bits: the base's for the files it had, else
	// those of the base's root (read bits only); root's for a first push.
	rootAttrs := attrs{perm: 0o555}
	if base != nil {
		rootAttrs = base.root.attrs
	}
	fileAttrs := func(p string) attrs {
		if base != nil {
			for _, f := range base.files {
				if f.path == p {
					return f.attrs
				}
			}
		}
		return attrs{uid: rootAttrs.uid, gid: rootAttrs.gid, perm: rootAttrs.perm & 0o444}
	}
	newFile := func(p string, kind Kind, size int64, source string) (*File, error) {
		newBuffer := s.arena.NewBuffer
		if kind == Weights {
			// Its pages are allocated by the first host write or the fill
			// after the commit (Buffer.Allocate), not on the push's
			// critical path.
			newBuffer = s.arena.NewLazyBuffer
		}
		buf, err := newBuffer(p, size)
		if err != nil {
			return nil, fmt.Errorf("push %s: %s: %w", st.name, p, err)
		}
		f := &File{name: path.Base(p), path: p, kind: kind, source: source, buf: buf, attrs: fileAttrs(p)}
		v.files = append(v.files, f)
		return f, nil
	}

	st.tensors = make(map[string]stagedTensor, len(manifest))
	for _, pf := range plan.Files {
		f, err := newFile(pf.Path, Weights, pf.Size, "")
		if err != nil {
			return err
		}
		f.header = pf.Parsed
		copy(f.Bytes(), pf.Header)
		for _, t := range pf.Tensors {
			st.tensors[t.Name] = stagedTensor{file: f, t: StagedTensor{File: pf.Path, PlannedTensor: t}}
		}
		for _, gpu := range gpus {
			slab, err := gpu.ctx.NewSlab(uint64(slabAllocSize(pf.SlabSize)))
			if err != nil {
				return fmt.Errorf("push %s: %s on GPU %s: %w", st.name, pf.Path, gpu.UUID(), err)
			}
			f.replicas = append(f.replicas, &replica{gpu: gpu, slab: slab, size: slabAllocSize(pf.SlabSize)})
		}
	}
	if plan.IndexPath != "" {
		f, err := newFile(plan.IndexPath, Plain, int64(len(plan.Index)), "")
		if err != nil {
			return err
		}
		copy(f.Bytes(), plan.Index)
	}
	for _, bf := range plan.BaseFiles {
		f, err := newFile(bf.path, Plain, bf.Size(), bf.source)
		if err != nil {
			return err
		}
		copy(f.Bytes(), bf.Bytes())
	}
	for _, p := range plan.Given {
		f, err := newFile(p, Plain, int64(len(given[p])), "")
		if err != nil {
			return err
		}
		copy(f.Bytes(), given[p])
	}
	st.buildTree(v, rootAttrs)
	st.v = v
	st.release = release
	return nil
}

// buildTree sorts v's files by path and makes their directories.
func (st *Staged) buildTree(v *Version, rootAttrs attrs) {
	slices.SortFunc(v.files, func(a, b *File) int { return strings.Compare(a.path, b.path) })
	v.root = &Dir{ino: st.s.newIno(), attrs: rootAttrs}
	for _, f := range v.files {
		v.bytes += f.Size()
	}
	st.s.fileTree(v.root, v.files, func(string) attrs { return rootAttrs })
}

// Name is the model the push is for.
func (st *Staged) Name() string { return st.name }

// Writer is who pushes (StageOptions.Writer).
func (st *Staged) Writer() string { return st.writer }

// Started is when the push was staged.
func (st *Staged) Started() time.Time { return st.started }

// Plan is the push's layout.
func (st *Staged) Plan() *PushPlan { return st.plan }

// Progress is the bytes of the tensors written so far and their total.
func (st *Staged) Progress() (done, total int64) {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.done, st.plan.TensorBytes
}

// Pushes lists the pushes staged now, by model name.
func (s *Store) Pushes() []*Staged {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := slices.Collect(maps.Values(s.staged))
	slices.SortFunc(out, func(a, b *Staged) int { return strings.Compare(a.name, b.name) })
	return out
}

// checkOpenLocked refuses a request once the push committed or aborted
// (ErrBusy); st.mu is held.
func (st *Staged) checkOpenLocked(what string) error {
	switch st.state {
	case stageCommitting:
		return errorf(ErrBusy, "push %s: %s: the push is committing", st.name, what)
	case stageCommitted:
		return errorf(ErrBusy, "push %s: %s: the push was committed", st.name, what)
	case stageAborted:
		return errorf(ErrBusy, "push %s: %s: the push was aborted", st.name, what)
	}
	return nil
}

// Tensors are the push's tensors with their places, by file path then file
// offset.
func (st *Staged) Tensors() ([]StagedTensor, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := st.checkOpenLocked("tensors"); err != nil {
		return nil, err
	}
	var out []StagedTensor
	for _, pf := range st.plan.Files {
		for _, t := range pf.Tensors {
			out = append(out, st.tensors[t.Name].t)
		}
	}
	return out, nil
}

// lookupLocked finds a tensor not written yet; st.mu is held.
func (st *Staged) lookupLocked(what, name string) (stagedTensor, error) {
	if err := st.checkOpenLocked(what + " " + name); err != nil {
		return stagedTensor{}, err
	}
	t, ok := st.tensors[name]
	if !ok {
		return stagedTensor{}, errorf(ErrInvalid, "push %s: %s: tensor %q is not in the manifest", st.name, what, name)
	}
	if _, ok := st.written[name]; ok {
		return stagedTensor{}, errorf(ErrInvalid, "push %s: %s: tensor %q was already written", st.name, what, name)
	}
	return t, nil
}

// WriteTensor copies data, tensor name's bytes, into the host image at its
// planned offset. Each tensor is written exactly once: a second write, a
// name not in the manifest or a size other than the tensor's is ErrInvalid
// naming it; after Commit or Abort it is ErrBusy.
func (st *Staged) WriteTensor(name string, data []byte) error {
	st.copies.RLock()
	defer st.copies.RUnlock()
	if err := st.allocate(name); err != nil {
		return err
	}
	st.mu.Lock()
	t, err := st.lookupLocked("write", name)
	if err == nil && int64(len(data)) != t.t.Size {
		err = errorf(ErrInvalid, "push %s: write: tensor %q is %d bytes (%s %v), got %d", st.name, name, t.t.Size,
			t.t.DType, t.t.Shape, len(data))
	}
	if err != nil {
		st.mu.Unlock()
		return err
	}
	st.written[name] = ""
	st.done += t.t.Size
	st.mu.Unlock()
	copy(t.file.Bytes()[t.t.Offset:t.t.Offset+t.t.Size], data)
	return nil
}

// HostBytes is the part of the host image tensor name goes to, for a writer
// that fills it in place (then calls MarkWritten with gpu ""). It stays
// valid until Commit or Abort, which the caller must not overlap with its
// writes. An unknown name is ErrInvalid; after Commit or Abort, ErrBusy.
func (st *Staged) HostBytes(name string) ([]byte, error) {
	if err := st.allocate(name); err != nil {
		return nil, err
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := st.checkOpenLocked("host bytes of " + name); err != nil {
		return nil, err
	}
	t, ok := st.tensors[name]
	if !ok {
		return nil, errorf(ErrInvalid, "push %s: host bytes: tensor %q is not in the manifest", st.name, name)
	}
	return t.file.Bytes()[t.t.Offset : t.t.Offset+t.t.Size : t.t.Offset+t.t.Size], nil
}

// allocate allocates the host image tensor name goes to before a host write
// (st.tensors does not change once staged); an unknown name is left to the
// caller's checks.
func (st *Staged) allocate(name string) error {
	t, ok := st.tensors[name]
	if !ok {
		return nil
	}
	st.mu.Lock()
	err := st.checkOpenLocked("write " + name)
	st.mu.Unlock()
	if err != nil {
		return err
	}
	if err := t.file.buf.Allocate(); err != nil {
		return fmt.Errorf("push %s: write %q: %w", st.name, name, err)
	}
	return nil
}

// Slab is the staged slab of weights file file on GPU gpu (a UUID), for a
// writer that copies tensors into it device to device (at their
// SlabOffset) and then calls MarkWritten with that GPU.
func (st *Staged) Slab(file, gpu string) (*cuda.Slab, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if err := st.checkOpenLocked("slab of " + file); err != nil {
		return nil, err
	}
	for _, f := range st.v.files {
		if f.path != file || f.kind != Weights {
			continue
		}
		if r := f.replicaOn(gpu); r != nil {
			return r.slab, nil
		}
		return nil, errorf(ErrInvalid, "push %s: %s has no slab on GPU %q (GPUs: %s)", st.name, file, gpu, st.gpuList())
	}
	return nil, errorf(ErrInvalid, "push %s: no weights file %q", st.name, file)
}

func (st *Staged) gpuList() string {
	var ids []string
	for _, g := range st.s.gpus.List() {
		ids = append(ids, g.UUID())
	}
	if len(ids) == 0 {
		return "none"
	}
	return strings.Join(ids, ", ")
}

// replicaOn is f's replica on the GPU of that UUID, or nil.
func (f *File) replicaOn(uuid string) *replica {
	for _, r := range f.replicas {
		if r.gpu.UUID() == uuid {
			return r
		}
	}
	return nil
}

// MarkWritten records tensor name as written elsewhere: in the host image
// through HostBytes (gpu ""), or device to device into its slab on the GPU of
// UUID gpu. The same rules as WriteTensor hold: exactly once, a known name;
// an unknown GPU is ErrInvalid.
func (st *Staged) MarkWritten(name, gpu string) error {
	st.mu.Lock()
	defer st.mu.Unlock()
	t, err := st.lookupLocked("mark written", name)
	if err != nil {
		return err
	}
	if gpu != "" && t.file.replicaOn(gpu) == nil {
		return errorf(ErrInvalid, "push %s: mark written: tensor %q: no staged slab on GPU %q (GPUs: %s)", st.name, name, gpu, st.gpuList())
	}
	st.written[name] = gpu
	st.done += t.t.Size
	return nil
}

// Missing are the tensors not written yet, sorted.
func (st *Staged) Missing() []string {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.missingLocked()
}

func (st *Staged) missingLocked() []string {
	var out []string
	for name := range st.tensors {
		if _, ok := st.written[name]; !ok {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// maxNamed is how many missing tensors an error names.
const maxNamed = 10

// Commit makes the push the model's next version, current at once. It is
// refused (ErrInvalid, naming them) while tensors are missing; the push then
// stays open. Otherwise only what the GPUs need happens before the commit:
// every GPU's slab gets the tensors it was not written with (from the host
// image, or device to device from the GPU they were written on), each
// header is checked again from the host image, the slabs are exported and
// the version is committed as a load is (retention, watchers). The host
// image of tensors written on a GPU is filled afterwards in the background:
// File.WaitReady waits for it. Any failure before the commit aborts the push
// and frees it. After Commit or Abort every method is ErrBusy.
func (st *Staged) Commit(ctx context.Context) (*Version, error) {
	st.mu.Lock()
	if err := st.checkOpenLocked("commit"); err != nil {
		st.mu.Unlock()
		return nil, err
	}
	if missing := st.missingLocked(); len(missing) > 0 {
		st.mu.Unlock()
		named := missing
		more := ""
		if len(named) > maxNamed {
			named, more = named[:maxNamed], fmt.Sprintf(" and %d more", len(missing)-maxNamed)
		}
		return nil, errorf(ErrInvalid, "push %s: commit: %d of %d tensors not written: %s%s", st.name, len(missing),
			len(st.tensors), quoteAll(named), more)
	}
	st.state = stageCommitting
	written := maps.Clone(st.written)
	st.mu.Unlock()

	st.copies.Lock() // writes in flight end first
	defer st.copies.Unlock()
	v, err := st.finish(ctx, written)
	if err != nil {
		st.free("commit failed: " + err.Error())
		return nil, err
	}
	st.mu.Lock()
	st.state = stageCommitted
	st.mu.Unlock()
	return v, nil
}

func quoteAll(names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = fmt.Sprintf("%q", n)
	}
	return strings.Join(q, ", ")
}

// finish syncs host and slabs, checks the headers and commits.
func (st *Staged) finish(ctx context.Context, written map[string]string) (*Version, error) {
	s, v := st.s, st.v
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("push %s: commit: %w", st.name, err)
	}
	var fills []hostFill
	if gpus := s.gpus.List(); len(gpus) > 0 {
		var err error
		if fills, err = st.syncGPUs(ctx, written); err != nil {
			return nil, err
		}
	}
	for _, f := range v.files {
		if f.kind != Weights {
			continue
		}
		img := f.Bytes()
		h, err := safetensors.Parse(img)
		if err != nil {
			return nil, errorf(ErrInvalid, "push %s: commit: %s: %w", st.name, f.path, err)
		}
		if h.DataOffset() != f.header.DataOffset() || !bytes.Equal(img[:h.DataOffset()], st.plannedHeader(f.path)) {
			return nil, errorf(ErrInvalid, "push %s: commit: the header of %s changed while staged", st.name, f.path)
		}
		f.header = h
	}
	v.loadedAt = time.Now()
	v.loadTime = v.loadedAt.Sub(st.started)
	if err := s.commit(st.name, v, fills); err != nil {
		return nil, fmt.Errorf("push %s: commit: %w", st.name, err)
	}
	// The version owns its memory now; the reservation and the name go.
	st.release()
	s.dropStaged(st)
	s.log.Info("pushed", "version", v.Name(), "writer", st.writerName(), "files", len(v.files),
		"tensor_bytes", st.plan.TensorBytes, "seconds", v.loadTime.Seconds())
	return v, nil
}

func (st *Staged) plannedHeader(p string) []byte {
	for _, pf := range st.plan.Files {
		if pf.Path == p {
			return pf.Header
		}
	}
	return nil
}

// syncGPUs makes every slab hold every tensor: each slab gets, from the
// host image (pinned first), the tensors written there, and, device to
// device, those written on another GPU. Slabs are exported only then. It
// touches the host image's tensor bytes only for tensors written there, and
// returns what the host image lacks: the tensors written on a GPU, to be
// filled after the commit.
func (st *Staged) syncGPUs(ctx context.Context, written map[string]string) ([]hostFill, error) {
	var fills []hostFill
	for _, f := range st.v.files {
		if f.kind != Weights {
			continue
		}
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("push %s: commit: %w", st.name, err)
		}
		offsets, _ := SlabLayout(f.header)
		runsFrom := func(gpu string) []copyRun {
			return slabCopiesExcept(f.header, offsets, func(name string) bool { return written[name] != gpu })
		}
		hostRuns := runsFrom("")
		if len(hostRuns) > 0 {
			if err := f.pin(st.s.gpus); err != nil {
				return nil, fmt.Errorf("push %s: %w", st.name, err)
			}
		}
		fill := hostFill{file: f}
		for _, r := range f.replicas {
			if runs := runsFrom(r.gpu.UUID()); len(runs) > 0 {
				fill.from = append(fill.from, slabRuns{r: r, runs: runs})
			}
		}
		for _, r := range f.replicas {
			if err := r.gpu.complete(r.slab, f.Bytes(), hostRuns, fill.from); err != nil {
				return nil, fmt.Errorf("push %s: copy %s to GPU %s: %w", st.name, f.path, r.gpu.UUID(), err)
			}
			var err error
			if r.handle, err = r.slab.IPCHandle(); err != nil {
				return nil, fmt.Errorf("push %s: export the slab of %s on GPU %s: %w", st.name, f.path, r.gpu.UUID(), err)
			}
		}
		if len(fill.from) > 0 {
			fills = append(fills, fill)
		}
	}
	return fills, nil
}

// Abort ends the push without a version: its host images, slabs, pins and
// reservation are freed and reason is logged. After Commit or Abort it is
// ErrBusy and frees nothing.
func (st *Staged) Abort(reason string) error {
	st.mu.Lock()
	if err := st.checkOpenLocked("abort"); err != nil {
		st.mu.Unlock()
		return err
	}
	st.state = stageAborted
	st.mu.Unlock()
	st.copies.Lock()
	defer st.copies.Unlock()
	st.free(reason)
	return nil
}

// free frees everything the push holds and gives its name back; the copies
// lock is held.
func (st *Staged) free(reason string) {
	st.mu.Lock()
	st.state = stageAborted
	done := st.done
	st.mu.Unlock()
	if err := st.v.free(); err != nil {
		st.s.log.Error("free an aborted push", "model", st.name, "err", err)
	}
	st.release()
	st.s.dropStaged(st)
	st.s.log.Info("push aborted", "model", st.name, "writer", st.writerName(), "written", done,
		"total", st.plan.TensorBytes, "reason", reason)
}
