package fs

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/store"
)

// ReadMode is how file contents reach readers.
type ReadMode int32

const (
	// Passthrough: the kernel reads and maps the memory-backed files itself;
	// no READ reaches the daemon.
	Passthrough ReadMode = iota
	// Cached: the daemon answers READs from the host image, the kernel keeps
	// the pages cached across opens, readahead raised to 1 MiB.
	Cached
)

func (m ReadMode) String() string {
	if m == Passthrough {
		return "passthrough"
	}
	return "cached"
}

// Options configure a mount.
type Options struct {
	// ForceCached skips passthrough even where the kernel offers it.
	ForceCached bool
	// AllowOther lets users other than the daemon's read the mount (needs root
	// or user_allow_other).
	AllowOther bool
	// Logger receives mount messages (default slog.Default()).
	Logger *slog.Logger
	// Debug logs every FUSE request.
	Debug bool
	// Status is what .weightfs/status.json at the mount's root shows, as
	// indented JSON rendered at every open (nil: {}).
	Status StatusSource
	// AllowUIDs and AllowGIDs may read GPU handles (user.weightfs.cuda and
	// the ioctl) besides root and the daemon's own uid, which always may;
	// everyone else gets EACCES.
	AllowUIDs, AllowGIDs []uint32
}

// Counters are what the mount counts for status and tests.
type Counters struct {
	// DaemonReads are READ requests that reached the daemon (0 under passthrough).
	DaemonReads, DaemonReadBytes uint64
	Opens, Releases              uint64
	// Requests counts FUSE requests that reached the daemon, by type.
	Requests map[string]uint64
	// HandleRequests and HandleDenials count CUDA manifest requests (xattr
	// and ioctl) and those refused for lack of permission.
	HandleRequests, HandleDenials uint64
}

type counters struct {
	reads, readBytes, opens, releases atomic.Uint64
	handleRequests, handleDenials     atomic.Uint64
	ops                               [opCount]atomic.Uint64
}

// FUSE request types the mount counts.
const (
	opLookup = iota
	opGetattr
	opReaddir
	opReadlink
	opOpen
	opRead
	opGetxattr
	opListxattr
	opIoctl
	opStatfs
	opCount
)

var opNames = [opCount]string{"lookup", "getattr", "readdir", "readlink", "open", "read", "getxattr", "listxattr", "ioctl", "statfs"}

// mount is the state every node of one mount shares.
type mount struct {
	store    *store.Store
	log      *slog.Logger
	mode     atomic.Int32
	uid, gid uint32
	counters counters
	warned   atomic.Bool

	allowUIDs, allowGIDs map[uint32]bool
	started              time.Time // the root's and .weightfs's times
	// closing ends blocked reads of .weightfs/versions (EOF) when the
	// mount is told to go: they would keep it busy forever.
	closing   chan struct{}
	closeOnce sync.Once
	// manifest is (*store.File).CUDAManifest; tests without a GPU stand in.
	manifest func(*store.File) ([]byte, bool)
}

func (m *mount) Mode() ReadMode { return ReadMode(m.mode.Load()) }

func (m *mount) owner(a *fuse.Attr) { a.Uid, a.Gid = m.uid, m.gid }

func (m *mount) count(op int) { m.counters.ops[op].Add(1) }

func (m *mount) countRead(n int) {
	m.count(opRead)
	m.counters.reads.Add(1)
	m.counters.readBytes.Add(uint64(n))
	if m.Mode() == Passthrough && m.warned.CompareAndSwap(false, true) {
		m.log.Error("a READ reached the daemon although the mount is in passthrough mode: " +
			"the kernel refused a backing file and reads are now served by the daemon (slower)")
	}
}

