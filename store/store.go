// Package store keeps models resident in host memory: models, immutable
// numbered versions, their files and the tensors of their weights files. It
// knows nothing of FUSE; package fs serves what it holds.
package store

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/weightfs/weightfs/cuda"
	"github.com/weightfs/weightfs/store/safetensors"
)

// Store holds every model the daemon serves.
type Store struct {
	arena *Arena
	log   *slog.Logger
	gpus  *GPUs

	mu       sync.RWMutex
	models   map[string]*Model
	closed   bool
	budgets  Budgets
	reserved reservation
	// sysmem and memReserve admit loads against the machine and the cgroup.
	sysmem     func() (SystemMemory, error)
	memReserve MemoryReserve
	draining   []*Version         // unloaded, still in use
	onRemove   []func(*Version)   // told of every version leaving the mount
	onCurrent  []func(*Model)     // told of every change of a model's current version
	keep       int                // versions kept per model (0: all); see retain
	loads      map[*Load]bool     // loads in progress
	staged     map[string]*Staged // pushes in progress, by model name (stage.go)
	logEvery   time.Duration      // how often a load in progress is logged
	// lastNumber outlives a model's unload: version numbers are never reused.
	lastNumber map[string]int
	// watchers are closed at the next change of a model's current
	// version (watch.go); watchMu nests inside mu.
	watchMu  sync.Mutex
	watchers map[string]chan struct{}
	// reaps are the frees a commit left to run after it (reapLater);
	// Close waits for them. Added to under mu while not closed.
	reaps sync.WaitGroup

	// nextIno hands out stable inode numbers: 1 is the mount's root.
	nextIno atomic.Uint64
	// sums holds a slot per file being checksummed (background.go).
	sums chan struct{}
	// state is the state directory (nil: none); stateMu orders the
	// manifest's writes; saveCh asks Run to write it (adopt.go).
	state   *StateDir
	stateMu sync.Mutex
	saveCh  chan struct{}
	// snap is the snapshot directory (nil: none); snapSem lets one
	// snapshot be written at a time (snapshot.go).
	snap    *SnapshotDir
	snapSem chan struct{}
	// snapWritten, snapFailed and snapBytes count snapshots for metrics.
	snapWritten, snapFailed, snapBytes atomic.Int64
	// moves are the tier moves in progress (tier.go); Close waits for
	// them. moveCompress and moveRestore count those done, for metrics.
	moves                     sync.WaitGroup
	moveCompress, moveRestore atomic.Int64
	// moveGPU and moveDrop count GPU replicas freed and compressed versions
	// dropped by eviction (store/evict.go); moveSnapshot versions moved to
	// the snapshot tier (snaptier.go), restoreSnapshot those restored
	// from it (moveRestore counts the compressed tier's).
	moveGPU, moveDrop             atomic.Int64
	moveSnapshot, restoreSnapshot atomic.Int64
	compressIdle                  bool
}

// ReservedInos are inode numbers the store never hands out: 1 is the mount's
// root, the others are the file system's own nodes.
const ReservedInos = 15

// Options configure a Store.
type Options struct {
	// Logger receives load and error messages (default: slog.Default()).
	Logger *slog.Logger
	// GPUs, if set, receive a replica of every weights file. The caller
	// keeps ownership and closes them after the store.
	GPUs *GPUs
	// Budgets limit host and GPU memory (zero: no limit).
	Budgets Budgets
	// LogEvery is how often a load in progress logs its progress
	// (default DefaultLogEvery).
	LogEvery time.Duration
	// SystemMemory reads what the machine and the daemon's memory cgroup
	// can still give (default: ReadSystemMemory); a load is refused when
	// it would leave less than MemoryReserve free below either limit.
	SystemMemory func() (SystemMemory, error)
	// MemoryReserve is that margin (default: DefaultMemoryReserve).
	MemoryReserve MemoryReserve
	// KeepVersions is how many versions of a model stay when one is
	// committed: the newest KeepVersions, and the current one whatever its
	// number. Older ones are unloaded (they drain as for Unload). 0 keeps
	// every version; daemons use DefaultKeepVersions.
	KeepVersions int
	// State, if set, is the state directory whose images folder the arena
	// keeps host images in (OpenStateArena): the store writes its manifest
	// and can Adopt what an earlier daemon left. The store owns it from
	// now on; Close deletes the images and the manifest.
	State *StateDir
	// Snapshots, if set, is the snapshot directory every committed pushed
	// version is written to (snapshot.go) and LoadSnapshots reads. The
	// store owns it from now on; Close closes it (and deletes nothing).
	Snapshots *SnapshotDir
	// CompressIdle lets a load, push or restore refused for memory evict
	// before it gives up, least recently used first: GPU replicas of idle
	// non-current versions for GPU memory; for host memory, idle versions
	// to the compressed tier, then compressed pushed versions whose
	// snapshot is on disk to the snapshot tier, then compressed
	// non-current versions that can be re-loaded off the mount (tier.go,
	// snaptier.go, evict.go). Off: refused as before.
	CompressIdle bool
}

