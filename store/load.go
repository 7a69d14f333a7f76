package store

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"math"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/weightfs/weightfs/store/safetensors"
)

// LoadOptions tune one load.
type LoadOptions struct {
	// Progress, if set, is called once with 0 and the total when copying
	// starts (a load refused before that calls it never: a bad name or
	// folder, a malformed file, a budget), then from the copying goroutines
	// after every chunk with the bytes copied so far and the total. It must
	// be cheap and safe for concurrent use.
	Progress func(done, total int64)
	// Readers is the number of parallel reads (default 4).
	Readers int
	// ChunkSize is the size of one read (default 16 MiB).
	ChunkSize int64
}

const (
	defaultReaders   = 4
	defaultChunkSize = 16 << 20
	// IndexSuffix ends the name of a sharded checkpoint's index file.
	IndexSuffix = ".safetensors.index.json"
)

// sourceFile is a file found in a model folder, before it is loaded.
type sourceFile struct {
	rel    string // '/'-separated path inside the folder
	abs    string
	size   int64
	header *safetensors.Header // weights files only
	buf    *Buffer
	file   *File
	sourceInfo
}

// Load reads the model folder dir into memory and commits it as the next
// version of model name. A safetensors file is validated before anything is
// copied; shards named by a *.safetensors.index.json must agree with it.
// Nothing becomes visible unless every file loaded; errors name the file and
// the problem. A bad name or folder, a malformed file, an index disagreeing
// with its shards and a source that changed while it was read are ErrInvalid
// (a change is first retried once: the folder is read again); a budget
// refusal is a *BudgetError (ErrNoMemory); a closed store is ErrBusy. The load
// ends at its next step when ctx ends or Cancel names it, with an error that
// matches context.Canceled. The store logs its start, its progress every
// few seconds, and its end when it loaded or was cancelled.
func (s *Store) Load(ctx context.Context, name, dir string, opts LoadOptions) (*Version, error) {
	if err := ValidateModelName(name); err != nil {
		return nil, err
	}
	if err := s.checkOpen("load " + name); err != nil {
		return nil, err
	}
	start := time.Now()
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, errorf(ErrInvalid, "model folder %s: %w", dir, err)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	load := &Load{Name: name, Source: abs, Started: start, cancel: cancel}
	s.mu.Lock()
	s.loads[load] = true
	s.mu.Unlock()
	defer s.endLoad(load)
	stopLog := s.logProgress(load)
	v, err := s.loadFolder(ctx, load, opts)
	if errors.Is(err, errSourceChanged) && ctx.Err() == nil {
		s.log.Warn("a source changed while it was read; loading the folder again", "model", name, "err", err)
		v, err = s.loadFolder(ctx, load, opts)
	}
	stopLog()
	// Once off the list of loads in progress, Cancel no longer finds the
	// load: a cancel either comes before this and is honoured, or finds none.
	s.endLoad(load)
	if err == nil && ctx.Err() != nil {
		v.free()
	}
	if ctx.Err() != nil {
		cause := context.Cause(ctx)
		if cause == context.Canceled {
			cause = errCancelled
		}
		done, total := load.Progress()
		s.log.Info("load cancelled", "model", name, "source", abs, "done", done, "total", total, "reason", cause.Error())
		return nil, fmt.Errorf("load %s from %s: %w", name, abs, cause)
	}
	if err != nil {
		return nil, err
	}
	v.loadTime = time.Since(start)
	v.loadedAt = time.Now()
	if err := s.commit(name, v, nil); err != nil {
		v.free()
		return nil, err
	}
	s.log.Info("loaded", "version", v.Name(), "files", len(v.files), "bytes", v.bytes,
		"seconds", v.loadTime.Seconds(), "source", abs)
	return v, nil
}

// afterScan, when set (tests), runs once a load has scanned its folder and
// before it opens the files to copy them.
var afterScan func(root string)

