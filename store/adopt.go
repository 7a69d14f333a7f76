package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/weightfs/weightfs/store/safetensors"
)

// Adoption (docs/ARCHITECTURE.md, "Adoption"): a daemon that starts on a
// state directory an earlier daemon left (killed, or crashed) serves again
// every version whose sources are unchanged, from the host images that
// survived it, without reading a source.

// AdoptResult says what Adopt did.
type AdoptResult struct {
	Adopted []*Version
	// Dropped are the versions not adopted ("NAME@N") with the reason.
	Dropped map[string]string
}

// Adopt serves again what the state directory's manifest names: each
// version whose every source file is unchanged (path, size, mtime, inode
// and device; a pushed file: the XXH3 of its image equals the recorded
// one) is mapped from its images, its headers parsed from them, its GPU
// replicas uploaded from them, and it is served under its number; the
// current versions and last numbers are kept. Other versions are dropped,
// and images the adopted versions do not use are deleted. Everything is
// logged. A malformed manifest is logged and ignored (all images go). Only
// a store opened on a state directory adopts; it must not serve yet.
func (s *Store) Adopt(ctx context.Context) AdoptResult {
	res := AdoptResult{Dropped: map[string]string{}}
	if s.state == nil {
		return res
	}
	kept := map[string]bool{}
	defer func() {
		s.deleteUnreferenced(kept)
		s.saveState()
	}()
	raw, err := s.state.readManifest()
	if err != nil || raw == nil {
		if err != nil {
			s.log.Warn("state manifest unreadable; starting fresh", "err", err)
		}
		return res
	}
	var m stateManifest
	if err := json.Unmarshal(raw, &m); err != nil || m.Format != manifestFormat {
		if err == nil {
			err = fmt.Errorf("format %d, want %d", m.Format, manifestFormat)
		}
		s.log.Warn("state manifest malformed; starting fresh", "file", filepath.Join(s.state.path, manifestName), "err", err)
		return res
	}
	for _, mm := range m.Models {
		if err := ValidateModelName(mm.Name); err != nil {
			s.log.Warn("dropped at start", "model", mm.Name, "reason", err.Error())
			continue
		}
		var adopted []*Version
		for _, mv := range mm.Versions {
			name := fmt.Sprintf("%s@%d", mm.Name, mv.Number)
			start := time.Now()
			v, err := s.adoptVersion(ctx, mm.Name, mv)
			if err != nil {
				res.Dropped[name] = err.Error()
				s.log.Warn("dropped at start", "version", name, "reason", err.Error())
				continue
			}
			for _, f := range v.files {
				if f.buf != nil {
					kept[f.buf.image] = true
				} else {
					kept[f.packed.image] = true
				}
			}
			adopted = append(adopted, v)
			s.log.Info("adopted", "version", name, "tier", v.Tier(), "files", len(v.files), "bytes", v.bytes,
				"seconds", time.Since(start).Seconds(), "source", v.source)
		}
		last := mm.LastNumber
		for _, v := range adopted {
			last = max(last, v.number)
		}
		res.Adopted = append(res.Adopted, s.insertAdopted(mm.Name, last, mm.Current, adopted)...)
	}
	return res
}

// adoptVersion maps one version's images and checks its sources.
func (s *Store) adoptVersion(ctx context.Context, model string, mv manifestVersion) (_ *Version, err error) {
	if mv.Number <= 0 {
		return nil, fmt.Errorf("version number %d in the manifest", mv.Number)
	}
	v := &Version{source: mv.Source, number: mv.Number, loadedAt: mv.LoadedAt,
		loadTime: time.Duration(mv.LoadSeconds * float64(time.Second))}
	seen := map[string]bool{}
	for _, mf := range mv.Files {
		if err := checkManifestFile(mf, seen); err != nil {
			return nil, err
		}
	}
	err = s.listedVersion(ctx, v, mv.Dirs, len(mv.Files), func(i int) (*File, error) {
		return s.adoptFile(model, mv.Number, mv.Files[i])
	})
	if err != nil {
		return nil, err
	}
	return v, nil
}

