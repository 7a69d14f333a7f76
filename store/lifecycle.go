package store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/weightfs/weightfs/cuda"
)

// Version states.
const (
	StateReady    = "ready"    // listed on the mount, serving
	StateDraining = "draining" // unloaded: gone from the mount, freed when its last user goes
)

// versionUse counts what keeps an unloaded version's memory alive: open
// files, and processes that were handed its GPU handles.
type versionUse struct {
	mu       sync.Mutex
	open     int
	holders  map[int]bool // pids that received CUDA handles
	draining bool
	freed    bool
	// The tier (tier.go): compressed, a move in progress (moving, closed
	// when it ends, moveErr its failure) and the last use, for eviction.
	compressed bool
	moving     chan struct{}
	moveErr    error
	lastUse    time.Time
}

// Acquire records an open file of the version. It fails once the version has
// been freed (a stale dentry after an unload).
func (v *Version) Acquire() bool {
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	if v.use.freed {
		return false
	}
	v.use.open++
	v.use.lastUse = time.Now()
	return true
}

// Release ends what Acquire started; the last release of a draining version
// frees it.
func (v *Version) Release() {
	v.use.mu.Lock()
	v.use.open--
	v.use.lastUse = time.Now()
	done := v.use.draining && v.use.open == 0
	v.use.mu.Unlock()
	if done && v.store != nil {
		v.store.reap(v)
	}
}

// NoteHandleHolder records a process that was handed the version's CUDA
// handles: its mapping keeps the slabs in use after an unload, so the version
// drains until that process exits.
func (v *Version) NoteHandleHolder(pid int) {
	if pid <= 0 {
		return
	}
	pid = threadGroup(pid)
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	if v.use.holders == nil {
		v.use.holders = map[int]bool{}
	}
	v.use.holders[pid] = true
	v.use.lastUse = time.Now()
}

// ReleaseHandles forgets pid (its thread group) as a holder of the
// version's GPU handles: the process says it closed its mappings of the
// slabs (docs/PROTOCOL.md §3.1). A version that left the mount is freed
// when that was its last use.
func (v *Version) ReleaseHandles(pid int) {
	if pid <= 0 {
		return
	}
	pid = threadGroup(pid)
	v.use.mu.Lock()
	delete(v.use.holders, pid)
	done := v.use.draining && v.idle()
	v.use.mu.Unlock()
	if done && v.store != nil {
		v.store.reap(v)
	}
}

// OpenFiles is the number of files of the version open now.
func (v *Version) OpenFiles() int {
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	return v.use.open
}

// HandleHolders are the live processes that were handed GPU handles. Reading
// them forgets nothing: the reaper (Store.Run) does.
func (v *Version) HandleHolders() []int {
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	var pids []int
	for pid := range v.use.holders {
		if processAlive(pid) {
			pids = append(pids, pid)
		}
	}
	sort.Ints(pids)
	return pids
}

// State is StateReady or StateDraining.
func (v *Version) State() string {
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	if v.use.draining {
		return StateDraining
	}
	return StateReady
}

// GPUBytes is the version's slab memory on one GPU.
func (v *Version) GPUBytes(uuid string) int64 {
	var n int64
	for _, f := range v.files {
		f.mu.RLock()
		for _, r := range f.replicas {
			if r.gpu.UUID() == uuid {
				n += r.size
			}
		}
		f.mu.RUnlock()
	}
	return n
}

// Residency lists where the version is: "host" and each GPU holding all of
// its weights files.
func (v *Version) Residency() []string {
	for _, f := range v.files {
		if f.kind == Weights {
			return f.Residency()
		}
	}
	return []string{"host"}
}

// threadGroup maps a thread id (FUSE requests carry the calling thread's) to
// its process id: the mapping lives as long as the process, not the thread.
func threadGroup(tid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", tid))
	if err != nil {
		return tid
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Tgid:"); ok {
			if pid, err := strconv.Atoi(strings.TrimSpace(rest)); err == nil && pid > 0 {
				return pid
			}
		}
	}
	return tid
}