// handles returns a file's CUDA manifest to a caller allowed to have its
// handles: a handle lets its opener read and write the slab.
func (m *mount) handles(ctx context.Context, v *store.Version, f *store.File) ([]byte, syscall.Errno) {
	m.counters.handleRequests.Add(1)
	manifest, ok := m.manifest(f)
	if !ok {
		return nil, syscall.ENODATA
	}
	caller, ok := fuse.FromContext(ctx)
	if !ok || !(m.allowUIDs[caller.Uid] || m.allowGIDs[caller.Gid]) {
		m.counters.handleDenials.Add(1)
		return nil, syscall.EACCES
	}
	// Again, recording the holder at once: eviction may have freed the
	// replicas since.
	if manifest, ok = v.HandOut(int(caller.Pid), func() ([]byte, bool) { return m.manifest(f) }); !ok {
		return nil, syscall.ENODATA
	}
	return manifest, 0
}

// newMount makes the state the nodes of one mount share, in Cached mode.
func newMount(st *store.Store, opts Options, log *slog.Logger) *mount {
	m := &mount{store: st, log: log, uid: uint32(os.Getuid()), gid: uint32(os.Getgid()),
		allowUIDs: map[uint32]bool{}, allowGIDs: map[uint32]bool{}, started: time.Now(),
		manifest: (*store.File).CUDAManifest, closing: make(chan struct{})}
	m.allowUIDs[0], m.allowUIDs[m.uid] = true, true
	for _, id := range opts.AllowUIDs {
		m.allowUIDs[id] = true
	}
	for _, id := range opts.AllowGIDs {
		m.allowGIDs[id] = true
	}
	m.mode.Store(int32(Cached))
	return m
}

// Server is a mounted weightfs.
type Server struct {
	fuse       *fuse.Server
	m          *mount
	mountpoint string
	why        string
	unmounted  chan struct{} // closed once the kernel has let go of the mount
}

// Mount mounts the store read-only on mountpoint and serves it until
// Unmount. A mount point left stale by a killed daemon is recovered first.
func Mount(mountpoint string, st *store.Store, opts Options) (*Server, error) {
	abs, err := filepath.Abs(mountpoint)
	if err != nil {
		return nil, fmt.Errorf("mount point %s: %w", mountpoint, err)
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := prepareMountpoint(abs, log); err != nil {
		return nil, err
	}
	m := newMount(st, opts, log)
	long := 24 * time.Hour
	zero := time.Duration(0)
	gopts := &gofs.Options{
		EntryTimeout:    &long,
		AttrTimeout:     &long,
		NegativeTimeout: &zero, // new versions must show up at once
		RootStableAttr:  &gofs.StableAttr{Ino: 1},
		// Every node sets its mode; a 0000 source stays 0000 (go-fuse
		// would otherwise turn mode 0 into 0644/0755).
		NullPermissions: true,
		MountOptions: fuse.MountOptions{
			FsName:           "weightfs",
			Name:             "weightfs",
			DirectMount:      true,
			DirectMountFlags: syscall.MS_RDONLY | syscall.MS_NOSUID | syscall.MS_NODEV,
			AllowOther:       opts.AllowOther,
			// The kernel checks every access against the modes and owners
			// the nodes report: a version's files keep their source's.
			Options:       []string{"default_permissions"},
			MaxWrite:      1 << 20,
			MaxReadAhead:  1 << 20,
			DisableSplice: true, // in-memory data gains nothing from splice
			Debug:         opts.Debug,
		},
	}
	root := &rootDir{m: m, status: opts.Status}
	server, err := gofs.Mount(abs, root, gopts)
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", abs, err)
	}
	// An unloaded version leaves the kernel's caches at once; its open files
	// keep working.
	st.OnRemove(func(v *store.Version) {
		root.NotifyEntry(v.Name())
		root.NotifyEntry(v.Model())
	})
	// A rollback (or a commit) moves a model's symlink: the kernel forgets
	// the link so the next lookup and readlink ask again.
	st.OnCurrent(func(m *store.Model) {
		root.NotifyEntry(m.Name())
	})
	s := &Server{fuse: server, m: m, mountpoint: abs, unmounted: make(chan struct{})}
	go func() { server.Wait(); close(s.unmounted) }()
	mode, why := Cached, "requested"
	if !opts.ForceCached {
		mode, why = checkPassthrough(server, st.Arena())
	}
	m.mode.Store(int32(mode))
	s.why = why
	if mode == Passthrough {
		log.Info("mounted", "mountpoint", abs, "reads", "passthrough", "host_memory", st.Arena().Kind())
	} else {
		log.Warn("FUSE passthrough is OFF: reads go through the daemon and the page cache (slower)",
			"reason", why, "mountpoint", abs, "host_memory", st.Arena().Kind())
	}
	if mode == Cached {
		if err := raiseReadahead(abs, 1024); err != nil {
			log.Warn("could not raise read_ahead_kb; cached reads will be slower", "err", err)
		}
	}
	return s, nil
}