// listedWorkers is how many files of a listing are made at once: reading
// (and decoding, and checksumming) several files keeps several streams of
// a disk busy and overlaps one file's checksum with another's reads.
const listedWorkers = 4

// listedFiles makes the n files of a listing with file(i), listedWorkers at
// a time; it returns those made (the caller owns them, also on an error)
// and the first error, after which no further file is started.
func listedFiles(ctx context.Context, n int, file func(i int) (*File, error)) ([]*File, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	made := make([]*File, n)
	errs := make([]error, n)
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(n, listedWorkers) {
		wg.Go(func() {
			for i := range next {
				if errs[i] = ctx.Err(); errs[i] != nil {
					continue
				}
				if made[i], errs[i] = file(i); errs[i] != nil {
					cancel()
				}
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	var out []*File
	var first error
	for i, f := range made {
		if f != nil {
			out = append(out, f)
		}
		// A file's own error comes before the cancellations it caused.
		if err := errs[i]; err != nil && (first == nil || errors.Is(first, context.Canceled) && !errors.Is(err, context.Canceled)) {
			first = err
		}
	}
	return out, first
}

// listedVersion fills v with the n files a listing records (the state
// manifest's, a snapshot's version.json), made by file(i), and the folders
// dirs records: the files sorted, their tree built, the weights files
// replicated to the GPUs from their host images. On an error v is freed.
func (s *Store) listedVersion(ctx context.Context, v *Version, dirs []manifestDir, n int, file func(i int) (*File, error)) (err error) {
	attrsOf := map[string]attrs{}
	for _, d := range dirs {
		attrsOf[d.Path] = d.manifestAttrs.attrs(0o555)
	}
	v.root = &Dir{ino: s.newIno(), attrs: dirAttrsOr(attrsOf, ".")}
	defer func() {
		if err != nil {
			v.free()
		}
	}()
	files, err := listedFiles(ctx, n, file)
	for _, f := range files {
		v.files = append(v.files, f)
		v.bytes += f.Size()
	}
	if err != nil {
		return err
	}
	sort.Slice(v.files, func(i, j int) bool { return v.files[i].path < v.files[j].path })
	s.fileTree(v.root, v.files, func(rel string) attrs { return dirAttrsOr(attrsOf, rel) })
	packed := 0
	for _, f := range v.files {
		if f.buf == nil {
			packed++
		}
	}
	switch {
	case packed == 0:
		if gpus := s.gpus.List(); len(gpus) > 0 {
			v.gpuErr = s.adoptReplicas(v)
		}
	case packed < len(v.files):
		return fmt.Errorf("%d of its %d files are compressed, the others not (a crash during a tier move)", packed, len(v.files))
	default:
		// The compressed tier, without GPU replicas (there is no host
		// image to upload from): the restore on its next open serves it.
		v.use.compressed = true
	}
	return nil
}

// checkListedPath refuses a listed file (where names the listing) whose
// path is not clean and relative or that is listed twice.
func checkListedPath(where, p string, seen map[string]bool) error {
	switch {
	case p == "" || path.IsAbs(p) || path.Clean(p) != p || strings.HasPrefix(p, "../") || p == "..":
		return fmt.Errorf("file path %q in %s is not a clean relative path", p, where)
	case seen[p]:
		return fmt.Errorf("file %s is listed twice in %s", p, where)
	}
	seen[p] = true
	return nil
}

func dirAttrsOr(dirs map[string]attrs, rel string) attrs {
	if a, ok := dirs[rel]; ok {
		return a
	}
	return attrs{perm: 0o555}
}

// checkManifestFile refuses a file entry that cannot be one of a version.
func checkManifestFile(mf manifestFile, seen map[string]bool) error {
	if err := checkListedPath("the manifest", mf.Path, seen); err != nil {
		return err
	}
	image := mf.Image
	switch mf.Tier {
	case "":
	case TierCompressed, TierSnapshot:
		image = mf.Packed
		if mf.Tier == TierSnapshot {
			image = mf.Snapshot
		}
		if mf.Image != "" || mf.PackedSize < 0 {
			return fmt.Errorf("file %s: %s with image %q and %d stream bytes in the manifest", mf.Path, mf.Tier, mf.Image, mf.PackedSize)
		}
	default:
		return fmt.Errorf("file %s: tier %q in the manifest", mf.Path, mf.Tier)
	}
	switch {
	case !plainName(image):
		return fmt.Errorf("file %s: image name %q in the manifest is not a plain file name", mf.Path, image)
	case mf.Size < 0:
		return fmt.Errorf("file %s: size %d in the manifest", mf.Path, mf.Size)
	case mf.Kind != Plain.String() && mf.Kind != Weights.String():
		return fmt.Errorf("file %s: kind %q in the manifest", mf.Path, mf.Kind)
	}
	return nil
}

// plainName: name is a file name without a folder.
func plainName(name string) bool {
	return name != "" && !strings.ContainsAny(name, "/\x00") && name != "." && name != ".."
}

// adoptFile checks one file's source and maps its image, or opens its
// stream in the compressed or snapshot tier (checked by its headers and
// length; its XXH3 is checked when it is restored). model and number are
// its version's.
func (s *Store) adoptFile(model string, number int, mf manifestFile) (*File, error) {
	var want uint64
	byID := mf.Source != "" && mf.SourceID != nil // else a pushed file: by checksum
	if byID {
		now, err := statID(mf.Source)
		if err != nil {
			return nil, fmt.Errorf("source %s: %w", mf.Source, unwrapPath(err))
		}
		if d := mf.SourceID.diff(now); d != "" {
			return nil, fmt.Errorf("source %s changed: %s", mf.Source, d)
		}
	} else {
		var err error
		if mf.XXH3 == "" {
			return nil, fmt.Errorf("pushed file %s: no checksum was recorded (its image may be incomplete)", mf.Path)
		}
		if want, err = strconv.ParseUint(mf.XXH3, 16, 64); err != nil {
			return nil, fmt.Errorf("pushed file %s: checksum %q in the manifest: %w", mf.Path, mf.XXH3, err)
		}
	}
	f := &File{name: path.Base(mf.Path), path: mf.Path, kind: Plain, source: mf.Source,
		attrs: mf.manifestAttrs.attrs(0o444)}
	var err error
	if mf.Tier != "" {
		// A version is compressed after its checksums: the restore checks
		// its bytes against them.
		if _, err := strconv.ParseUint(mf.XXH3, 16, 64); err != nil {
			return nil, fmt.Errorf("%s file %s: no valid checksum was recorded (%q)", mf.Tier, mf.Path, mf.XXH3)
		}
		f.rawSize = mf.Size
	}
	switch mf.Tier {
	case TierCompressed:
		f.packed, err = s.arena.adoptPacked(mf.Packed, mf.Path, mf.PackedSize, mf.Size)
	case TierSnapshot:
		f.packed, err = s.adoptSnapshotStream(model, number, mf.Snapshot, mf.PackedSize, mf.Size)
	default:
		f.buf, err = s.arena.adoptBuffer(mf.Image, mf.Path, mf.Size)
	}
	if err != nil {
		return nil, fmt.Errorf("file %s: %w", mf.Path, err)
	}
	fail := func(err error) (*File, error) {
		f.packed.close()
		if f.buf != nil {
			f.buf.Close()
		}
		return nil, err
	}
	if !byID && f.buf != nil {
		if _, err := checkImage(context.Background(), f.buf.Bytes(), want, "the manifest"); err != nil {
			return fail(fmt.Errorf("pushed file %s: %w", mf.Path, err))
		}
	}
	if mf.SourceID != nil {
		f.srcID = fileID{dev: mf.SourceID.Dev, ino: mf.SourceID.Ino, size: mf.SourceID.Size}
		f.srcID.mtime.Sec, f.srcID.mtime.Nsec = mf.SourceID.MtimeNs/1e9, mf.SourceID.MtimeNs%1e9
		f.hasSrcID = true
	}
	if mf.XXH3 != "" {
		if f.sum, err = strconv.ParseUint(mf.XXH3, 16, 64); err == nil {
			f.knownSum = true
		}
	}
	if mf.Kind == Weights.String() {
		var h *safetensors.Header
		if f.buf != nil {
			h, err = safetensors.Parse(f.buf.Bytes())
		} else {
			h, err = f.packed.header(mf.Size)
		}
		if err != nil {
			return fail(fmt.Errorf("file %s: the header in its %s: %w", mf.Path, map[bool]string{true: "image", false: "stream"}[f.buf != nil], err))
		}
		f.kind, f.header = Weights, h
	}
	return f, nil
}

// adoptReplicas uploads an adopted version's weights files to the GPUs from
// their host images, as a load does; a failure leaves the host copy serving.
// Pinning a file (about 0.04 s/GiB) and copying the one before it (55 GB/s)
// use different resources: the next file is pinned while one is copied.
func (s *Store) adoptReplicas(v *Version) error {
	var need int64
	var weights []*File
	for _, f := range v.files {
		if f.header != nil {
			_, size := SlabLayout(f.header)
			need += slabAllocSize(size)
			weights = append(weights, f)
		}
	}
	err := checkGPUMemory(s.gpus, need, v.source)
	if err == nil {
		var stop atomic.Bool
		pinned := make(chan error, len(weights))
		go func() {
			defer close(pinned)
			for _, f := range weights {
				if stop.Load() {
					return
				}
				pinned <- f.pin(s.gpus)
			}
		}()
		for _, f := range weights {
			if err = <-pinned; err == nil {
				err = f.replicate(s.gpus)
			}
			if err != nil {
				break
			}
		}
		stop.Store(true)
		for range pinned { // the pins end before anything is freed
		}
	}
	if err != nil {
		for _, f := range v.files {
			f.freeGPU()
		}
		s.log.Error("GPU residency failed; the host copy serves", "source", v.source, "err", err)
	}
	return err
}

// insertAdopted serves adopted versions of a model (ascending numbers) with
// their numbers; current is the recorded current number (the newest adopted
// version when it was dropped).
func (s *Store) insertAdopted(name string, last, current int, adopted []*Version) []*Version {
	sort.Slice(adopted, func(i, j int) bool { return adopted[i].number < adopted[j].number })
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		for _, v := range adopted {
			v.free()
		}
		return nil
	}
	s.lastNumber[name] = max(s.lastNumber[name], last)
	if len(adopted) == 0 {
		s.mu.Unlock()
		return nil
	}
	m := s.models[name]
	if m == nil {
		m = &Model{name: name, ino: s.newIno()}
		s.models[name] = m
	}
	m.mu.Lock()
	for _, v := range adopted {
		v.model, v.store = name, s
		v.prepareBackground(nil)
		s.startBackground(v, nil)
		m.versions = append(m.versions, v)
	}
	sort.Slice(m.versions, func(i, j int) bool { return m.versions[i].number < m.versions[j].number })
	m.current = m.versions[len(m.versions)-1]
	for _, v := range m.versions {
		if v.number == current {
			m.current = v
		}
	}
	m.mu.Unlock()
	s.changed(name)
	onCurrent, _ := s.hooksLocked()
	s.mu.Unlock()
	for _, h := range onCurrent {
		h(m)
	}
	return adopted
}

// deleteUnreferenced deletes the images no adopted version uses.
func (s *Store) deleteUnreferenced(kept map[string]bool) {
	names, err := s.state.imageNames()
	if err != nil {
		s.log.Error("list the images an earlier daemon left", "dir", filepath.Join(s.state.path, imagesDir), "err", err)
		return
	}
	var errs []error
	for _, n := range names {
		if kept[n] {
			continue
		}
		if err := s.state.removeImage(n); err != nil {
			errs = append(errs, err)
			continue
		}
		s.log.Info("deleted an image no adopted version uses", "image", n)
	}
	if err := errors.Join(errs...); err != nil {
		s.log.Error("delete images", "err", err)
	}
}

// Serving returns the current version of model name if it was read from the
// model folder dir (an adopted one, for instance), else nil.
func (s *Store) Serving(name, dir string) *Version {
	m := s.Model(name)
	if m == nil {
		return nil
	}
	v := m.Current()
	if v == nil {
		return nil
	}
	sf, err := resolveFolder(dir)
	if err != nil || sf.root != v.source {
		return nil
	}
	return v
}