// loadFolder is one try at loading the folder of a load: scan, reserve,
// copy. It stops between steps when ctx ends.
func (s *Store) loadFolder(ctx context.Context, load *Load, opts LoadOptions) (*Version, error) {
	name := load.Name
	abs, files, err := scanFolder(load.Source, s.log)
	if err != nil {
		return nil, err
	}
	if err := checkIndexes(abs, files); err != nil {
		return nil, err
	}
	if afterScan != nil {
		afterScan(abs)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var hostNeed, hostCost, gpuNeed int64
	for _, f := range files {
		hostNeed += f.size
		hostCost += s.arena.Cost(f.size) // what the memory costs: whole pages
		if f.header != nil && len(s.gpus.List()) > 0 {
			_, size := SlabLayout(f.header)
			gpuNeed += slabAllocSize(size)
		}
	}
	// Versions that drained since the reaper last looked are freed first, so
	// that their memory counts as free.
	s.reap()
	release, err := s.reserveEvicting(ctx, name, abs, hostCost, gpuNeed)
	if err != nil {
		return nil, err
	}
	defer release()
	load.done.Store(0)
	load.total.Store(hostNeed)
	s.log.Info("loading", "model", name, "source", abs, "files", len(files), "bytes", hostNeed)
	progress := opts.Progress
	opts.Progress = func(done, total int64) {
		load.done.Store(done)
		if progress != nil {
			progress(done, total)
		}
	}
	return s.copyIn(ctx, abs, files, gpuNeed, opts)
}

// endLoad takes a load off the list of loads in progress.
func (s *Store) endLoad(load *Load) {
	s.mu.Lock()
	delete(s.loads, load)
	s.mu.Unlock()
}

// Cancel cancels the loads of model name in progress and returns them (none:
// nil). Each ends at its next step, frees what it took and returns an error
// that matches context.Canceled; nothing of it becomes visible.
func (s *Store) Cancel(name string) []*Load {
	s.mu.RLock()
	defer s.mu.RUnlock()
	var out []*Load
	for l := range s.loads {
		if l.Name == name {
			l.cancel(errCancelled)
			out = append(out, l)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Started.Before(out[j].Started) })
	return out
}

// logProgress logs a load's progress every s.logEvery until stop is called;
// stop returns once nothing more will be logged.
func (s *Store) logProgress(l *Load) (stop func()) {
	every := s.logEvery
	if every <= 0 {
		every = DefaultLogEvery
	}
	tick := time.NewTicker(every)
	quit, exited := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(exited)
		for {
			select {
			case <-quit:
				return
			case <-tick.C:
			}
			done, total := l.Progress()
			if total == 0 { // still scanning
				continue
			}
			secs := time.Since(l.Started).Seconds()
			s.log.Info("load progress", "model", l.Name, "done", done, "total", total,
				"percent", math.Round(1000*float64(done)/float64(total))/10, "bytes_per_second", int64(float64(done)/secs))
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			tick.Stop()
			close(quit)
			<-exited
		})
	}
}

// maxWalkAfterRefusal is how many more entries the scan looks at once a
// file was refused.
const maxWalkAfterRefusal = 10000

// scanFolder resolves a model folder (store/source.go) and lists the
// regular files it may serve, with their owners and permission bits; it
// refuses a folder that is not a model and validates every safetensors
// header. It returns the resolved folder. Special files (named pipes,
// devices, sockets) are skipped with a logged reason: nothing in a model
// folder may block a load.
func scanFolder(dir string, log *slog.Logger) (string, []*sourceFile, error) {
	sf, err := resolveFolder(dir)
	if err != nil {
		return "", nil, err
	}
	root := sf.root
	var files []*sourceFile
	// A refused file is reported after the model check, so that a folder
	// that is no model at all (/etc) is refused as such; the walk goes on
	// for a while only, so that a load of / ends soon.
	var refused error
	after := 0
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if refused != nil {
			if after++; after > maxWalkAfterRefusal {
				return refused
			}
		}
		if err != nil {
			return errorf(ErrInvalid, "model folder %s: %w", root, err)
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return errorf(ErrInvalid, "model file %s: %w", p, err)
		}
		if d.IsDir() {
			// .git, .cache, .huggingface: bookkeeping, not model files.
			if p != root && strings.HasPrefix(d.Name(), ".") {
				return filepath.SkipDir
			}
			return sf.dirAttrs(filepath.ToSlash(rel), p)
		}
		real, regular, err := sf.check(p, d)
		if err != nil {
			refused = cmp.Or(refused, err)
			return nil
		}
		if !regular {
			if info, err := os.Stat(p); err == nil && !info.IsDir() {
				log.Warn("skipping a file of the model folder that is not a regular file", "file", p, "type", specialFile(info.Mode()))
			}
			return nil
		}
		f := &sourceFile{rel: filepath.ToSlash(rel), abs: p}
		f.real, f.folder = real, sf
		files = append(files, f)
		return nil
	})
	if err != nil {
		return "", nil, err
	}
	if err := sf.checkModel(files); err != nil {
		return "", nil, err
	}
	if refused != nil {
		return "", nil, refused
	}
	for _, f := range files {
		if err := sf.identify(f); err != nil {
			return "", nil, err
		}
		if strings.HasSuffix(f.rel, ".safetensors") {
			if err := f.parseHeader(); err != nil {
				return "", nil, err
			}
		}
	}
	return root, files, nil
}

