package store

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/store/codec"
	"github.com/weightfs/weightfs/store/safetensors"
)

// LoadSnapshots serves, for each model folder of the snapshot directory, its
// newest snapshot when that is newer than every version the store holds of
// the model (adopted ones): decoded in parallel into new host images, each
// file checked against its XXH3, its headers parsed and its GPU replicas
// uploaded, it is served under its number, as the model's current version,
// and numbering continues after it. A snapshot that cannot be loaded is
// logged ("snapshot dropped") and the next older one is tried. Models in
// skip (given with --model) are not loaded from snapshots. Unfinished
// snapshots (.tmp-*) are deleted. Call it before the store serves.
func (s *Store) LoadSnapshots(ctx context.Context, skip map[string]bool) []*Version {
	if s.snap == nil {
		return nil
	}
	// No snapshot is written meanwhile (an adopted pushed version's): the
	// unfinished ones deleted below are an earlier daemon's.
	select {
	case s.snapSem <- struct{}{}:
	case <-ctx.Done():
		return nil
	}
	defer func() { <-s.snapSem }()
	defer s.saveState()
	names, err := listDir(s.snap.dirFD, s.snap.path)
	if err != nil {
		s.log.Error("snapshots not loaded", "err", err)
		return nil
	}
	sort.Strings(names)
	var out []*Version
	for _, name := range names {
		if err := ctx.Err(); err != nil {
			return out
		}
		if err := ValidateModelName(name); err != nil {
			s.log.Warn("snapshot folder ignored", "dir", filepath.Join(s.snap.path, name), "reason", err.Error())
			continue
		}
		if v := s.loadModelSnapshot(ctx, name, skip[name]); v != nil {
			out = append(out, v)
		}
	}
	return out
}

// loadModelSnapshot loads the newest usable snapshot of one model folder.
func (s *Store) loadModelSnapshot(ctx context.Context, name string, skip bool) *Version {
	fd, err := s.snap.modelDir(name, false)
	if err != nil {
		s.log.Warn("snapshot folder ignored", "model", name, "reason", err.Error())
		return nil
	}
	defer unix.Close(fd)
	modelPath := filepath.Join(s.snap.path, name)
	entries, err := listDir(fd, modelPath)
	if err != nil {
		s.log.Warn("snapshot folder ignored", "model", name, "reason", err.Error())
		return nil
	}
	for _, e := range entries {
		if strings.HasPrefix(e, snapshotTmp) {
			if err := removeTree(fd, e, filepath.Join(modelPath, e)); err != nil {
				s.log.Error("delete an unfinished snapshot", "err", err)
			} else {
				s.log.Info("deleted an unfinished snapshot", "dir", filepath.Join(modelPath, e))
			}
		}
	}
	nums := versionNumbers(entries)
	if len(nums) == 0 {
		return nil
	}
	s.mu.Lock() // numbers are never reused, loaded or not
	s.lastNumber[name] = max(s.lastNumber[name], nums[0])
	s.mu.Unlock()
	if skip {
		s.log.Info("snapshot not loaded: --model gives this model's folder", "model", name, "newest", nums[0])
		return nil
	}
	held := 0
	if m := s.Model(name); m != nil {
		for _, v := range m.Versions() {
			held = max(held, v.number)
		}
	}
	for _, n := range nums {
		if n <= held {
			s.log.Info("snapshot not loaded: a newer or equal version was adopted", "version", fmt.Sprintf("%s@%d", name, n),
				"adopted", fmt.Sprintf("%s@%d", name, held))
			return nil
		}
		start := time.Now()
		v, err := s.loadSnapshot(ctx, fd, name, n)
		if err != nil {
			s.log.Warn("snapshot dropped", "version", fmt.Sprintf("%s@%d", name, n), "dir", filepath.Join(modelPath, strconv.Itoa(n)),
				"reason", err.Error())
			continue
		}
		if got := s.insertAdopted(name, n, n, []*Version{v}); len(got) == 0 {
			return nil // the store closed
		}
		s.log.Info("loaded from snapshot", "version", v.Name(), "files", len(v.files), "bytes", v.bytes,
			"seconds", time.Since(start).Seconds(), "source", v.source)
		return v
	}
	return nil
}

// loadSnapshot reads DIR/NAME/N into a new version (not yet served).
func (s *Store) loadSnapshot(ctx context.Context, modelFD int, name string, n int) (_ *Version, err error) {
	dir := filepath.Join(s.snap.path, name, strconv.Itoa(n))
	fd, err := openDirBeneath(modelFD, strconv.Itoa(n))
	if err != nil {
		return nil, fmt.Errorf("open %s (a symlink is refused): %w", dir, err)
	}
	defer unix.Close(fd)
	sv, err := readSnapshotVersion(fd, dir, name, n)
	if err != nil {
		return nil, err
	}
	v := &Version{source: sv.Source, number: n, loadedAt: sv.LoadedAt}
	c := codec.New(codec.Options{NoZstd: true})
	defer c.Close()
	seen := map[string]bool{}
	for _, sf := range sv.Files {
		if err := checkListedPath(snapshotManifest, sf.Path, seen); err != nil {
			return nil, err
		}
	}
	start := time.Now()
	err = s.listedVersion(ctx, v, sv.Dirs, len(sv.Files), func(i int) (*File, error) {
		return s.loadSnapshotFile(ctx, c, fd, dir, sv.Files[i])
	})
	if err != nil {
		return nil, err
	}
	v.loadTime = time.Since(start) // as a load's: the GPU copies included
	return v, nil
}