// DefaultKeepVersions is what a daemon keeps of each model: the current
// version and one to roll back to.
const DefaultKeepVersions = 2

// DefaultLogEvery is how often a load in progress logs its progress, for
// journalctl and kubectl logs.
const DefaultLogEvery = 5 * time.Second

// New creates an empty store whose host images live in arena. The store owns
// the arena from now on and closes it in Close.
func New(arena *Arena, opts Options) *Store {
	s := &Store{arena: arena, log: opts.Logger, gpus: opts.GPUs, budgets: opts.Budgets, logEvery: opts.LogEvery,
		sysmem: opts.SystemMemory, memReserve: opts.MemoryReserve, keep: max(opts.KeepVersions, 0),
		models: map[string]*Model{}, loads: map[*Load]bool{}, staged: map[string]*Staged{}, lastNumber: map[string]int{},
		watchers: map[string]chan struct{}{}, sums: make(chan struct{}, checksumWorkers()),
		state: opts.State, saveCh: make(chan struct{}, 1), snap: opts.Snapshots, snapSem: make(chan struct{}, 1),
		compressIdle: opts.CompressIdle}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.sysmem == nil {
		s.sysmem = ReadSystemMemory
	}
	if s.memReserve == nil {
		s.memReserve = DefaultMemoryReserve
	}
	s.nextIno.Store(ReservedInos)
	return s
}

// GPUs are the devices weights are replicated to (nil: host only).
func (s *Store) GPUs() *GPUs { return s.gpus }

// Arena is where the store keeps host images.
func (s *Store) Arena() *Arena { return s.arena }

func (s *Store) newIno() uint64 { return s.nextIno.Add(1) }

