package store

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/store/safetensors"
)

// Sources and permissions (docs/ARCHITECTURE.md, "Sources and permissions").
//
// The daemon runs as root and serves what it loads to every user of the
// machine, so a load never widens access:
//
//   - The model folder is resolved once (a folder that is itself a symlink
//     is followed; a Hugging Face repository folder is resolved to the
//     snapshot refs/main names). Every file served is inside that resolved
//     folder, or is the target of a symlink in a Hugging Face snapshot into
//     the blobs/ folder of the same models--* repository. Any other symlink
//     is refused, naming the link and where it points.
//   - Files are opened by their resolved path without following any symlink
//     (openat2 RESOLVE_NO_SYMLINKS, else O_NOFOLLOW), never block
//     (O_NONBLOCK), and must be the very file the scan checked (device and
//     inode).
//   - A served file keeps its source's owner, group and read bits; a
//     directory its source's owner, group and read and search bits. A class
//     of users that cannot surely reach the source (a folder on its way
//     denies them search) loses its bits on the mount.
//   - A folder is a model when it holds a .safetensors file with config.json
//     (or a PEFT adapter's adapter_config.json) beside it or above it.

// sourceInfo is what the scan found out about a model file: where it really
// is, which file it is, and what it is served with.
type sourceInfo struct {
	real     string // resolved, symlink-free path: what is opened
	dev, ino uint64
	attrs    attrs
	folder   *sourceFolder
}

// sourceFolder is a resolved model folder and what the scan found out about
// its directories.
type sourceFolder struct {
	root string // resolved, symlink-free
	repo string // the models--* repository root is a snapshot of ("" if none)
	dirs map[string]attrs
}

// attrs are the owner, group and permission bits a node is served with.
type attrs struct {
	uid, gid uint32
	perm     fs.FileMode
}

// resolveFolder resolves a model folder path: symlinks in it are followed
// once, and a Hugging Face repository folder becomes the snapshot its
// refs/main names.
func resolveFolder(dir string) (*sourceFolder, error) {
	root, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return nil, errorf(ErrInvalid, "model folder %s: %w", dir, unwrapPath(err))
	}
	st, err := os.Stat(root)
	if err != nil {
		return nil, errorf(ErrInvalid, "model folder %s: %w", dir, unwrapPath(err))
	}
	if !st.IsDir() {
		return nil, errorf(ErrInvalid, "model folder %s: not a directory", dir)
	}
	if isRepo(root) {
		if root, err = resolveRepo(root); err != nil {
			return nil, err
		}
	}
	f := &sourceFolder{root: root, dirs: map[string]attrs{}}
	if parent := filepath.Dir(root); filepath.Base(parent) == "snapshots" && isRepo(filepath.Dir(parent)) {
		f.repo = filepath.Dir(parent)
	}
	return f, nil
}

// isRepo says whether dir is a Hugging Face cache repository folder:
// models--Org--Name holding snapshots/.
func isRepo(dir string) bool {
	if !strings.HasPrefix(filepath.Base(dir), "models--") {
		return false
	}
	st, err := os.Lstat(filepath.Join(dir, "snapshots"))
	return err == nil && st.IsDir()
}

