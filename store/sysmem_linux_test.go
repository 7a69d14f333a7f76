package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeFiles writes name → content under a temporary folder and gives its path.
func fakeFiles(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for name, content := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

const fakeMeminfo = "MemTotal:       16000000 kB\nMemFree:         1000 kB\nMemAvailable:    8000000 kB\nShmem: 10 kB\n"

// TestReadSystemMemoryV1: the tightest v1 limit along the path wins, the
// inactive file cache does not count as used, and a parent that does not
// use the hierarchy ends the walk.
func TestReadSystemMemoryV1(t *testing.T) {
	root := fakeFiles(t, map[string]string{
		"meminfo":                             fakeMeminfo,
		"cg/memory.limit_in_bytes":            "9223372036854771712\n",
		"cg/memory.usage_in_bytes":            "100\n",
		"cg/a/memory.use_hierarchy":           "1\n",
		"cg/a/memory.limit_in_bytes":          fmt.Sprint(4 << 30),
		"cg/a/memory.usage_in_bytes":          fmt.Sprint(3 << 30),
		"cg/a/memory.stat":                    "cache 5\ntotal_inactive_file 1073741824\n",
		"cg/a/b/memory.use_hierarchy":         "1\n",
		"cg/a/b/memory.limit_in_bytes":        fmt.Sprint(8 << 30),
		"cg/a/b/memory.usage_in_bytes":        fmt.Sprint(2 << 30),
		"cg/a/b/memory.stat":                  "total_inactive_file 0\n",
		"cg/a/b/daemon/memory.limit_in_bytes": "9223372036854771712\n",
		"cg/a/b/daemon/memory.usage_in_bytes": "4096\n",
	})
	cg := filepath.Join(root, "cg")
	write := func(name, content string) string {
		p := filepath.Join(root, name)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cgroupFile := write("cgroup", "12:pids:/x\n4:cpu,memory:/a/b/daemon\n0::/\n")
	mountinfo := write("mountinfo",
		"30 25 0:26 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"+
			"31 25 0:27 / "+cg+" rw,nosuid shared:9 - cgroup cgroup rw,cpu,memory\n")
	m, err := readSystemMemory(filepath.Join(root, "meminfo"), cgroupFile, mountinfo)
	if err != nil {
		t.Fatal(err)
	}
	// a: 4 GiB − (3 GiB − 1 GiB inactive) = 2 GiB free; a/b: 8 − 2 = 6 GiB.
	want := SystemMemory{Total: 16000000 << 10, Available: 8000000 << 10,
		Cgroup: filepath.Join(cg, "a"), CgroupLimit: 4 << 30, CgroupUsed: 2 << 30}
	if m != want {
		t.Errorf("read %+v, want %+v", m, want)
	}

	// A parent that does not use the hierarchy does not limit its child.
	write("cg/a/memory.use_hierarchy", "0\n")
	if m, err = readSystemMemory(filepath.Join(root, "meminfo"), cgroupFile, mountinfo); err != nil || m.Cgroup != filepath.Join(cg, "a", "b") {
		t.Errorf("with a/memory.use_hierarchy 0: %+v, %v; want a/b", m, err)
	}

	// A container without a cgroup namespace: the mount's root is the
	// daemon's cgroup, seen under the host's path.
	mountinfo = write("mountinfo", "31 25 0:27 /a/b/daemon "+filepath.Join(cg, "a", "b")+" rw - cgroup cgroup rw,memory\n")
	if m, err = readSystemMemory(filepath.Join(root, "meminfo"), cgroupFile, mountinfo); err != nil || m.Cgroup != filepath.Join(cg, "a", "b") {
		t.Errorf("container view: %+v, %v; want the mount's top", m, err)
	}
	write("cgroup", "4:memory:/elsewhere\n")
	if m, err = readSystemMemory(filepath.Join(root, "meminfo"), cgroupFile, mountinfo); err != nil || m.Cgroup != filepath.Join(cg, "a", "b") {
		t.Errorf("a path outside the mount's view: %+v, %v; want the mount's top", m, err)
	}
}

// TestReadSystemMemoryV2: memory.max along the path, "max" is no limit, the
// root (no memory.max) ends the walk; a mount point with a space.
func TestReadSystemMemoryV2(t *testing.T) {
	root := fakeFiles(t, map[string]string{
		"meminfo":                            fakeMeminfo,
		"cg 2/cgroup.controllers":            "cpu memory\n",
		"cg 2/k8s/memory.max":                fmt.Sprint(10 << 30),
		"cg 2/k8s/memory.current":            fmt.Sprint(9 << 30),
		"cg 2/k8s/memory.stat":               "anon 1\ninactive_file 536870912\nactive_file 9\n",
		"cg 2/k8s/pod/memory.max":            "max\n",
		"cg 2/k8s/pod/memory.current":        "1\n",
		"cg 2/k8s/pod/daemon/memory.max":     fmt.Sprint(2 << 30),
		"cg 2/k8s/pod/daemon/memory.current": fmt.Sprint(1 << 30),
		"cgroup":                             "0::/k8s/pod/daemon\n",
	})
	cg := filepath.Join(root, "cg 2")
	mountinfo := filepath.Join(root, "mountinfo")
	if err := os.WriteFile(mountinfo, []byte("29 23 0:25 / "+strings.ReplaceAll(cg, " ", `\040`)+" rw shared:4 - cgroup2 cgroup2 rw\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := readSystemMemory(filepath.Join(root, "meminfo"), filepath.Join(root, "cgroup"), mountinfo)
	if err != nil {
		t.Fatal(err)
	}
	// k8s: 10 − (9 − 0.5) = 1.5 GiB free; daemon: 2 − 1 = 1 GiB: daemon wins.
	if m.Cgroup != filepath.Join(cg, "k8s/pod/daemon") || m.CgroupLimit != 2<<30 || m.CgroupUsed != 1<<30 {
		t.Errorf("read %+v; want the daemon's own cgroup, 2 GiB limit, 1 GiB used", m)
	}
	if err := os.WriteFile(filepath.Join(cg, "k8s/memory.current"), []byte(fmt.Sprint(10<<30)), 0o644); err != nil {
		t.Fatal(err)
	}
	if m, _ = readSystemMemory(filepath.Join(root, "meminfo"), filepath.Join(root, "cgroup"), mountinfo); m.Cgroup != filepath.Join(cg, "k8s") || m.CgroupUsed != 10<<30-512<<20 {
		t.Errorf("with k8s nearly full: %+v; want k8s", m)
	}
}

func TestReadSystemMemoryErrors(t *testing.T) {
	root := fakeFiles(t, map[string]string{"meminfo": fakeMeminfo, "bad": "MemTotal: x kB\nMemAvailable: 1 kB\n", "short": "MemTotal: 1 kB\n"})
	for _, name := range []string{"missing", "bad", "short"} {
		if _, err := readSystemMemory(filepath.Join(root, name), "/proc/self/cgroup", "/proc/self/mountinfo"); err == nil {
			t.Errorf("meminfo %s: no error", name)
		}
	}
	// No cgroup file: the machine alone.
	m, err := readSystemMemory(filepath.Join(root, "meminfo"), filepath.Join(root, "none"), filepath.Join(root, "none"))
	if err != nil || m.Cgroup != "" || m.Total != 16000000<<10 {
		t.Errorf("without cgroups: %+v, %v", m, err)
	}
	if _, err := readSystemMemory(filepath.Join(root, "meminfo"), "/proc/self/cgroup", filepath.Join(root, "none")); err == nil {
		t.Error("no mountinfo: no error")
	}
	// This machine's own figures are sane.
	m, err = ReadSystemMemory()
	if err != nil || m.Total <= 0 || m.Available <= 0 || m.Available > m.Total {
		t.Errorf("ReadSystemMemory: %+v, %v", m, err)
	}
	if m.Cgroup != "" && (m.CgroupLimit <= 0 || m.CgroupUsed < 0) {
		t.Errorf("ReadSystemMemory: cgroup %+v", m)
	}
	t.Logf("this machine: %+v", m)
}

func TestParseMemoryReserve(t *testing.T) {
	for _, c := range []struct {
		in          string
		limit, want int64
	}{
		{"", 4 << 30, 1 << 30},
		{"", 100 << 30, 5 << 30},
		{"0", 100 << 30, 0},
		{"512Mi", 100 << 30, 512 << 20},
		{"10%", 20 << 30, 2 << 30},
	} {
		r, err := ParseMemoryReserve(c.in)
		if err != nil {
			t.Errorf("%q: %v", c.in, err)
			continue
		}
		if got := r(c.limit); got < c.want-c.want/1000 || got > c.want {
			t.Errorf("reserve %q of %d = %d, want %d", c.in, c.limit, got, c.want)
		}
	}
	for _, bad := range []string{"lots", "-1Gi", "200%"} {
		if _, err := ParseMemoryReserve(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestSystemAdmission: a load the machine or the memory cgroup cannot give
// with the reserve kept free is refused before anything is read, with the
// numbers; memory promised to a load in progress counts as taken.
func TestSystemAdmission(t *testing.T) {
	const mib = 1 << 20
	reading := SystemMemory{Total: 64 << 30, Available: 32 << 30, Cgroup: "/sys/fs/cgroup/memory/weightfs",
		CgroupLimit: 100 * mib, CgroupUsed: 40 * mib}
	var readErr error
	s := New(OpenMemfdArena(), Options{
		SystemMemory:  func() (SystemMemory, error) { return reading, readErr },
		MemoryReserve: func(int64) int64 { return 10 * mib },
	})
	t.Cleanup(func() { s.Close() })
	small, big := writeFolder(t, 8*mib), writeFolder(t, 60*mib)
	v := load(t, s, "small", small)
	reading.CgroupUsed += v.HostBytes() // what the kernel now counts

	_, err := s.Load(context.Background(), "big", big, LoadOptions{})
	var be *BudgetError
	if !errors.As(err, &be) || !errors.Is(err, ErrNoMemory) {
		t.Fatalf("a load beyond the cgroup: %v; want a *BudgetError", err)
	}
	free := 100*mib - reading.CgroupUsed - 10*mib
	want := BudgetError{Model: "big", Source: big, Tier: TierSystem, Need: dirCost(t, s, big), Free: free,
		Budget: 100 * mib, Reserve: 10 * mib, Cgroup: reading.Cgroup}
	if *be != want {
		t.Errorf("refusal %+v, want %+v", *be, want)
	}
	for _, w := range []string{"needs 60.0 MiB of host memory", "memory cgroup /sys/fs/cgroup/memory/weightfs can give only", "reserve of 10.0 MiB"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("%q does not say %q", err, w)
		}
	}
	if strings.Contains(err.Error(), "--") {
		t.Errorf("the store names a flag: %v", err)
	}
	if s.Model("big") != nil || s.Usage().HostReserved != 0 || s.Usage().HostBytes != v.HostBytes() {
		t.Errorf("a refused load left something behind: %+v", s.Usage())
	}

	// The machine is the tighter one.
	reading.CgroupLimit = 1 << 40
	reading.Available = 50 * mib
	_, err = s.Load(context.Background(), "big", big, LoadOptions{})
	if !errors.As(err, &be) || be.Cgroup != "" || be.Budget != 64<<30 || be.Free != 40*mib || !strings.Contains(err.Error(), "the machine can give only 40.0 MiB") {
		t.Errorf("a load beyond MemAvailable: %v (%+v)", err, be)
	}

	// Room for it: admitted.
	reading.Available = 1 << 30
	load(t, s, "big", big)

	// A reservation not yet allocated counts as taken: with 30 MiB
	// promised to a load in progress, 35 MiB more does not fit in 60.
	reading.Available = 60*mib + 10*mib
	release, err := s.reserve("other", "/src", 30*mib, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.reserve("third", "/src", 35*mib, 0); !errors.As(err, &be) || be.Free != 30*mib {
		t.Errorf("reserve beside a pending one: %v (%+v); want 30 MiB free", err, be)
	}
	release()
	if r, err := s.reserve("third", "/src", 35*mib, 0); err != nil {
		t.Errorf("reserve once the other is released: %v", err)
	} else {
		r()
	}

	// Readings that fail admit the load by the budgets alone.
	readErr = errors.New("no /proc")
	reading.Available = 0
	if r, err := s.reserve("third", "/src", 25*mib, 0); err != nil {
		t.Errorf("reserve without readings: %v", err)
	} else {
		r()
	}
}

// TestSystemAdmissionDefault: with no options, the store reads this machine
// and keeps the default reserve: a load of more than the machine has is
// refused, naming the machine or the cgroup.
func TestSystemAdmissionDefault(t *testing.T) {
	s := newTestStore(t, Budgets{})
	m, err := ReadSystemMemory()
	if err != nil {
		t.Skipf("no readings here: %v", err)
	}
	_, err = s.reserve("huge", "/src", m.Total, 0)
	var be *BudgetError
	if !errors.As(err, &be) || be.Tier != TierSystem || be.Reserve < 1<<30 {
		t.Fatalf("reserving all of the machine's %d bytes: %v", m.Total, err)
	}
	if r, err := s.reserve("tiny", "/src", 4096, 0); err != nil && m.Available > 2<<30 {
		t.Errorf("reserving 4 KiB: %v", err)
	} else if err == nil {
		r()
	}
}