func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// idle says whether nothing uses the version any more (a tier move in
// progress uses it).
func (v *Version) idle() bool {
	return v.use.moving == nil && v.unused()
}

// unused: no file of the version is open and no live process holds its
// GPU handles (dead holders are forgotten).
func (v *Version) unused() bool {
	if v.use.open > 0 {
		return false
	}
	for pid := range v.use.holders {
		if processAlive(pid) {
			return false
		}
		delete(v.use.holders, pid)
	}
	return true
}

// Unload removes a version (number > 0) or every version (number 0) of a
// model from the mount at once. Each one's memory is freed as soon as no file
// of it is open and no process that was handed its GPU handles is alive; until
// then it is listed as draining. If the current version goes, the newest
// remaining one becomes current. An unknown model or version is ErrNotFound.
func (s *Store) Unload(name string, number int) ([]*Version, error) {
	if err := checkVersionRequest("unload", name, number); err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, errorf(ErrBusy, "unload %s: the store is closed", name)
	}
	m := s.models[name]
	if m == nil {
		s.mu.Unlock()
		return nil, errorf(ErrNotFound, "unload %s: no such model", name)
	}
	m.mu.Lock()
	var gone, kept []*Version
	for _, v := range m.versions {
		if number == 0 || v.number == number {
			gone = append(gone, v)
		} else {
			kept = append(kept, v)
		}
	}
	if len(gone) == 0 {
		m.mu.Unlock()
		s.mu.Unlock()
		return nil, errorf(ErrNotFound, "unload %s: no version %d (versions: %s)", name, number, versionList(m.versions))
	}
	m.versions = kept
	old := m.current
	if len(kept) == 0 {
		m.current = nil
	} else if slices.Contains(gone, m.current) {
		m.current = kept[len(kept)-1]
	}
	moved := m.current != old
	m.mu.Unlock()
	if moved {
		s.changed(name)
	}
	if len(kept) == 0 {
		delete(s.models, name)
	}
	s.drainLocked(gone)
	onCurrent, onRemove := s.hooksLocked()
	s.mu.Unlock()
	if moved {
		for _, h := range onCurrent {
			h(m)
		}
	}
	s.saveState()
	s.removed(gone, onRemove, "")
	return gone, nil
}

// drainLocked marks versions taken off the mount as draining until freed.
// s.mu is held.
func (s *Store) drainLocked(gone []*Version) {
	for _, v := range gone {
		v.use.mu.Lock()
		v.use.draining = true
		v.use.mu.Unlock()
		s.draining = append(s.draining, v)
	}
}

// hooksLocked copies the hooks to call once s.mu is released.
func (s *Store) hooksLocked() (onCurrent []func(*Model), onRemove []func(*Version)) {
	return slices.Clone(s.onCurrent), slices.Clone(s.onRemove)
}

// removed logs versions taken off the mount (why: "" for an unload, else the
// rule that dropped them), tells the hooks and frees those nothing uses.
func (s *Store) removed(gone []*Version, hooks []func(*Version), why string) {
	if len(gone) == 0 {
		return // reap() of nothing would reap every draining version
	}
	s.announce(gone, hooks, why)
	s.reap(gone...)
}

// announce logs the versions that left the mount and tells the hooks.
func (s *Store) announce(gone []*Version, hooks []func(*Version), why string) {
	for _, v := range gone {
		if why == "" {
			s.log.Info("unloaded", "version", v.Name(), "open_files", v.OpenFiles())
		} else {
			s.log.Info("dropped an old version", "version", v.Name(), "open_files", v.OpenFiles(), "reason", why)
		}
		for _, h := range hooks {
			h(v)
		}
	}
}

