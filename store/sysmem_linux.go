package store

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// SystemMemory is what the machine and the daemon's memory cgroup can still
// give, read before a load commits memory.
type SystemMemory struct {
	// Total and Available are MemTotal and MemAvailable of /proc/meminfo.
	Total, Available int64
	// Cgroup is the memory cgroup whose limit leaves the least room: the
	// daemon's own or an ancestor, cgroup v2 or v1 ("": no limit anywhere).
	Cgroup string
	// CgroupLimit is its limit (memory.max, memory.limit_in_bytes) and
	// CgroupUsed what it holds that cannot simply be dropped: usage less
	// its inactive file cache (the working set, as the kubelet counts it).
	CgroupLimit, CgroupUsed int64
}

// cgroupUnlimited: a v1 limit at or above this is "no limit"
// (PAGE_COUNTER_MAX rounded down to pages).
const cgroupUnlimited = 1 << 62

// ReadSystemMemory reads /proc/meminfo and the daemon's memory cgroups
// (v2: memory.max and memory.current; v1: memory.limit_in_bytes and
// memory.usage_in_bytes), walking up the cgroup path to the tightest limit.
func ReadSystemMemory() (SystemMemory, error) {
	return readSystemMemory("/proc/meminfo", "/proc/self/cgroup", "/proc/self/mountinfo")
}

func readSystemMemory(meminfo, cgroupFile, mountinfo string) (SystemMemory, error) {
	var m SystemMemory
	var err error
	if m.Total, m.Available, err = readMeminfo(meminfo); err != nil {
		return m, err
	}
	cgs, err := os.ReadFile(cgroupFile)
	if err != nil {
		return m, nil // no cgroups: the machine is the only limit
	}
	mounts, err := os.ReadFile(mountinfo)
	if err != nil {
		return m, fmt.Errorf("read %s: %w", mountinfo, err)
	}
	free := int64(-1)
	for _, c := range memoryCgroups(cgs, mounts) {
		for _, l := range c.limits() {
			if f := l.limit - l.used; free < 0 || f < free {
				free, m.Cgroup, m.CgroupLimit, m.CgroupUsed = f, l.dir, l.limit, l.used
			}
		}
	}
	return m, nil
}

// readMeminfo gives MemTotal and MemAvailable in bytes.
func readMeminfo(path string) (total, avail int64, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, fmt.Errorf("read %s: %w", path, err)
	}
	found := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || (f[0] != "MemTotal:" && f[0] != "MemAvailable:") {
			continue
		}
		n, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("%s: %q: %w", path, sc.Text(), err)
		}
		if len(f) > 2 && f[2] == "kB" {
			n <<= 10
		}
		if f[0] == "MemTotal:" {
			total = n
		} else {
			avail = n
		}
		found++
	}
	if found != 2 {
		return 0, 0, errors.New(path + ": no MemTotal and MemAvailable")
	}
	return total, avail, nil
}

// memoryCgroup is the daemon's cgroup in one hierarchy that has the memory
// controller: the directory it is, and the mount point it may walk up to.
type memoryCgroup struct {
	v2        bool
	dir, root string
}

// memoryCgroups finds the daemon's memory cgroups from /proc/self/cgroup
// ("ID:CONTROLLERS:PATH" lines) and /proc/self/mountinfo.
func memoryCgroups(cgroupFile, mountinfo []byte) []memoryCgroup {
	var out []memoryCgroup
	for _, line := range strings.Split(string(cgroupFile), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		v2 := parts[0] == "0" && parts[1] == ""
		if !v2 && !hasWord(parts[1], "memory") {
			continue
		}
		for _, mnt := range cgroupMounts(mountinfo, v2) {
			rel, ok := strings.CutPrefix(parts[2], mnt.fsRoot)
			if mnt.fsRoot == "/" {
				rel, ok = parts[2], true
			}
			dir := mnt.point
			if ok {
				dir = filepath.Join(mnt.point, rel)
			}
			// Outside the mount's view (a container without a cgroup
			// namespace): the mount's top is the daemon's own cgroup.
			if _, err := os.Stat(dir); err != nil {
				dir = mnt.point
			}
			out = append(out, memoryCgroup{v2: v2, dir: dir, root: mnt.point})
		}
	}
	return out
}

type cgroupMount struct{ fsRoot, point string }