// readSnapshotVersion reads the version.json of the snapshot folder fd
// (dir), which must be version n of model name.
func readSnapshotVersion(fd int, dir, name string, n int) (snapshotVersion, error) {
	var sv snapshotVersion
	js, err := readFileAt(fd, snapshotManifest, filepath.Join(dir, snapshotManifest), maxSnapshotManifest)
	if err != nil {
		return sv, err
	}
	if err := json.Unmarshal(js, &sv); err != nil {
		return sv, fmt.Errorf("%s: %w", filepath.Join(dir, snapshotManifest), err)
	}
	switch {
	case sv.Format != snapshotFormat:
		return sv, fmt.Errorf("%s: format %d, want %d", filepath.Join(dir, snapshotManifest), sv.Format, snapshotFormat)
	case sv.Model != name || sv.Number != n:
		return sv, fmt.Errorf("%s names %s@%d, not %s@%d", filepath.Join(dir, snapshotManifest), sv.Model, sv.Number, name, n)
	}
	return sv, nil
}

// check refuses a file entry of version.json that cannot be one of a
// snapshot, and returns its XXH3.
func (sf snapshotFile) check() (uint64, error) {
	switch {
	case sf.Data == "" || strings.ContainsAny(sf.Data, "/\x00") || strings.HasPrefix(sf.Data, "."):
		return 0, fmt.Errorf("file %s: data file name %q in %s is not a plain file name", sf.Path, sf.Data, snapshotManifest)
	case sf.Size < 0 || sf.EncodedSize < 0:
		return 0, fmt.Errorf("file %s: size %d, encoded size %d in %s", sf.Path, sf.Size, sf.EncodedSize, snapshotManifest)
	case sf.Kind != Plain.String() && sf.Kind != Weights.String():
		return 0, fmt.Errorf("file %s: kind %q in %s", sf.Path, sf.Kind, snapshotManifest)
	case sf.Encoding != encodingRaw && sf.Encoding != encodingCodec:
		return 0, fmt.Errorf("file %s: encoding %q in %s", sf.Path, sf.Encoding, snapshotManifest)
	}
	want, err := strconv.ParseUint(sf.XXH3, 16, 64)
	if err != nil {
		return 0, fmt.Errorf("file %s: checksum %q in %s: %w", sf.Path, sf.XXH3, snapshotManifest, err)
	}
	if sf.Encoding == encodingRaw && sf.EncodedSize != sf.Size {
		return 0, fmt.Errorf("file %s: raw, but its size %d and encoded size %d in %s differ", sf.Path, sf.Size, sf.EncodedSize, snapshotManifest)
	}
	return want, nil
}

// loadSnapshotFile decodes one file of a snapshot into a new host image and
// checks it.
func (s *Store) loadSnapshotFile(ctx context.Context, c *codec.Codec, dirFD int, dir string, sf snapshotFile) (*File, error) {
	want, err := sf.check()
	if err != nil {
		return nil, err
	}
	display := filepath.Join(dir, sf.Data)
	buf, err := s.arena.NewBuffer(sf.Path, sf.Size)
	if err != nil {
		return nil, fmt.Errorf("file %s: %w", sf.Path, err)
	}
	f := &File{name: path.Base(sf.Path), path: sf.Path, kind: Plain, buf: buf, attrs: sf.manifestAttrs.attrs(0o444)}
	fail := func(err error) (*File, error) {
		buf.Close()
		return nil, fmt.Errorf("file %s: %w", sf.Path, err)
	}
	var decode func(io.Reader) error
	if sf.Encoding == encodingCodec {
		// Blocks are decoded as they are read, on every core.
		decode = func(r io.Reader) error {
			if err := c.DecodeReader(ctx, buf.Bytes(), r, sf.EncodedSize, runtime.GOMAXPROCS(0)); err != nil {
				return fmt.Errorf("decode %s: %w", display, err)
			}
			return nil
		}
	}
	if err := readFileInto(dirFD, sf.Data, display, buf.Bytes(), sf.EncodedSize, decode); err != nil {
		return fail(err)
	}
	sum, err := checkImage(ctx, buf.Bytes(), want, snapshotManifest)
	if err != nil {
		return fail(err)
	}
	f.sum, f.knownSum = sum, true
	if sf.Kind == Weights.String() {
		h, err := safetensors.Parse(buf.Bytes())
		if err != nil {
			return fail(fmt.Errorf("its header: %w", err))
		}
		f.kind, f.header = Weights, h
	}
	return f, nil
}