// Rollback makes version to (0: the newest one older than the current one)
// of a model its current version: the NAME symlink points to it at once. The
// versions stay as they are, and the next commit becomes current with the
// next number as usual. An unknown model or version is ErrNotFound; to 0 with
// no version older than the current one is ErrInvalid.
func (s *Store) Rollback(name string, to int) (*Version, error) {
	if err := checkVersionRequest("rollback", name, to); err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, errorf(ErrBusy, "rollback %s: the store is closed", name)
	}
	m := s.models[name]
	if m == nil {
		s.mu.Unlock()
		return nil, errorf(ErrNotFound, "rollback %s: no such model", name)
	}
	m.mu.Lock()
	from := m.current
	var target *Version
	for _, v := range m.versions {
		if (to > 0 && v.number == to) || (to == 0 && v.number < from.number) {
			target = v
		}
	}
	list := versionList(m.versions)
	if target != nil {
		m.current = target
	}
	m.mu.Unlock()
	if target != nil && target != from {
		s.changed(name) // under s.mu, as Watch needs
	}
	hooks := slices.Clone(s.onCurrent)
	s.mu.Unlock()
	if target != nil && target != from {
		s.saveState()
	}
	switch {
	case target == nil && to > 0:
		return nil, errorf(ErrNotFound, "rollback %s: no version %d (versions: %s)", name, to, list)
	case target == nil:
		return nil, errorf(ErrInvalid, "rollback %s: no version older than the current %s to roll back to (versions: %s)",
			name, from.Name(), list)
	case target != from:
		s.log.Info("rolled back", "model", name, "from", from.Name(), "to", target.Name())
		for _, h := range hooks {
			h(m)
		}
	}
	return target, nil
}

// checkVersionRequest checks the name and number of an unload or a verify.
func checkVersionRequest(what, name string, number int) error {
	if err := ValidateModelName(name); err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if number < 0 {
		return errorf(ErrInvalid, "%s %s: version %d: want 0 or a version number", what, name, number)
	}
	return nil
}

func versionList(vs []*Version) string {
	if len(vs) == 0 {
		return "none"
	}
	out := ""
	for i, v := range vs {
		if i > 0 {
			out += ", "
		}
		out += fmt.Sprint(v.number)
	}
	return out
}

// OnRemove registers f to be told of every version that leaves the mount (the
// file system drops it from the kernel's caches).
func (s *Store) OnRemove(f func(*Version)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onRemove = append(s.onRemove, f)
}

// OnCurrent registers f to be told of every change of a model's current
// version (the file system drops the NAME symlink from the kernel's caches).
func (s *Store) OnCurrent(f func(*Model)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onCurrent = append(s.onCurrent, f)
}

// Draining lists unloaded versions whose memory is not freed yet: still in
// use, or whose last handle holder exited and the reaper has not run since.
// It frees nothing.
func (s *Store) Draining() []*Version {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return append([]*Version(nil), s.draining...)
}

// reap frees the draining versions among only (every draining version when
// only is empty) that nothing uses any more. It runs on the events that end a
// use: an unload, the last release of a draining version, the reaper's tick.
func (s *Store) reap(only ...*Version) {
	s.mu.Lock()
	var free, keep []*Version
	for _, v := range s.draining {
		v.use.mu.Lock()
		if (len(only) == 0 || slices.Contains(only, v)) && v.idle() {
			v.use.freed = true
			free = append(free, v)
		} else {
			keep = append(keep, v)
		}
		v.use.mu.Unlock()
	}
	s.draining = keep
	s.mu.Unlock()
	for _, v := range free {
		if err := v.free(); err != nil {
			s.log.Error("free unloaded version", "version", v.Name(), "err", err)
		} else {
			s.log.Info("freed", "version", v.Name(), "bytes", v.bytes)
		}
	}
}

// Run re-checks draining versions held by processes until ctx ends: their
// exit is noticed nowhere else (reads such as Usage and Draining free nothing).
func (s *Store) Run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.reap()
		case <-s.saveCh:
			s.saveState() // checksums became known (background.go)
		}
	}
}

// Budgets limit what the store may hold; 0 means no limit.
type Budgets struct {
	// Host is the most bytes of host memory that host images may take,
	// draining versions included (each file counts its size rounded up to
	// the pages it is kept in).
	Host int64
	// GPU is the most bytes of slabs on each GPU.
	GPU int64
}