// revPattern is what a revision in refs/main may look like (a commit hash).
var revPattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,128}$`)

// resolveRepo returns the snapshot of repo that refs/main names, or refuses
// with the snapshots there are.
func resolveRepo(repo string) (string, error) {
	snapshots := filepath.Join(repo, "snapshots")
	ref := filepath.Join(repo, "refs", "main")
	fh, err := openNoFollow(ref)
	if err != nil {
		var names []string
		entries, _ := os.ReadDir(snapshots)
		for _, e := range entries {
			if e.IsDir() {
				names = append(names, e.Name())
			}
		}
		list := "it has none"
		if len(names) > 0 {
			list = "it has " + strings.Join(names, ", ")
		}
		return "", errorf(ErrInvalid, "model folder %s is a Hugging Face repository without a usable refs/main (%v): pass one of its snapshots, %s/<revision> (%s)",
			repo, unwrapPath(err), snapshots, list)
	}
	defer fh.Close()
	buf := make([]byte, 256)
	n, _ := fh.Read(buf)
	rev := strings.TrimSpace(string(buf[:n]))
	if !revPattern.MatchString(rev) || rev == "." || rev == ".." {
		return "", errorf(ErrInvalid, "model folder %s: %s does not name a snapshot: pass one of %s/<revision>", repo, ref, snapshots)
	}
	snap := filepath.Join(snapshots, rev)
	st, err := os.Lstat(snap)
	if err != nil || !st.IsDir() {
		return "", errorf(ErrInvalid, "model folder %s: %s names snapshot %s, which is not a folder in %s", repo, ref, rev, snapshots)
	}
	return snap, nil
}

// check resolves the symlink or file at p (found by the walk) and refuses
// anything outside what may be served. It returns the resolved path and
// whether it is a regular file to serve (false: a directory or a special
// file, skipped).
func (sf *sourceFolder) check(p string, d fs.DirEntry) (string, bool, error) {
	real := p
	if d.Type()&fs.ModeSymlink != 0 {
		target, _ := os.Readlink(p)
		r, err := filepath.EvalSymlinks(p)
		if err != nil {
			return "", false, errorf(ErrInvalid, "model file %s is a symlink to %s, which cannot be followed: %w", p, target, unwrapPath(err))
		}
		if !sf.allowed(r) {
			where := "outside the model folder " + sf.root
			if sf.repo != "" {
				where += " and outside " + filepath.Join(sf.repo, "blobs")
			}
			return "", false, errorf(ErrInvalid, "model file %s is a symlink to %s (%s), which is %s: refused", p, target, r, where)
		}
		real = r
	} else {
		return p, d.Type().IsRegular(), nil
	}
	st, err := os.Lstat(real)
	if err != nil {
		return "", false, errorf(ErrInvalid, "model file %s: %w", p, unwrapPath(err))
	}
	return real, st.Mode().IsRegular(), nil
}

// allowed says whether a resolved path may be served: inside the folder, or
// a blob of the repository the folder is a snapshot of.
func (sf *sourceFolder) allowed(real string) bool {
	if within(real, sf.root) {
		return true
	}
	return sf.repo != "" && filepath.Dir(real) == filepath.Join(sf.repo, "blobs")
}

// within says whether p is strictly below dir (both clean and absolute).
func within(p, dir string) bool {
	return strings.HasPrefix(p, dir+string(filepath.Separator)) || (dir == "/" && p != "/")
}

// identify opens the resolved file of f, records what it is (device, inode,
// size, owner, group, the permission bits to serve) and closes it.
func (sf *sourceFolder) identify(f *sourceFile) error {
	fh, st, err := openSource(f.real, f.abs)
	if err != nil {
		return err
	}
	fh.Close()
	f.dev, f.ino, f.size = st.Dev, st.Ino, st.Size
	a := attrs{uid: st.Uid, gid: st.Gid, perm: fs.FileMode(st.Mode) & 0o444}
	if f.real != f.abs {
		// Reached through a symlink: the folders between the link's folder
		// of reference and the target are not on the mount, so their search
		// bits narrow the file's own.
		base := sf.root
		if !within(f.real, sf.root) {
			base = sf.repo
		}
		a.perm = a.reach(dirsBetween(base, filepath.Dir(f.real)))
	}
	f.attrs = a
	return nil
}

// dirsBetween lists the folders below base down to dir, dir included.
func dirsBetween(base, dir string) []string {
	var out []string
	for d := dir; within(d, base); d = filepath.Dir(d) {
		out = append(out, d)
	}
	return out
}

// ancestors lists dir's parent folders up to /.
func ancestors(dir string) []string {
	var out []string
	for d := filepath.Dir(dir); ; d = filepath.Dir(d) {
		out = append(out, d)
		if d == "/" || d == "." {
			return out
		}
	}
}

// reach narrows a's permission bits to the classes of users (owner, group,
// others) that can surely search every folder in dirs: a user the source
// folders keep out must not read it through the mount. Where it cannot be
// known (group membership of others), the bits go.
func (a attrs) reach(dirs []string) fs.FileMode {
	perm := a.perm
	for _, dir := range dirs {
		var st unix.Stat_t
		if err := unix.Lstat(dir, &st); err != nil {
			return 0
		}
		m := st.Mode
		ownerX, groupX, otherX := m&0o100 != 0, m&0o010 != 0, m&0o001 != 0
		// The owner (uid 0 reads everything anyway): the folder's owner bits
		// if they own it, else its group or other bits, whichever apply.
		if a.uid != 0 && !(st.Uid == a.uid && ownerX || st.Uid != a.uid && groupX && otherX) {
			perm &^= 0o700
		}
		// Group members other than the owner: maybe the folder's owner,
		// maybe in its group (surely if it is the same group), maybe not.
		if !((st.Uid == a.uid || st.Uid == 0 || ownerX) && groupX && (st.Gid == a.gid || otherX)) {
			perm &^= 0o070
		}
		// Everyone else: maybe the folder's owner, maybe in its group (never
		// when it is the file's group), else its other bits.
		if !((st.Uid == a.uid || st.Uid == 0 || ownerX) && (st.Gid == a.gid || groupX) && otherX) {
			perm &^= 0o007
		}
	}
	return perm
}

// dirAttrs records what a source folder is served with: its owner, group,
// read and search bits (for the model folder itself, narrowed to those who
// can reach it).
func (sf *sourceFolder) dirAttrs(rel, p string) error {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return errorf(ErrInvalid, "model folder %s: %w", p, err)
	}
	a := attrs{uid: st.Uid, gid: st.Gid, perm: fs.FileMode(st.Mode) & 0o555}
	if rel == "." {
		a.perm = a.reach(ancestors(p))
	}
	sf.dirs[rel] = a
	return nil
}

// checkModel refuses a folder that is not a model: it must hold a
// .safetensors file, and each needs config.json (or a PEFT adapter's
// adapter_config.json) in its folder or one above it.
func (sf *sourceFolder) checkModel(files []*sourceFile) error {
	configs := map[string]bool{}
	var weights []string
	for _, f := range files {
		switch base := filepath.Base(f.rel); {
		case base == "config.json" || base == "adapter_config.json":
			configs[filepath.Dir(f.rel)] = true
		case strings.HasSuffix(base, ".safetensors"):
			weights = append(weights, f.rel)
		}
	}
	if len(weights) == 0 {
		return errorf(ErrInvalid, "model folder %s is not a model: it holds no .safetensors file", sf.root)
	}
	sort.Strings(weights)
	for _, w := range weights {
		ok := false
		for d := filepath.Dir(w); ; d = filepath.Dir(d) {
			if configs[d] {
				ok = true
				break
			}
			if d == "." {
				break
			}
		}
		if !ok {
			return errorf(ErrInvalid, "model folder %s is not a model: no config.json (nor a PEFT adapter's adapter_config.json) beside or above %s",
				sf.root, w)
		}
	}
	return nil
}

// openSource opens the resolved path real of a model file (named abs in
// errors) for reading: without following any symlink, without blocking, and
// only if it is a regular file.
func openSource(real, abs string) (*os.File, *unix.Stat_t, error) {
	fh, err := openNoFollow(real)
	if err != nil {
		return nil, nil, errorf(ErrInvalid, "model file %s: %w", abs, unwrapPath(err))
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(fh.Fd()), &st); err != nil {
		fh.Close()
		return nil, nil, fmt.Errorf("model file %s: %w", abs, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		fh.Close()
		return nil, nil, errorf(ErrInvalid, "model file %s: not a regular file but %s", abs, fileType(st.Mode))
	}
	return fh, &st, nil
}

// open opens the file the scan checked, by its resolved path, and refuses
// another file found there since (a symlink, a replaced file).
func (f *sourceFile) open() (*os.File, error) {
	fh, st, err := openSource(f.real, f.abs)
	if err != nil {
		return nil, err
	}
	if st.Dev != f.dev || st.Ino != f.ino {
		fh.Close()
		return nil, errorf(ErrInvalid, "model file %s: replaced by another file since it was checked", f.abs)
	}
	return fh, nil
}

// openNoFollow opens path read-only without following a symlink in any of
// its components (openat2 RESOLVE_NO_SYMLINKS; before Linux 5.6, only the
// last one: O_NOFOLLOW), without blocking on a FIFO or a device.
func openNoFollow(path string) (*os.File, error) {
	flags := unix.O_RDONLY | unix.O_NONBLOCK | unix.O_CLOEXEC | unix.O_NOFOLLOW
	fd, err := unix.Openat2(unix.AT_FDCWD, path, &unix.OpenHow{Flags: uint64(flags), Resolve: unix.RESOLVE_NO_SYMLINKS})
	if errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EPERM) {
		fd, err = unix.Open(path, flags, 0) // no openat2 (or a seccomp filter refusing it)
	}
	if err != nil {
		if errors.Is(err, unix.ELOOP) {
			err = errors.New("a symlink is in its path")
		}
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return os.NewFile(uintptr(fd), path), nil
}

// unwrapPath drops the path of a *fs.PathError: the message names the file
// already.
func unwrapPath(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// dirAttrsOf is what the folder rel ('/'-separated, "." for the model folder)
// is served with; a folder the scan did not see (none: a version not loaded
// from disk) gets read and search bits for all, owned by root.
func (sf *sourceFolder) dirAttrsOf(rel string) attrs {
	if sf != nil {
		if a, ok := sf.dirs[rel]; ok {
			return a
		}
	}
	return attrs{perm: 0o555}
}

// parseHeader reads and validates the safetensors header of f through the
// file the scan checked.
func (f *sourceFile) parseHeader() error {
	fh, err := f.open()
	if err != nil {
		return err
	}
	defer fh.Close()
	h, err := safetensors.ReadHeader(fh, f.size)
	if err != nil {
		return errorf(ErrInvalid, "load %s: %w", f.abs, err)
	}
	f.header = h
	return nil
}

// readAll reads all of f (a small file: an index) through the file the scan
// checked.
func (f *sourceFile) readAll() ([]byte, error) {
	fh, err := f.open()
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	b, err := io.ReadAll(fh)
	if err != nil {
		return nil, errorf(ErrInvalid, "load %s: %w", f.abs, err)
	}
	return b, nil
}
