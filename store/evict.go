package store

import (
	"errors"
	"fmt"
	"runtime/debug"
	"slices"
	"time"
)

// TierGPUReplica names the GPU replicas in the "evicted" log's from.
const TierGPUReplica = "gpu"

// HandOut calls manifest (the file's user.weightfs.cuda) and, when it says
// there is one, records pid as a holder of the version's GPU handles, both
// under the version's lock: GPU eviction checks for holders and frees the
// replicas under the same lock, so no manifest is handed out for slabs
// being freed, and none that was is freed.
func (v *Version) HandOut(pid int, manifest func() ([]byte, bool)) ([]byte, bool) {
	if pid > 0 {
		pid = threadGroup(pid) // reads /proc: outside the lock
	}
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	b, ok := manifest()
	if !ok || pid <= 0 {
		return b, ok
	}
	if v.use.holders == nil {
		v.use.holders = map[int]bool{}
	}
	v.use.holders[pid] = true
	v.use.lastUse = time.Now()
	return b, true
}

// hasReplicas: some file of v has a GPU replica.
func (v *Version) hasReplicas() bool {
	for _, f := range v.files {
		f.mu.RLock()
		n := len(f.replicas)
		f.mu.RUnlock()
		if n > 0 {
			return true
		}
	}
	return false
}

// evictGPUOne frees the GPU replicas of the least recently used version
// that is not its model's current one and that nobody uses; false when
// there is none. The version keeps serving from its host image (or its
// compressed streams).
func (s *Store) evictGPUOne(reason string) bool {
	var cands []*Version
	for _, m := range s.Models() {
		cur := m.Current()
		for _, v := range m.Versions() {
			if v != cur && v.hasReplicas() {
				cands = append(cands, v)
			}
		}
	}
	slices.SortStableFunc(cands, func(a, b *Version) int { return a.LastUsed().Compare(b.LastUsed()) })
	for _, v := range cands {
		if m := s.Model(v.model); m != nil && m.Current() == v {
			continue // rolled back to meanwhile
		}
		freed, err := s.freeReplicas(v)
		if err != nil {
			s.log.Info("eviction skipped a version", "version", v.Name(), "from", TierGPUReplica, "err", err)
			continue
		}
		if freed == 0 {
			continue
		}
		s.moveGPU.Add(1)
		s.log.Info("evicted", "version", v.Name(), "from", TierGPUReplica, "to", TierHost,
			"bytes_freed", freed, "reason", "memory pressure: "+reason)
		return true
	}
	return false
}