// Usage is what the store holds now against its budgets. HostBytes is the
// host memory the images take (whole pages, what Shmem in /proc/meminfo
// counts), not the sum of the files' sizes.
type Usage struct {
	HostBytes, HostReserved, HostBudget int64
	GPUs                                []GPUUsage
}

// GPUUsage is one GPU's share.
type GPUUsage struct {
	UUID, Name              string
	Ordinal                 int
	Bytes, Reserved         int64
	Budget                  int64
	DeviceFree, DeviceTotal uint64
}

// Usage sums up memory in use (ready and draining versions) and reserved by
// loads in progress. It frees nothing.
func (s *Store) Usage() Usage {
	s.mu.RLock()
	defer s.mu.RUnlock()
	host, perGPU := s.residentLocked()
	u := Usage{HostBytes: host, HostReserved: s.reserved.host, HostBudget: s.budgets.Host}
	for _, g := range s.gpus.List() {
		gu := GPUUsage{UUID: g.UUID(), Name: g.dev.Name, Ordinal: g.dev.Ordinal, Bytes: perGPU[g.UUID()],
			Reserved: s.reserved.gpu, Budget: s.budgets.GPU}
		gu.DeviceFree, gu.DeviceTotal, _ = g.MemInfo()
		u.GPUs = append(u.GPUs, gu)
	}
	return u
}

// residentLocked sums host memory and each GPU's slab bytes over ready and
// draining versions.
func (s *Store) residentLocked() (host int64, perGPU map[string]int64) {
	perGPU = map[string]int64{}
	for _, v := range s.allVersionsLocked() {
		host += v.HostBytes()
		for _, g := range s.gpus.List() {
			perGPU[g.UUID()] += v.GPUBytes(g.UUID())
		}
	}
	return host, perGPU
}

func (s *Store) allVersionsLocked() []*Version {
	var out []*Version
	for _, m := range s.models {
		out = append(out, m.Versions()...)
	}
	return append(out, s.draining...)
}

// reservation is memory promised to a load in progress.
type reservation struct{ host, gpu int64 }

// reserve admits a load of host bytes of host memory (and gpu bytes on every
// GPU) or says, in a *BudgetError, what is needed and what is free: against
// the budgets, then against what the machine and the daemon's memory cgroup
// can still give (checkSystemLocked). Nothing already loaded is touched.
func (s *Store) reserve(name, dir string, host, gpu int64) (release func(), err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, errorf(ErrBusy, "load %s: the store is closed", name)
	}
	usedHost, usedGPU := s.residentLocked()
	if b := s.budgets.Host; b > 0 && usedHost+s.reserved.host+host > b {
		return nil, &BudgetError{Model: name, Source: dir, Tier: TierHost,
			Need: host, Free: max(0, b-usedHost-s.reserved.host), Budget: b}
	}
	if b := s.budgets.GPU; b > 0 && gpu > 0 {
		for _, g := range s.gpus.List() {
			if used := usedGPU[g.UUID()] + s.reserved.gpu; used+gpu > b {
				return nil, &BudgetError{Model: name, Source: dir, Tier: TierGPU, GPU: g.UUID(),
					Need: gpu, Free: max(0, b-used), Budget: b}
			}
		}
	}
	if err := s.checkSystemLocked(name, dir, host, usedHost); err != nil {
		return nil, err
	}
	s.reserved.host += host
	s.reserved.gpu += gpu
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.reserved.host -= host
			s.reserved.gpu -= gpu
			s.mu.Unlock()
		})
	}, nil
}

