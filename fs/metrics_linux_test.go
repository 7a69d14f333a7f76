package fs

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestCollector(t *testing.T) {
	s := &Server{m: newMount(newStore(t), Options{}, quiet)}
	c := &s.m.counters
	c.ops[opLookup].Add(3)
	c.ops[opRead].Add(2)
	c.ops[opIoctl].Add(1)
	c.reads.Add(2)
	c.handleRequests.Add(5)
	c.handleDenials.Add(1)
	const want = `
# HELP weightfs_daemon_reads_total READ requests that reached the daemon (0 under passthrough).
# TYPE weightfs_daemon_reads_total counter
weightfs_daemon_reads_total 2
# HELP weightfs_fuse_requests_total FUSE requests that reached the daemon, by type.
# TYPE weightfs_fuse_requests_total counter
weightfs_fuse_requests_total{type="getattr"} 0
weightfs_fuse_requests_total{type="getxattr"} 0
weightfs_fuse_requests_total{type="ioctl"} 1
weightfs_fuse_requests_total{type="listxattr"} 0
weightfs_fuse_requests_total{type="lookup"} 3
weightfs_fuse_requests_total{type="open"} 0
weightfs_fuse_requests_total{type="read"} 2
weightfs_fuse_requests_total{type="readdir"} 0
weightfs_fuse_requests_total{type="readlink"} 0
weightfs_fuse_requests_total{type="statfs"} 0
# HELP weightfs_handle_denials_total Requests for CUDA handles refused for lack of permission.
# TYPE weightfs_handle_denials_total counter
weightfs_handle_denials_total 1
# HELP weightfs_handle_requests_total Requests for CUDA handles (xattr and ioctl).
# TYPE weightfs_handle_requests_total counter
weightfs_handle_requests_total 5
`
	if err := testutil.CollectAndCompare(s.Collector(), strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	if n := testutil.CollectAndCount(s.Collector()); n != opCount+3 {
		t.Errorf("%d metrics, want %d", n, opCount+3)
	}
	if problems, err := testutil.CollectAndLint(s.Collector()); err != nil || len(problems) != 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
	// Later counts show at the next scrape; the collector registers cleanly.
	c.reads.Add(1)
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(s.Collector()); err != nil {
		t.Fatal(err)
	}
	if n, err := testutil.GatherAndCount(reg, "weightfs_daemon_reads_total"); err != nil || n != 1 {
		t.Errorf("gather: %d, %v", n, err)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP weightfs_daemon_reads_total READ requests that reached the daemon (0 under passthrough).
# TYPE weightfs_daemon_reads_total counter
weightfs_daemon_reads_total 3
`), "weightfs_daemon_reads_total"); err != nil {
		t.Error(err)
	}
}