// checkPassthrough registers a backing file once, by hand: go-fuse turns
// passthrough off for the whole mount, silently, after one failed
// registration, so find out now and say so.
func checkPassthrough(server *fuse.Server, arena *store.Arena) (ReadMode, string) {
	if server.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH == 0 {
		return Cached, "the kernel does not offer FUSE passthrough (Linux ≥ 6.9 with CONFIG_FUSE_PASSTHROUGH)"
	}
	probe, err := arena.NewBuffer("passthrough-probe", 4096)
	if err != nil {
		return Cached, fmt.Sprintf("no probe file: %v", err)
	}
	defer probe.Close()
	id, errno := server.RegisterBackingFd(&fuse.BackingMap{Fd: int32(probe.Fd())})
	if errno != 0 {
		return Cached, fmt.Sprintf("registering a backing file failed: %v (passthrough needs CAP_SYS_ADMIN in the initial user namespace)", errno)
	}
	if errno := server.UnregisterBackingFd(id); errno != 0 {
		return Cached, fmt.Sprintf("unregistering the probe backing file failed: %v", errno)
	}
	return Passthrough, ""
}

// raiseReadahead sets the mount's bdi read_ahead_kb; MaxReadAhead can only
// lower what the kernel offers.
func raiseReadahead(mountpoint string, kb int) error {
	var st unix.Stat_t
	if err := unix.Stat(mountpoint, &st); err != nil {
		return err
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	return os.WriteFile(p, []byte(strconv.Itoa(kb)), 0)
}

// prepareMountpoint makes sure mountpoint is a directory nothing is mounted
// on, recovering one left stale by a killed daemon.
func prepareMountpoint(mountpoint string, log *slog.Logger) error {
	fstype, mounted, err := mountedFS(mountpoint)
	if err != nil {
		return err
	}
	if mounted {
		// statfs always reaches the daemon; stat may be answered from the
		// kernel's attribute cache and miss a daemon that died just now.
		var st unix.Statfs_t
		statErr := unix.Statfs(mountpoint, &st)
		stale := errors.Is(statErr, unix.ENOTCONN) || errors.Is(statErr, unix.ECONNABORTED)
		switch {
		case stale:
			log.Warn("recovering stale mount left by a previous daemon", "mountpoint", mountpoint)
			if err := unix.Unmount(mountpoint, unix.MNT_DETACH); err != nil {
				return fmt.Errorf("mount point %s: stale mount could not be removed: %w", mountpoint, err)
			}
		case fstype == "fuse.weightfs":
			return fmt.Errorf("mount point %s: a running weightfs already serves it", mountpoint)
		case strings.HasPrefix(fstype, "fuse"):
			return fmt.Errorf("mount point %s: another FUSE file system (%s) is mounted there", mountpoint, fstype)
		}
		// Anything else (a bind mount, as a container's volume is) is
		// mounted over, as mount(8) would.
	}
	st, err := os.Stat(mountpoint)
	if err != nil {
		return fmt.Errorf("mount point %s: %w", mountpoint, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("mount point %s: not a directory", mountpoint)
	}
	return nil
}

// mountedFS reports the file system type mounted exactly at path, if any.
func mountedFS(path string) (fstype string, mounted bool, err error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", false, fmt.Errorf("read mount table: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// id parent maj:min root mountpoint options [optional...] - fstype source super
		fields := strings.Fields(sc.Text())
		if len(fields) < 7 || unescapeMountinfo(fields[4]) != path {
			continue
		}
		for i := 6; i < len(fields)-1; i++ {
			if fields[i] == "-" {
				fstype, mounted = fields[i+1], true
			}
		}
	}
	return fstype, mounted, sc.Err()
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for space, …).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Mode is the read mode in force.
func (s *Server) Mode() ReadMode { return s.m.Mode() }

// CachedReason says why the mount is not in passthrough mode ("" when it is).
func (s *Server) CachedReason() string { return s.why }

// Mountpoint is where the file system is mounted.
func (s *Server) Mountpoint() string { return s.mountpoint }

// Counters returns what the mount has counted so far.
func (s *Server) Counters() Counters {
	c := &s.m.counters
	out := Counters{
		DaemonReads: c.reads.Load(), DaemonReadBytes: c.readBytes.Load(),
		Opens: c.opens.Load(), Releases: c.releases.Load(),
		HandleRequests: c.handleRequests.Load(), HandleDenials: c.handleDenials.Load(),
		Requests: map[string]uint64{},
	}
	for i, name := range opNames {
		out.Requests[name] = c.ops[i].Load()
	}
	return out
}

// Report is the mount's side of the daemon's status.
type Report struct {
	Mountpoint, ReadMode, CachedReason         string
	Requests                                   map[string]uint64
	DaemonReads, HandleRequests, HandleDenials uint64
}

// Report says where the mount is, how it reads and what it counted.
func (s *Server) Report() Report {
	c := s.Counters()
	return Report{Mountpoint: s.mountpoint, ReadMode: s.Mode().String(), CachedReason: s.why,
		Requests: c.Requests, DaemonReads: c.DaemonReads, HandleRequests: c.HandleRequests, HandleDenials: c.HandleDenials}
}

// Unmount unmounts; it fails with EBUSY while files are open.
func (s *Server) Unmount() error {
	s.m.closeOnce.Do(func() { close(s.m.closing) })
	if err := s.fuse.Unmount(); err != nil {
		return fmt.Errorf("unmount %s: %w", s.mountpoint, err)
	}
	return nil
}

// Detach unmounts lazily: the mount disappears from the tree at once and the
// server keeps serving open files until the last one closes.
func (s *Server) Detach() error {
	if err := unix.Unmount(s.mountpoint, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach %s: %w", s.mountpoint, err)
	}
	return nil
}

// Wait blocks until the file system is unmounted.
func (s *Server) Wait() { <-s.unmounted }

// Serve serves until a signal arrives on sig, then unmounts. While readers
// hold files open it detaches the mount and serves them until the last one
// closes or the next signal arrives (then it returns ErrFilesOpen). A file
// system unmounted from outside first is an error.
func (s *Server) Serve(sig <-chan os.Signal) error {
	select {
	case <-s.unmounted:
		return fmt.Errorf("%s was unmounted from outside", s.mountpoint)
	case <-sig:
	}
	err := s.Unmount()
	if err == nil {
		s.m.log.Info("unmounted", "mountpoint", s.mountpoint)
		return nil
	}
	s.m.log.Warn("mount busy; detaching it and serving open files until they close (signal again to quit now)", "err", err)
	if err := s.Detach(); err != nil {
		return err
	}
	select {
	case <-s.unmounted:
		s.m.log.Info("last open file closed; unmounted", "mountpoint", s.mountpoint)
	case <-sig:
		s.m.log.Warn("quitting with files still open", "mountpoint", s.mountpoint)
		return fmt.Errorf("%s: %w", s.mountpoint, ErrFilesOpen)
	}
	return nil
}

// ErrFilesOpen is Serve's answer when told to quit while files are still
// open: the kernel may still send requests for them, so the caller must free
// nothing the mount serves (the store) and exit.
var ErrFilesOpen = errors.New("quit with files still open")