// checkSystemLocked admits a load of need bytes of host memory only if the
// machine (MemAvailable) and the tightest memory cgroup (its limit less its
// working set) can both still give it and keep their reserve free. Memory
// promised to loads in progress but not allocated yet is not in those
// readings, so it counts as taken. usedHost is what committed versions hold.
func (s *Store) checkSystemLocked(name, dir string, need, usedHost int64) error {
	if need <= 0 {
		return nil
	}
	m, err := s.sysmem()
	if err != nil {
		s.log.Warn("cannot read the system's free memory; the load is admitted by the budgets alone", "err", err)
		return nil
	}
	// Loads in progress have allocated (Arena.Allocated less what committed
	// versions hold) part of what they reserved; the rest is still to come.
	pending := max(0, s.reserved.host-max(0, s.arena.Allocated()-usedHost))
	// The machine, then the cgroup; the one that can give less is named.
	tightest := &BudgetError{Model: name, Source: dir, Tier: TierSystem, Need: need, Budget: m.Total,
		Reserve: s.memReserve(m.Total)}
	tightest.Free = m.Available - pending - tightest.Reserve
	if m.Cgroup != "" {
		reserve := s.memReserve(m.CgroupLimit)
		if free := m.CgroupLimit - m.CgroupUsed - pending - reserve; free < tightest.Free {
			tightest.Free, tightest.Budget, tightest.Reserve, tightest.Cgroup = free, m.CgroupLimit, reserve, m.Cgroup
		}
	}
	if need <= tightest.Free {
		return nil
	}
	tightest.Free = max(0, tightest.Free)
	return tightest
}

// HumanBytes writes n in binary units: "1.5 GiB".
func HumanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// Load is a load in progress.
type Load struct {
	Name, Source string
	Started      time.Time
	done, total  atomic.Int64
	cancel       context.CancelCauseFunc
}

// Progress is the bytes copied so far and the total.
func (l *Load) Progress() (done, total int64) { return l.done.Load(), l.total.Load() }

// Loads lists the loads in progress.
func (s *Store) Loads() []*Load {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*Load, 0, len(s.loads))
	for l := range s.loads {
		out = append(out, l)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Started.Before(out[j].Started) })
	return out
}

// FileCheck is the outcome of verifying one file.
type FileCheck struct {
	Path, Source string // Source "": pushed, no file on disk
	Bytes        int64
	SHA256       string // of the bytes served
	SourceSHA256 string // of the source now ("" when it could not be read, or there is none)
	// XXH3 is the file's checksum recorded after it was loaded or pushed
	// (16 lowercase hex digits, user.weightfs.xxh3; "" when there is
	// none); ServedXXH3 that of the bytes served now. They differ if the
	// host image changed since.
	XXH3, ServedXXH3 string
	// GPUs are the checks of the file's slabs against the bytes served
	// (weights files on GPUs only).
	GPUs    []SlabCheck
	OK      bool
	Problem string // the first problem found; "" when OK
}

// SlabCheck is the outcome of comparing one GPU's slab of a weights file
// with its host image, tensor by tensor.
type SlabCheck struct {
	GPU     string // the GPU's UUID
	OK      bool
	Problem string
}

// Verify checks every file of a version (0: the current one): it waits for
// the host image and the recorded checksum, then compares the XXH3-64 of the
// bytes served with the recorded one, each GPU slab's tensors with the
// bytes served, and, for a file loaded from disk, the SHA-256 of its source
// now with the bytes served. An unknown model or version is ErrNotFound; a
// file that differs is not an error but a check that is not OK.
func (s *Store) Verify(ctx context.Context, name string, number int) (*Version, []FileCheck, error) {
	if err := checkVersionRequest("verify", name, number); err != nil {
		return nil, nil, err
	}
	if err := s.checkOpen("verify " + name); err != nil {
		return nil, nil, err
	}
	m := s.Model(name)
	if m == nil {
		return nil, nil, errorf(ErrNotFound, "verify %s: no such model", name)
	}
	v := m.Current()
	if number > 0 {
		v = m.Version(number)
	}
	if v == nil || !v.Acquire() {
		return nil, nil, errorf(ErrNotFound, "verify %s: no version %d (versions: %s)", name, number, versionList(m.Versions()))
	}
	defer v.Release()
	if err := v.EnsureHost(ctx); err != nil {
		return nil, nil, fmt.Errorf("verify %s: %w", v.Name(), err)
	}
	var checks []FileCheck
	for _, f := range v.files {
		c, err := f.verify(ctx)
		if err != nil {
			return nil, nil, fmt.Errorf("verify %s: %w", v.Name(), err)
		}
		checks = append(checks, c)
	}
	return v, checks, nil
}