// Models returns the models in name order.
func (s *Store) Models() []*Model {
	s.mu.RLock()
	defer s.mu.RUnlock()
	out := make([]*Model, 0, len(s.models))
	for _, m := range s.models {
		out = append(out, m)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// Model returns the model of that name, or nil.
func (s *Store) Model(name string) *Model {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.models[name]
}

// Version returns a committed version by model name and number, or nil.
func (s *Store) Version(name string, number int) *Version {
	m := s.Model(name)
	if m == nil {
		return nil
	}
	return m.Version(number)
}

// Stats sums up what the store holds.
type Stats struct {
	Models, Versions, Files int
	Bytes                   int64
}

// Stats sums up what the store holds now.
func (s *Store) Stats() Stats {
	var st Stats
	for _, m := range s.Models() {
		st.Models++
		for _, v := range m.Versions() {
			st.Versions++
			st.Files += len(v.files)
			st.Bytes += v.bytes
		}
	}
	return st
}

// Close frees every host image and the arena. The store must not be used
// afterwards.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	staged := s.staged
	s.staged = map[string]*Staged{}
	s.mu.Unlock()
	// Staged pushes are aborted first: freeing them takes s.mu, as do the
	// frees commits left running.
	for _, st := range staged {
		st.Abort("the store closes")
	}
	s.reaps.Wait()
	s.moves.Wait() // a move reads and frees host images
	if s.state != nil {
		// A save in progress ends first. saveState's order, stateMu then
		// s.mu: the other way round, Close and Run's save deadlock.
		s.stateMu.Lock()
		defer s.stateMu.Unlock()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.changedAll()
	var errs []error
	for _, v := range s.allVersionsLocked() {
		if err := v.free(); err != nil {
			errs = append(errs, err)
		}
	}
	s.models = nil
	s.draining = nil
	errs = append(errs, s.arena.Close())
	if s.state != nil {
		errs = append(errs, s.state.close(true))
	}
	if s.snap != nil {
		errs = append(errs, s.snap.close())
	}
	return errors.Join(errs...)
}

// commit makes a fully loaded version visible under the next number of its
// model, as its current version, then unloads what the retention rule no
// longer keeps. fills are the host images to fill from the GPUs afterwards
// (a push's); then every file is checksummed, in the background.
func (s *Store) commit(name string, v *Version, fills []hostFill) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return errorf(ErrBusy, "load %s: the store is closed", name)
	}
	v.prepareBackground(fills)
	m := s.models[name]
	if m == nil {
		m = &Model{name: name, ino: s.newIno()}
		s.models[name] = m
	}
	m.mu.Lock()
	s.lastNumber[name]++
	v.number = s.lastNumber[name]
	v.model = name
	v.store = s
	s.startBackground(v, fills)
	m.versions = append(m.versions, v)
	m.current = v
	var gone []*Version
	m.versions, gone = retain(m.versions, m.current, s.keep)
	m.mu.Unlock()
	s.drainLocked(gone)
	s.changed(name)
	onCurrent, onRemove := s.hooksLocked()
	if len(gone) > 0 {
		s.reaps.Add(1)
	}
	s.mu.Unlock()
	for _, h := range onCurrent {
		h(m)
	}
	if v.isPushed() {
		// A trainer waits for its commit's answer: the manifest is written
		// by Run (a pushed version is adopted only once its checksums are
		// known, which writes it again).
		s.requestSave()
	} else {
		s.saveState()
	}
	s.announce(gone, onRemove, fmt.Sprintf("retention: %s committed, keeping the newest %d versions and the current one", v.Name(), s.keep))
	if len(gone) > 0 {
		// Freeing a version (unpinning and freeing tens of GB) takes
		// seconds: the commit, which a trainer and its engines wait for,
		// does not.
		go func() {
			defer s.reaps.Done()
			s.reap(gone...)
		}()
	}
	return nil
}

// retain splits versions (ascending numbers) into those the retention rule
// keeps, the newest keep of them and current whatever its number, and those
// it drops. keep 0 keeps every version.
func retain(versions []*Version, current *Version, keep int) (kept, gone []*Version) {
	if keep <= 0 || len(versions) <= keep {
		return versions, nil
	}
	cut := len(versions) - keep
	for i, v := range versions {
		if i >= cut || v == current {
			kept = append(kept, v)
		} else {
			gone = append(gone, v)
		}
	}
	return kept, gone
}

// checkOpen refuses a request to a closed store (ErrBusy).
func (s *Store) checkOpen(what string) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return errorf(ErrBusy, "%s: the store is closed", what)
	}
	return nil
}

// ValidateModelName checks a model name (ErrInvalid): it becomes a file name
// on the mount and "NAME@N" names its versions; it is shown in listings and
// logs, so it may hold no control characters or line breaks.
func ValidateModelName(name string) error {
	switch {
	case name == "":
		return errorf(ErrInvalid, "model name is empty")
	case len(name) > 200:
		return errorf(ErrInvalid, "model name %q is longer than 200 bytes", name)
	case !utf8.ValidString(name):
		return errorf(ErrInvalid, "model name %q is not valid UTF-8", name)
	case strings.HasPrefix(name, "."):
		return errorf(ErrInvalid, "model name %q must not start with '.'", name)
	case strings.ContainsAny(name, "/@\x00"):
		return errorf(ErrInvalid, "model name %q must not contain '/', '@' or NUL", name)
	case strings.ContainsFunc(name, isControl):
		return errorf(ErrInvalid, "model name %q must not contain control characters or line breaks", name)
	}
	return nil
}

// isControl: a character that would let a name rewrite a terminal, a log
// line or a listing (newline, ESC, DEL, C1 controls, U+2028/U+2029).
func isControl(r rune) bool { return unicode.IsControl(r) || unicode.In(r, unicode.Zl, unicode.Zp) }

// Model is a named series of versions.
type Model struct {
	name string
	ino  uint64

	mu       sync.RWMutex
	versions []*Version // ascending numbers
	current  *Version
}

