package store

import (
	"errors"
	"fmt"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/store/codec"
)

// The snapshot tier (docs/ARCHITECTURE.md, "Tiers"): a compressed pushed
// version whose snapshot is on disk gives up its weights files' streams in
// memory for the same streams in the snapshot's data files (both are
// EncodeSafetensors of the file with the codec's defaults), read from the
// disk, through the page cache, when it is restored. Its other files (raw
// in the snapshot, and small) keep their streams in memory.

// snapshotDone: v's snapshot was written (or was already there).
func (v *Version) snapshotDone() bool {
	if v.snapped == nil {
		return false
	}
	select {
	case <-v.snapped:
		return v.snapErr == nil
	default:
		return false
	}
}

// snapshotOne moves the least recently used compressed pushed version whose
// snapshot is on disk to the snapshot tier; false when there is none.
func (s *Store) snapshotOne(reason string) bool {
	if s.snap == nil {
		return false
	}
	var cands []*Version
	for _, m := range s.Models() {
		for _, v := range m.Versions() {
			if v.isPushed() && v.Tier() == TierCompressed && v.snapshotDone() {
				cands = append(cands, v)
			}
		}
	}
	slices.SortStableFunc(cands, func(a, b *Version) int { return a.LastUsed().Compare(b.LastUsed()) })
	for _, v := range cands {
		freed, dir, err := s.toSnapshot(v)
		if err == nil && freed == 0 {
			err = errors.New("it has no stream in memory that its snapshot holds")
		}
		if err != nil {
			s.log.Info("eviction skipped a version", "version", v.Name(), "from", TierCompressed, "to", TierSnapshot, "err", err)
			continue
		}
		s.moveSnapshot.Add(1)
		s.log.Info("evicted", "version", v.Name(), "from", TierCompressed, "to", TierSnapshot, "bytes_freed", freed,
			"reason", "memory pressure: "+reason, "snapshot", dir)
		return true
	}
	return false
}

// toSnapshot swaps v's weights files' streams for its snapshot's if v is
// still compressed and nothing uses it, and returns the memory freed and
// the snapshot's folder.
func (s *Store) toSnapshot(v *Version) (int64, string, error) {
	streams, dir, err := s.snapshotStreams(v)
	defer func() {
		for _, p := range streams { // those not swapped in
			p.close()
		}
	}()
	if err != nil {
		return 0, dir, err
	}
	var old []*packedStream
	v.use.mu.Lock()
	switch {
	case v.use.freed || v.use.draining:
		err = errorf(ErrNotFound, "%s is unloaded", v.Name())
	case !v.use.compressed || !v.idle():
		err = errorf(ErrBusy, "%s is in use or no longer compressed", v.Name())
	default:
		// A restore sets moving first and reads the streams after: none
		// runs now, and none starts before the lock is released.
		for _, f := range v.files {
			p := streams[f.path]
			if p == nil {
				continue
			}
			delete(streams, f.path)
			f.tmu.Lock()
			if f.packed.resident() {
				old = append(old, f.packed)
				f.packed = p
			} else {
				streams[f.path] = p // already there: closed below
			}
			f.tmu.Unlock()
		}
	}
	v.use.mu.Unlock()
	if err != nil {
		return 0, dir, err
	}
	s.saveState()
	var freed int64
	var errs []error
	for _, p := range old {
		freed += p.Size()
		errs = append(errs, p.close())
	}
	if err := errors.Join(errs...); err != nil {
		s.log.Error("free compressed streams", "version", v.Name(), "err", err)
	}
	// Streams on the heap give their pages back now, so that the system's
	// free memory (checkSystemLocked) sees them.
	debug.FreeOSMemory()
	return freed, dir, nil
}

// snapshotStreams opens, for the snapshot tier, the data files of v's
// snapshot that hold its weights files' codec streams, once version.json
// says they are v's files: the same paths, sizes and XXH3s. It returns them
// by path, and the snapshot's folder.
func (s *Store) snapshotStreams(v *Version) (_ map[string]*packedStream, dir string, err error) {
	n := strconv.Itoa(v.number)
	dir = filepath.Join(s.snap.path, v.model, n)
	modelFD, err := s.snap.modelDir(v.model, false)
	if err != nil {
		return nil, dir, err
	}
	defer unix.Close(modelFD)
	fd, err := openDirBeneath(modelFD, n)
	if err != nil {
		return nil, dir, fmt.Errorf("open %s (a symlink is refused): %w", dir, err)
	}
	defer unix.Close(fd)
	sv, err := readSnapshotVersion(fd, dir, v.model, v.number)
	if err != nil {
		return nil, dir, err
	}
	listed := map[string]snapshotFile{}
	for _, sf := range sv.Files {
		listed[sf.Path] = sf
	}
	out := map[string]*packedStream{}
	defer func() {
		if err != nil {
			for _, p := range out {
				p.close()
			}
			out = nil
		}
	}()
	for _, f := range v.files {
		sf, ok := listed[f.path]
		if !ok {
			return nil, dir, fmt.Errorf("%s does not list %s", filepath.Join(dir, snapshotManifest), f.path)
		}
		want, err := sf.check()
		if err != nil {
			return nil, dir, err
		}
		if sum, ok := f.Checksum(); !ok || sum != want || sf.Size != f.Size() {
			return nil, dir, fmt.Errorf("%s in %s: %d bytes of XXH3 %s, the version's is %d bytes of XXH3 %s", f.path,
				dir, sf.Size, sf.XXH3, f.Size(), FormatChecksum(sum))
		}
		if f.kind != Weights || sf.Encoding != encodingCodec {
			continue // kept in memory
		}
		p, err := openSnapshotPacked(fd, sf.Data, filepath.Join(dir, sf.Data), sf.EncodedSize)
		if err != nil {
			return nil, dir, err
		}
		out[f.path] = p
	}
	return out, dir, nil
}

// adoptSnapshotStream opens, for a version adopted in the snapshot tier,
// the data file name of its snapshot (model's version number) holding a
// stream of size bytes, and checks that its header says raw bytes.
func (s *Store) adoptSnapshotStream(model string, number int, name string, size, raw int64) (*packedStream, error) {
	if s.snap == nil {
		return nil, fmt.Errorf("its stream is in a snapshot, and there is no --snapshot-dir")
	}
	n := strconv.Itoa(number)
	dir := filepath.Join(s.snap.path, model, n)
	modelFD, err := s.snap.modelDir(model, false)
	if err != nil {
		return nil, err
	}
	defer unix.Close(modelFD)
	fd, err := openDirBeneath(modelFD, n)
	if err != nil {
		return nil, fmt.Errorf("open %s (a symlink is refused): %w", dir, err)
	}
	defer unix.Close(fd)
	display := filepath.Join(dir, name)
	p, err := openSnapshotPacked(fd, name, display, size)
	if err != nil {
		return nil, err
	}
	if got, err := codec.RawSizeAt(p.file, size); err != nil || got != raw {
		p.close()
		return nil, fmt.Errorf("%s decodes to %d bytes, the manifest says %d (%v)", display, got, raw, err)
	}
	return p, nil
}
