package store

import (
	"errors"
	"fmt"
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