// Name is the model's name.
func (m *Model) Name() string { return m.name }

// Ino is the stable inode number of the model's "current" symlink.
func (m *Model) Ino() uint64 { return m.ino }

// Current is the version the model's symlink points to: the newest
// committed one, unless Rollback moved it.
func (m *Model) Current() *Version {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.current
}

// Versions are the committed versions in ascending order.
func (m *Model) Versions() []*Version {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]*Version(nil), m.versions...)
}

// Version returns version n, or nil.
func (m *Model) Version(n int) *Version {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for _, v := range m.versions {
		if v.number == n {
			return v
		}
	}
	return nil
}

// Version is one immutable, fully loaded copy of a model folder.
type Version struct {
	store    *Store
	use      versionUse
	model    string
	number   int
	source   string
	root     *Dir
	files    []*File // in path order
	bytes    int64
	loadedAt time.Time
	loadTime time.Duration
	gpuErr   error
	bg       *background // the fill and checksums after commit (background.go)
	// snapped is closed when the version's snapshot is written or failed
	// (snapErr); nil: none is written (snapshot.go).
	snapped chan struct{}
	snapErr error
}

// Model is the name of the model this version belongs to.
func (v *Version) Model() string { return v.model }

// Number is the version's number, from 1.
func (v *Version) Number() int { return v.number }

// Name is the version's directory name on the mount: "MODEL@N".
func (v *Version) Name() string { return fmt.Sprintf("%s@%d", v.model, v.number) }

// Source is the folder the version was loaded from.
func (v *Version) Source() string { return v.source }

// Root is the version's top directory.
func (v *Version) Root() *Dir { return v.root }

// Files are all files of the version in path order.
func (v *Version) Files() []*File { return v.files }

// HeaderBytes is the size of a weights file's header (8 + N: the bytes
// before its tensors), 0 for other files.
func (f *File) HeaderBytes() int64 {
	if f.header == nil {
		return 0
	}
	return f.header.DataOffset()
}

// Bytes is the total size of the version's files.
func (v *Version) Bytes() int64 { return v.bytes }

// HostBytes is the host memory the version takes: each file's size rounded
// up to the pages it is kept in (Bytes is the files' sizes), or in the
// compressed tier its stream's size (a stream in the snapshot tier is in the
// page cache: it counts nothing).
func (v *Version) HostBytes() int64 {
	var n int64
	for _, f := range v.files {
		f.tmu.RLock()
		if f.buf != nil {
			n += f.buf.Cost()
		}
		if f.packed != nil && f.packed.resident() {
			n += f.packed.Size()
		}
		f.tmu.RUnlock()
	}
	return n
}

// LoadedAt is when the version was committed.
func (v *Version) LoadedAt() time.Time { return v.loadedAt }

// LoadTime is how long loading took.
func (v *Version) LoadTime() time.Duration { return v.loadTime }

// GPUError says why the version is not on the GPUs it was meant for (nil
// when it is, or when no GPU was asked for). The host copy serves regardless.
func (v *Version) GPUError() error { return v.gpuErr }

func (v *Version) free() error {
	v.stopBackground() // it reads the host images and slabs freed below
	var errs []error
	for _, f := range v.files {
		if err := f.freeGPU(); err != nil {
			errs = append(errs, fmt.Errorf("free %s/%s: %w", v.Name(), f.path, err))
		}
		f.tmu.Lock()
		b := f.buf // kept: a freed version still says what it took
		p := f.packed
		f.packed = nil
		f.tmu.Unlock()
		if err := p.close(); err != nil {
			errs = append(errs, fmt.Errorf("free %s/%s: %w", v.Name(), f.path, err))
		}
		if b == nil {
			continue // compressed
		}
		if err := b.Close(); err != nil {
			errs = append(errs, fmt.Errorf("free %s/%s: %w", v.Name(), f.path, err))
		}
	}
	return errors.Join(errs...)
}

// Dir is a directory inside a version.
type Dir struct {
	name  string
	ino   uint64
	attrs attrs   // owner, group and permission bits (store/source.go)
	dirs  []*Dir  // name order
	files []*File // name order
}

// Name is the directory's own name ("" for a version's root).
func (d *Dir) Name() string { return d.name }