// shardIndex is the part of model.safetensors.index.json that matters.
type shardIndex struct {
	WeightMap map[string]string `json:"weight_map"`
}

// checkIndexes makes every *.safetensors.index.json agree with the shards it
// names: each named shard exists, and maps exactly the tensors its header holds.
func checkIndexes(root string, files []*sourceFile) error {
	byRel := map[string]*sourceFile{}
	for _, f := range files {
		byRel[f.rel] = f
	}
	for _, idx := range files {
		if !strings.HasSuffix(idx.rel, IndexSuffix) {
			continue
		}
		raw, err := idx.readAll()
		if err != nil {
			return err
		}
		var si shardIndex
		if err := json.Unmarshal(raw, &si); err != nil {
			return errorf(ErrInvalid, "load %s: index is not valid JSON: %w", idx.abs, err)
		}
		if si.WeightMap == nil {
			return errorf(ErrInvalid, "load %s: index has no weight_map", idx.abs)
		}
		want := map[string]map[string]bool{} // shard → tensor names
		for tensor, shard := range si.WeightMap {
			if want[shard] == nil {
				want[shard] = map[string]bool{}
			}
			want[shard][tensor] = true
		}
		shards := make([]string, 0, len(want))
		for shard := range want {
			shards = append(shards, shard)
		}
		sort.Strings(shards)
		base := path.Dir(idx.rel)
		for _, shard := range shards {
			rel := path.Join(base, shard)
			f := byRel[rel]
			if f == nil || f.header == nil {
				return errorf(ErrInvalid, "load %s: weight_map names shard %q, which is not a safetensors file in %s", idx.abs, shard, root)
			}
			have := map[string]bool{}
			for _, t := range f.header.Tensors {
				have[t.Name] = true
				if !want[shard][t.Name] {
					return errorf(ErrInvalid, "load %s: shard %s holds tensor %q, which the weight_map does not map to it", idx.abs, shard, t.Name)
				}
			}
			for _, t := range sortedKeys(want[shard]) {
				if !have[t] {
					return errorf(ErrInvalid, "load %s: weight_map maps tensor %q to shard %s, which does not hold it", idx.abs, t, shard)
				}
			}
		}
	}
	return nil
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// chunk is one parallel read: bytes [off, off+n) of files[file].
type chunk struct {
	file int
	off  int64
	n    int64
}

// copyIn copies every file into a host image with parallel large reads and,
// when the store has GPUs, copies each weights file on to them as soon as its
// host image is complete, overlapped with the reads of the others. On error
// every image and slab made so far is freed.
// gpuNeed is the slab memory the load takes on each GPU.
func (s *Store) copyIn(ctx context.Context, root string, files []*sourceFile, gpuNeed int64, opts LoadOptions) (v *Version, err error) {
	readers, chunkSize := opts.Readers, opts.ChunkSize
	if readers <= 0 {
		readers = defaultReaders
	}
	if chunkSize <= 0 {
		chunkSize = defaultChunkSize
	}
	handles := make([]*os.File, len(files))
	ids := make([]fileID, len(files))
	defer func() {
		for _, h := range handles {
			if h != nil {
				h.Close()
			}
		}
		if err != nil {
			for _, f := range files {
				if f.file != nil {
					f.file.freeGPU()
				}
				if f.buf != nil {
					f.buf.Close()
					f.buf = nil
				}
			}
		}
	}()
	var total int64
	var chunks []chunk
	remaining := make([]atomic.Int64, len(files))
	for i, f := range files {
		if handles[i], err = f.open(); err != nil {
			return nil, err
		}
		if ids[i], err = fdID(handles[i]); err != nil {
			return nil, fmt.Errorf("load %s: %w", f.abs, err)
		}
		if ids[i].size != f.size {
			return nil, errorf(ErrInvalid, "load %s: %w: its size went from %d to %d bytes", f.abs, errSourceChanged, f.size, ids[i].size)
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if f.buf, err = s.arena.NewBuffer(f.rel, f.size); err != nil {
			return nil, fmt.Errorf("load %s: %w", f.abs, err)
		}
		f.file = newFile(f)
		total += f.size
		remaining[i].Store(f.size)
		for off := int64(0); off < f.size; off += chunkSize {
			chunks = append(chunks, chunk{file: i, off: off, n: min(chunkSize, f.size-off)})
		}
	}

	if opts.Progress != nil {
		opts.Progress(0, total) // admitted: copying starts
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	gpu := s.startReplication(root, len(files), gpuNeed)
	var done atomic.Int64
	var firstErr error
	var errOnce sync.Once
	fail := func(e error) {
		errOnce.Do(func() { firstErr = e; cancel() })
	}
	work := make(chan chunk)
	var wg sync.WaitGroup
	for range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for c := range work {
				if ctx.Err() != nil {
					continue // cancelled or failed: drain
				}
				f := files[c.file]
				dst := f.buf.Bytes()[c.off : c.off+c.n]
				if _, err := handles[c.file].ReadAt(dst, c.off); errors.Is(err, io.EOF) {
					fail(errorf(ErrInvalid, "load %s: %w: it ends before offset %d", f.abs, errSourceChanged, c.off+c.n))
					continue
				} else if err != nil {
					fail(fmt.Errorf("load %s: read %d bytes at offset %d: %w", f.abs, c.n, c.off, err))
					continue
				}
				if remaining[c.file].Add(-c.n) == 0 {
					gpu.ready(f.file)
				}
				d := done.Add(c.n)
				if opts.Progress != nil {
					opts.Progress(d, total)
				}
			}
		}()
	}
feed:
	for _, c := range chunks {
		select {
		case work <- c:
		case <-ctx.Done():
			break feed
		}
	}
	close(work)
	wg.Wait()
	gpuErr := gpu.wait()
	if firstErr != nil {
		return nil, firstErr
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("load %s: %w", root, err)
	}
	if err := checkUnchanged(files, handles, ids); err != nil {
		return nil, err
	}
	if gpuErr != nil {
		for _, f := range files {
			f.file.freeGPU()
		}
		s.log.Error("GPU residency failed; the host copy serves", "source", root, "err", gpuErr)
	}
	for i, f := range files {
		f.file.srcID, f.file.hasSrcID = ids[i], true
	}
	v = s.buildVersion(root, files)
	v.gpuErr = gpuErr
	return v, nil
}

func newFile(sf *sourceFile) *File {
	kind := Plain
	if sf.header != nil {
		kind = Weights
	}
	return &File{name: path.Base(sf.rel), path: sf.rel, kind: kind, source: sf.abs, header: sf.header, buf: sf.buf,
		attrs: sf.attrs}
}

// replication copies weights files to the GPUs one after another, as their
// host images complete.
type replication struct {
	work chan *File
	done chan struct{}
	err  error
}

func (s *Store) startReplication(root string, files int, need int64) *replication {
	r := &replication{work: make(chan *File, files), done: make(chan struct{})}
	gpus := s.gpus
	if len(gpus.List()) > 0 {
		r.err = checkGPUMemory(gpus, need, root)
	}
	go func() {
		defer close(r.done)
		for f := range r.work {
			if r.err != nil || f.header == nil || len(gpus.List()) == 0 {
				continue
			}
			if err := f.pin(gpus); err != nil {
				r.err = err
			} else if err := f.replicate(gpus); err != nil {
				r.err = err
			}
		}
	}()
	return r
}

func (r *replication) ready(f *File) { r.work <- f }

func (r *replication) wait() error {
	close(r.work)
	<-r.done
	return r.err
}

// checkUnchanged re-validates what was copied: a source that changed while it
// was read must not be served as if it were whole. Each open file (fstat) and
// the file its path names now (stat) must be what was opened (ids): the same
// inode, size, mtime and ctime; and a weights file's copied header must parse
// as the one validated before the copy. A change is errSourceChanged.
func checkUnchanged(files []*sourceFile, handles []*os.File, ids []fileID) error {
	for i, f := range files {
		now, err := fdID(handles[i])
		if err != nil {
			return fmt.Errorf("load %s: %w", f.abs, err)
		}
		if d := ids[i].diff(now); d != "" {
			return errorf(ErrInvalid, "load %s: %w: %s", f.abs, errSourceChanged, d)
		}
		if now, err = statID(f.abs); err != nil {
			return errorf(ErrInvalid, "load %s: %w: %w", f.abs, errSourceChanged, err)
		}
		if d := ids[i].diff(now); d != "" {
			return errorf(ErrInvalid, "load %s: %w: at its path, %s", f.abs, errSourceChanged, d)
		}
		if f.header == nil {
			continue
		}
		h, err := safetensors.ReadHeader(bytes.NewReader(f.buf.Bytes()), f.size)
		if err != nil {
			return errorf(ErrInvalid, "load %s: %w: %w", f.abs, errSourceChanged, err)
		}
		if h.HeaderSize != f.header.HeaderSize || len(h.Tensors) != len(f.header.Tensors) {
			return errorf(ErrInvalid, "load %s: %w: its header differs", f.abs, errSourceChanged)
		}
		f.header = h
	}
	return nil
}

// buildVersion arranges loaded files into a directory tree with fresh inode
// numbers.
func (s *Store) buildVersion(root string, files []*sourceFile) *Version {
	sort.Slice(files, func(i, j int) bool { return files[i].rel < files[j].rel })
	var folder *sourceFolder
	if len(files) > 0 {
		folder = files[0].folder
	}
	v := &Version{source: root, root: &Dir{ino: s.newIno(), attrs: folder.dirAttrsOf(".")}}
	for _, sf := range files {
		f := sf.file
		f.header = sf.header // re-read from the host image by checkUnchanged
		v.files = append(v.files, f)
		v.bytes += f.Size()
	}
	s.fileTree(v.root, v.files, folder.dirAttrsOf)
	return v
}

// fileTree files each of files (in path order) under root with a fresh inode
// number, making the directories on its path (attributes from dirAttrs of
// their '/'-separated path).
func (s *Store) fileTree(root *Dir, files []*File, dirAttrs func(rel string) attrs) {
	dirs := map[string]*Dir{".": root}
	var dirFor func(rel string) *Dir
	dirFor = func(rel string) *Dir {
		if d := dirs[rel]; d != nil {
			return d
		}
		parent := dirFor(path.Dir(rel))
		d := &Dir{name: path.Base(rel), ino: s.newIno(), attrs: dirAttrs(rel)}
		parent.dirs = append(parent.dirs, d)
		dirs[rel] = d
		return d
	}
	for _, f := range files {
		f.ino = s.newIno()
		d := dirFor(path.Dir(f.path))
		d.files = append(d.files, f)
	}
	for _, d := range dirs {
		sort.Slice(d.dirs, func(i, j int) bool { return d.dirs[i].name < d.dirs[j].name })
	}
}

// Lookup finds a direct child of d by name: a subdirectory or a file (both
// nil when there is none).
func (d *Dir) Lookup(name string) (*Dir, *File) {
	i := sort.Search(len(d.dirs), func(i int) bool { return d.dirs[i].name >= name })
	if i < len(d.dirs) && d.dirs[i].name == name {
		return d.dirs[i], nil
	}
	j := sort.Search(len(d.files), func(i int) bool { return d.files[i].name >= name })
	if j < len(d.files) && d.files[j].name == name {
		return nil, d.files[j]
	}
	return nil, nil
}