// cgroupMounts lists the mounts of the v2 hierarchy, or of the v1 hierarchy
// with the memory controller.
func cgroupMounts(mountinfo []byte, v2 bool) []cgroupMount {
	var out []cgroupMount
	for _, line := range strings.Split(string(mountinfo), "\n") {
		// ID PARENT MAJ:MIN ROOT POINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 3 {
			continue
		}
		if (v2 && g[0] == "cgroup2") || (!v2 && g[0] == "cgroup" && hasWord(g[2], "memory")) {
			out = append(out, cgroupMount{fsRoot: unescapeMount(f[3]), point: unescapeMount(f[4])})
		}
	}
	return out
}

func hasWord(list, w string) bool {
	for _, x := range strings.Split(list, ",") {
		if x == w {
			return true
		}
	}
	return false
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
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

// cgroupLimit is one limited cgroup on the way up.
type cgroupLimit struct {
	dir         string
	limit, used int64
}

// limits are the limits of the cgroup and of each ancestor that counts its
// memory, up to the mount's top (v1: while memory.use_hierarchy is 1).
func (c memoryCgroup) limits() []cgroupLimit {
	var out []cgroupLimit
	for dir := c.dir; ; dir = filepath.Dir(dir) {
		if l, ok := c.read(dir); ok {
			out = append(out, l)
		}
		if dir == c.root || !strings.HasPrefix(dir, c.root) || dir == filepath.Dir(dir) {
			return out
		}
		if !c.v2 && strings.TrimSpace(readString(filepath.Join(filepath.Dir(dir), "memory.use_hierarchy"))) == "0" {
			return out // the parent does not count this cgroup's memory
		}
	}
}

// read gives one cgroup's limit and working set; false without a limit.
func (c memoryCgroup) read(dir string) (cgroupLimit, bool) {
	limitFile, usageFile, inactive := "memory.max", "memory.current", "inactive_file"
	if !c.v2 {
		limitFile, usageFile, inactive = "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"
	}
	limit, err := strconv.ParseInt(strings.TrimSpace(readString(filepath.Join(dir, limitFile))), 10, 64)
	if err != nil || limit >= cgroupUnlimited { // "max", absent (the v2 root), unlimited
		return cgroupLimit{}, false
	}
	used, err := strconv.ParseInt(strings.TrimSpace(readString(filepath.Join(dir, usageFile))), 10, 64)
	if err != nil {
		return cgroupLimit{}, false
	}
	for _, line := range strings.Split(readString(filepath.Join(dir, "memory.stat")), "\n") {
		if k, v, ok := strings.Cut(line, " "); ok && k == inactive {
			if n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64); err == nil && n <= used {
				used -= n
			}
		}
	}
	return cgroupLimit{dir: dir, limit: limit, used: used}, true
}

func readString(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return string(b)
}

// MemoryReserve is the margin a load leaves free below a limit of limit
// bytes (the machine's MemTotal, or a memory cgroup's limit).
type MemoryReserve func(limit int64) int64

// DefaultMemoryReserve keeps the larger of 1 GiB and 5 % of the limit free.
//
// The margin is for what the daemon cannot count but the kernel does: the
// daemon's own heap, stacks and FUSE buffers; a CUDA context's host memory
// with --gpu (a few hundred MiB per GPU); page tables of engines mapping the
// images; the page cache the loads read through; and the short-lived
// allocations of the processes that share the machine or the cgroup. 1 GiB
// covers the first of these on any machine; 5 % keeps a large machine clear
// of the point where the kernel reclaims hard and compaction (which huge
// pages need) stalls, and is in the range of the memory kept for the system
// on Kubernetes nodes. What engines themselves need is not a margin's job:
// --host-memory budgets the daemon against them.
func DefaultMemoryReserve(limit int64) int64 { return max(1<<30, limit/20) }

// ParseMemoryReserve reads a margin: "" for the default, a size ("2Gi", "0")
// or a percentage of each limit ("10%").
func ParseMemoryReserve(s string) (MemoryReserve, error) {
	s = strings.TrimSpace(s)
	switch {
	case s == "":
		return DefaultMemoryReserve, nil
	case s == "0":
		return func(int64) int64 { return 0 }, nil
	case strings.HasSuffix(s, "%"):
		const scale = 1 << 20
		frac, err := ParseSize(s, scale)
		if err != nil {
			return nil, err
		}
		return func(limit int64) int64 { return int64(float64(limit) * float64(frac) / scale) }, nil
	}
	n, err := ParseSize(s, 0)
	if err != nil {
		return nil, err
	}
	return func(int64) int64 { return n }, nil
}