// freeReplicas frees v's slabs on every GPU if nothing uses v (no open
// file, no live handle holder, no tier move, not draining, its background
// work over) and returns the slab bytes freed, all GPUs together. It
// holds v's lock throughout: an open or a handle request waits for it.
func (s *Store) freeReplicas(v *Version) (int64, error) {
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	switch {
	case v.use.freed || v.use.draining:
		return 0, errorf(ErrNotFound, "free the GPU replicas of %s: it is unloaded", v.Name())
	case v.use.moving != nil:
		return 0, errorf(ErrBusy, "free the GPU replicas of %s: it is moving between tiers", v.Name())
	case !v.unused():
		return 0, errorf(ErrBusy, "free the GPU replicas of %s: it is in use (%d open files, handle holders %v)",
			v.Name(), v.use.open, v.holdersLocked())
	case !v.backgroundDone():
		return 0, errorf(ErrBusy, "free the GPU replicas of %s: its fill, checksums or snapshot are still running", v.Name())
	}
	var freed int64
	var errs []error
	for _, f := range v.files {
		f.mu.RLock()
		for _, r := range f.replicas {
			freed += r.size
		}
		f.mu.RUnlock()
		if err := f.freeGPU(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		// The replicas are forgotten either way: a slab the driver would
		// not free is not handed out again.
		s.log.Error("free GPU replicas", "version", v.Name(), "err", err)
	}
	return freed, nil
}

// evictForGPU makes room on the GPUs for gpu bytes per GPU after reserve
// admitted them: while a device's free memory is short (checkGPUMemory) it
// frees the replicas of idle non-current versions. It reports whether it
// freed any (the caller then checks again).
func (s *Store) evictForGPU(name string, gpu int64) bool {
	if gpu <= 0 || len(s.gpus.List()) == 0 {
		return false
	}
	err := checkGPUMemory(s.gpus, gpu, name)
	if err == nil || !errors.Is(err, ErrNoMemory) {
		return false
	}
	return s.evictGPUOne(fmt.Sprintf("%s of GPU memory for %s (device memory)", HumanBytes(gpu), name))
}

// TierDropped names, in the "evicted" log's to, a version taken off the
// mount to free its compressed streams.
const TierDropped = "dropped"

// reloadCommand says how a dropped v is got back ("weightfs load NAME
// SOURCE"), or why v cannot be dropped: only a loaded version whose source
// files are all still what was read (same inode, size, mtime, ctime) can
// be re-loaded as it was. A pushed version is never dropped: its snapshot
// (if any) is loaded at a start only when it is the model's newest; it
// moves to the snapshot tier instead (snaptier.go).
func (v *Version) reloadCommand() (string, error) {
	if v.isPushed() || v.source == "" {
		return "", fmt.Errorf("drop %s: it was pushed, it has no source to re-load it from", v.Name())
	}
	for _, f := range v.files {
		if f.source == "" || !f.hasSrcID {
			return "", fmt.Errorf("drop %s: %s has no recorded source identity", v.Name(), f.path)
		}
		now, err := statID(f.source)
		if err != nil {
			return "", fmt.Errorf("drop %s: its source cannot be checked: %w", v.Name(), err)
		}
		if d := f.srcID.diff(now); d != "" {
			return "", fmt.Errorf("drop %s: its source %s changed since it was loaded: %s", v.Name(), f.source, d)
		}
	}
	return fmt.Sprintf("weightfs load %s %s", v.model, v.source), nil
}

// dropOne takes off the mount the least recently used compressed version
// that is not its model's current one, nobody uses and can be re-loaded
// from its source; false when there is none.
func (s *Store) dropOne(reason string) bool {
	var cands []*Version
	for _, m := range s.Models() {
		cur := m.Current()
		for _, v := range m.Versions() {
			if v != cur && v.Tier() == TierCompressed {
				cands = append(cands, v)
			}
		}
	}
	slices.SortStableFunc(cands, func(a, b *Version) int { return a.LastUsed().Compare(b.LastUsed()) })
	for _, v := range cands {
		reload, err := v.reloadCommand()
		if err == nil {
			err = s.drop(v, reason, reload)
		}
		if err != nil {
			s.log.Info("eviction skipped a version", "version", v.Name(), "from", TierCompressed, "err", err)
			continue
		}
		return true
	}
	return false
}

// drop unloads v if it is still compressed, not current and unused, all
// checked under the locks an unload and an open take: nothing can open it
// in between. Its streams are freed at once.
func (s *Store) drop(v *Version, reason, reload string) error {
	s.mu.Lock()
	m := s.models[v.model]
	if s.closed || m == nil {
		s.mu.Unlock()
		return errorf(ErrNotFound, "drop %s: it is unloaded", v.Name())
	}
	m.mu.Lock()
	var err error
	v.use.mu.Lock()
	switch {
	case !slices.Contains(m.versions, v) || v.use.draining || v.use.freed:
		err = errorf(ErrNotFound, "drop %s: it is unloaded", v.Name())
	case m.current == v:
		err = errorf(ErrBusy, "drop %s: it is the current version", v.Name())
	case !v.use.compressed || !v.idle():
		err = errorf(ErrBusy, "drop %s: it is in use or no longer compressed", v.Name())
	default:
		v.use.draining = true
	}
	v.use.mu.Unlock()
	if err != nil {
		m.mu.Unlock()
		s.mu.Unlock()
		return err
	}
	m.versions = slices.DeleteFunc(slices.Clone(m.versions), func(x *Version) bool { return x == v })
	m.mu.Unlock()
	s.draining = append(s.draining, v)
	_, onRemove := s.hooksLocked()
	s.mu.Unlock()
	freed := v.CompressedBytes()
	s.saveState()
	s.moveDrop.Add(1)
	s.log.Info("evicted", "version", v.Name(), "from", TierCompressed, "to", TierDropped, "bytes_freed", freed,
		"reason", "memory pressure: "+reason, "get_back", reload)
	for _, h := range onRemove {
		h(v)
	}
	s.reap(v)
	// The streams were in the daemon's heap: give the pages back now, so
	// that the system's free memory (checkSystemLocked) sees them.
	debug.FreeOSMemory()
	return nil
}