// verify checks one file; only ctx's end is an error.
func (f *File) verify(ctx context.Context) (FileCheck, error) {
	c := FileCheck{Path: f.path, Source: f.source, Bytes: f.Size()}
	if err := f.WaitReady(ctx); err != nil {
		if ctx.Err() != nil {
			return c, err
		}
		c.Problem = err.Error()
		return c, nil
	}
	recorded, err := f.WaitChecksum(ctx)
	if ctx.Err() != nil {
		return c, ctx.Err()
	}
	var problems []string
	if err != nil {
		problems = append(problems, err.Error())
	} else {
		c.XXH3 = FormatChecksum(recorded)
	}
	served, err := hashImage(ctx, f.Bytes())
	if err != nil {
		return c, err
	}
	c.ServedXXH3 = FormatChecksum(served)
	if c.XXH3 != "" && c.XXH3 != c.ServedXXH3 {
		problems = append(problems, "bytes served changed since they were checksummed: XXH3 differs")
	}
	sum := sha256.Sum256(f.Bytes())
	c.SHA256 = hex.EncodeToString(sum[:])
	if f.source != "" {
		src, size, err := hashFile(f.source)
		switch {
		case err != nil:
			problems = append(problems, err.Error())
		case size != f.Size():
			c.SourceSHA256 = src
			problems = append(problems, fmt.Sprintf("source is %d bytes, served %d", size, f.Size()))
		case src != c.SHA256:
			c.SourceSHA256 = src
			problems = append(problems, "source changed: checksums differ")
		default:
			c.SourceSHA256 = src
		}
	}
	if c.GPUs, err = f.verifySlabs(ctx); err != nil {
		return c, err
	}
	for _, g := range c.GPUs {
		if !g.OK {
			problems = append(problems, "GPU "+g.GPU+": "+g.Problem)
		}
	}
	c.OK = len(problems) == 0
	if !c.OK {
		c.Problem = problems[0]
	}
	return c, nil
}

// FormatChecksum is how a checksum is shown (user.weightfs.xxh3, verify):
// 16 lowercase hex digits.
func FormatChecksum(sum uint64) string { return fmt.Sprintf("%016x", sum) }

// verifySlabs compares each slab's tensors with the host image through a
// scratch buffer, device to host; only ctx's end is an error.
func (f *File) verifySlabs(ctx context.Context) ([]SlabCheck, error) {
	f.mu.RLock()
	replicas := slices.Clone(f.replicas)
	f.mu.RUnlock()
	if f.header == nil || len(replicas) == 0 {
		return nil, nil
	}
	runs := slabCopies(f.header)
	var most int64
	for _, r := range runs {
		most = max(most, r.n)
	}
	scratch := make([]byte, min(most, verifyChunk))
	img := f.Bytes()
	var out []SlabCheck
	for _, r := range replicas {
		c := SlabCheck{GPU: r.gpu.UUID(), OK: true}
	runs:
		for _, run := range runs {
			for off := int64(0); off < run.n; off += verifyChunk {
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				n := min(verifyChunk, run.n-off)
				buf := scratch[:n]
				if err := r.gpu.ctx.CopyDtoH(buf, r.slab.Ptr+cuda.DevicePtr(run.dst+off)); err != nil {
					c.OK, c.Problem = false, fmt.Sprintf("read the slab: %v", err)
					break runs
				}
				if !bytes.Equal(buf, img[run.src+off:run.src+off+n]) {
					c.OK, c.Problem = false, fmt.Sprintf("slab differs from the bytes served in file bytes [%d, %d)",
						run.src+off, run.src+off+n)
					break runs
				}
			}
		}
		out = append(out, c)
	}
	return out, nil
}

// verifyChunk is the scratch buffer verify reads slabs through.
const verifyChunk = 16 << 20

func hashFile(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, fmt.Errorf("read %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}
