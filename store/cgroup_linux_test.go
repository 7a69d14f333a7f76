package store

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// cgroupChildEnv tells a re-executed test binary that it is the process
// inside the test's memory cgroup, and which cgroup that is.
const cgroupChildEnv = "WEIGHTFS_TEST_CGROUP"

// makeMemoryCgroup creates a memory cgroup limited to limit bytes, below the
// test's own v1 memory cgroup or at the top of the v2 hierarchy, and gives
// its directory and the file that moves a process into it. It skips where
// cgroups cannot be created.
func makeMemoryCgroup(t *testing.T, limit int64) (dir, procs string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("creating a memory cgroup needs root")
	}
	cgs, err1 := os.ReadFile("/proc/self/cgroup")
	mounts, err2 := os.ReadFile("/proc/self/mountinfo")
	if err := errors.Join(err1, err2); err != nil {
		t.Skipf("no cgroups here: %v", err)
	}
	name := fmt.Sprintf("weightfs-test-%d", os.Getpid())
	var tried []string
	for _, c := range memoryCgroups(cgs, mounts) {
		parent, limitFile := c.dir, "memory.limit_in_bytes"
		if c.v2 {
			// A v2 cgroup with processes cannot give controllers to
			// children; the top of the hierarchy can.
			parent, limitFile = c.root, "memory.max"
			if !hasWord(strings.ReplaceAll(readString(filepath.Join(parent, "cgroup.subtree_control")), " ", ","), "memory") {
				tried = append(tried, parent+": memory controller not enabled for children")
				continue
			}
		}
		dir = filepath.Join(parent, name)
		if err := os.Mkdir(dir, 0o755); err != nil {
			tried = append(tried, err.Error())
			continue
		}
		t.Cleanup(func() {
			// Its process has exited; the memory it charged moves up.
			for i := 0; i < 50 && os.Remove(dir) != nil; i++ {
				time.Sleep(20 * time.Millisecond)
			}
		})
		if err := os.WriteFile(filepath.Join(dir, limitFile), []byte(strconv.FormatInt(limit, 10)), 0); err != nil {
			tried = append(tried, err.Error())
			continue
		}
		return dir, filepath.Join(dir, "cgroup.procs")
	}
	t.Skipf("cannot create a memory cgroup here: %s", strings.Join(tried, "; "))
	return "", ""
}

// sparseModel writes a model folder with a weights file of size bytes of
// data that takes no disk space (a hole reads as zeros).
func sparseModel(t *testing.T, size int64) string {
	t.Helper()
	dir := t.TempDir()
	header := fmt.Sprintf(`{"w":{"dtype":"U8","shape":[%d],"data_offsets":[0,%d]}}`, size, size)
	for len(header)%8 != 0 {
		header += " "
	}
	f, err := os.Create(filepath.Join(dir, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := binary.Write(f, binary.LittleEndian, uint64(len(header))); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(header); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(8 + int64(len(header)) + size); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// cgroupOutcome is what the process inside the cgroup reports.
type cgroupOutcome struct {
	Reading        SystemMemory
	SmallErr       string
	BigErr         string
	Budget         *BudgetError
	HostBytesAfter int64
}

// TestCgroupRefusal: a process in a memory cgroup of 96 MiB loads 16 MiB,
// then is refused 128 MiB with the cgroup's numbers, instead of being
// OOM-killed (as the daemon was before, or a bystander in its cgroup). The
// test binary re-executes itself into a real cgroup it creates.
func TestCgroupRefusal(t *testing.T) {
	const mib = 1 << 20
	if dir := os.Getenv(cgroupChildEnv); dir != "" {
		cgroupChild(t, dir)
		return
	}
	dir, procs := makeMemoryCgroup(t, 96*mib)
	small, big := sparseModel(t, 16*mib), sparseModel(t, 128*mib)
	out := filepath.Join(t.TempDir(), "outcome.json")
	cmd := exec.Command(os.Args[0], "-test.run=^TestCgroupRefusal$", "-test.v")
	cmd.Env = append(os.Environ(), cgroupChildEnv+"="+dir, "WEIGHTFS_TEST_SMALL="+small,
		"WEIGHTFS_TEST_BIG="+big, "WEIGHTFS_TEST_OUT="+out, "WEIGHTFS_TEST_PROCS="+procs)
	b, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the process in the cgroup failed (%v); a kill here is the OOM killer:\n%s", err, b)
	}
	raw, err := os.ReadFile(out)
	if err != nil {
		t.Fatalf("no outcome from the process in the cgroup: %v\n%s", err, b)
	}
	var o cgroupOutcome
	if err := json.Unmarshal(raw, &o); err != nil {
		t.Fatal(err)
	}
	t.Logf("inside %s: reading %+v; big: %s", dir, o.Reading, o.BigErr)
	if o.Reading.Cgroup != dir || o.Reading.CgroupLimit != 96*mib {
		t.Errorf("the process read %+v; want the cgroup %s limited to 96 MiB", o.Reading, dir)
	}
	if o.SmallErr != "" {
		t.Errorf("16 MiB in a 96 MiB cgroup was refused: %s", o.SmallErr)
	}
	be := o.Budget
	if be == nil {
		t.Fatalf("128 MiB in a 96 MiB cgroup: %q; want a *BudgetError", o.BigErr)
	}
	if be.Tier != TierSystem || be.Cgroup != dir || be.Budget != 96*mib || be.Reserve != 8*mib ||
		be.Need < 128*mib || be.Free >= be.Need || be.Free > 96*mib-8*mib-o.HostBytesAfter {
		t.Errorf("refusal %+v; want the cgroup's numbers", be)
	}
}

// cgroupChild runs inside the cgroup: it moves itself in, loads, and writes
// what happened.
func cgroupChild(t *testing.T, dir string) {
	if err := os.WriteFile(os.Getenv("WEIGHTFS_TEST_PROCS"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
		t.Fatalf("join %s: %v", dir, err)
	}
	s := New(OpenMemfdArena(), Options{MemoryReserve: func(int64) int64 { return 8 << 20 }})
	defer s.Close()
	var o cgroupOutcome
	var err error
	if o.Reading, err = ReadSystemMemory(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Load(context.Background(), "small", os.Getenv("WEIGHTFS_TEST_SMALL"), LoadOptions{}); err != nil {
		o.SmallErr = err.Error()
	}
	o.HostBytesAfter = s.Usage().HostBytes
	_, err = s.Load(context.Background(), "big", os.Getenv("WEIGHTFS_TEST_BIG"), LoadOptions{})
	if err != nil {
		o.BigErr = err.Error()
	}
	errors.As(err, &o.Budget)
	b, _ := json.Marshal(o)
	if err := os.WriteFile(os.Getenv("WEIGHTFS_TEST_OUT"), b, 0o644); err != nil {
		t.Fatal(err)
	}
}