// Ino is the directory's stable inode number.
func (d *Dir) Ino() uint64 { return d.ino }

// Owner is the uid and gid of the source folder, which the directory keeps
// on the mount. A version's root directory is owned as the model folder is.
func (d *Dir) Owner() (uid, gid uint32) { return d.attrs.uid, d.attrs.gid }

// Perm is the directory's permission bits on the mount: its source folder's
// read and search bits (never write bits). For a version's root, the bits of
// a class of users that cannot reach the model folder (a folder above it
// denies them search) are cleared.
func (d *Dir) Perm() os.FileMode { return d.attrs.perm }

// Dirs are the subdirectories in name order.
func (d *Dir) Dirs() []*Dir { return d.dirs }

// Files are the files in name order.
func (d *Dir) Files() []*File { return d.files }

// Kind says how the daemon treats a file.
type Kind int

const (
	// Plain files (config, tokenizer, …) are served as they are.
	Plain Kind = iota
	// Weights files are safetensors files whose header was validated.
	Weights
)

func (k Kind) String() string {
	if k == Weights {
		return "weights"
	}
	return "plain"
}

// File is one file of a version with its host image.
type File struct {
	name   string
	path   string // relative to the version root, '/'-separated
	ino    uint64
	kind   Kind
	source string
	header *safetensors.Header
	attrs  attrs // owner, group and permission bits (store/source.go)

	// buf is the host image (nil in the compressed and snapshot tiers,
	// where packed is the codec stream of rawSize bytes, packed.go). Set
	// before the version is visible; after that only a tier move (tier.go)
	// or free swaps them, under tmu, and nobody reads buf but through
	// image() or while the version is open (a move never swaps an open
	// version's image).
	tmu     sync.RWMutex
	buf     *Buffer
	packed  *packedStream
	rawSize int64

	// Set while loading, cleared when the version is freed.
	mu       sync.RWMutex
	replicas []*replica
	pinned   *cuda.Context // the context the host image is registered with

	// ready is closed when the host image is complete or its fill failed
	// (readyErr); nil: complete from the start. summed is closed when
	// the checksum sum is computed or cannot be (sumErr); nil until the
	// version is committed. Both are set before the version is visible
	// and written only by its goroutine (background.go).
	ready    chan struct{}
	readyErr error
	summed   chan struct{}
	sum      uint64
	sumErr   error
	knownSum bool // sum was recorded by the daemon that loaded it (adopt.go)

	// srcID is the source's identity when it was read (hasSrcID), for
	// the manifest.
	srcID    fileID
	hasSrcID bool
}

// Name is the file's base name.
func (f *File) Name() string { return f.name }

// Path is the file's path inside its version, '/'-separated.
func (f *File) Path() string { return f.path }

// Ino is the file's stable inode number.
func (f *File) Ino() uint64 { return f.ino }

// Owner is the uid and gid of the file's source, which it keeps on the mount.
func (f *File) Owner() (uid, gid uint32) { return f.attrs.uid, f.attrs.gid }

// Perm is the file's permission bits on the mount: its source's read bits
// (never write or execute bits); for a file reached through a symlink, the
// bits of a class of users that cannot search the folders of its target are
// cleared.
func (f *File) Perm() os.FileMode { return f.attrs.perm }

// Kind says whether this is a weights file.
func (f *File) Kind() Kind { return f.kind }

// Source is the file the bytes were loaded from.
func (f *File) Source() string { return f.source }

// Header is the validated safetensors header of a weights file (nil for plain files).
func (f *File) Header() *safetensors.Header { return f.header }

// Size is the file's length in bytes.
func (f *File) Size() int64 {
	f.tmu.RLock()
	defer f.tmu.RUnlock()
	if f.buf == nil {
		return f.rawSize
	}
	return f.buf.Size()
}

// Bytes is the host image, the file's exact bytes (nil while the version is
// compressed: Version.EnsureHost restores it).
func (f *File) Bytes() []byte {
	if b := f.image(); b != nil {
		return b.Bytes()
	}
	return nil
}

// BackingFd is the descriptor of the memory-backed file holding the image
// (-1 while the version is compressed). A restore makes a new one.
func (f *File) BackingFd() int {
	if b := f.image(); b != nil {
		return b.Fd()
	}
	return -1
}
