package fs

import "github.com/prometheus/client_golang/prometheus"

// collector reports a mount's counters when scraped.
type collector struct {
	s                                                    *Server
	requests, daemonReads, handleRequests, handleDenials *prometheus.Desc
}

var _ prometheus.Collector = (*collector)(nil)

// Collector returns a Prometheus collector of what the mount counts:
// weightfs_fuse_requests_total{type}, weightfs_daemon_reads_total,
// weightfs_handle_requests_total and weightfs_handle_denials_total.
func (s *Server) Collector() prometheus.Collector {
	return &collector{
		s: s,
		requests: prometheus.NewDesc("weightfs_fuse_requests_total",
			"FUSE requests that reached the daemon, by type.", []string{"type"}, nil),
		daemonReads: prometheus.NewDesc("weightfs_daemon_reads_total",
			"READ requests that reached the daemon (0 under passthrough).", nil, nil),
		handleRequests: prometheus.NewDesc("weightfs_handle_requests_total",
			"Requests for CUDA handles (xattr and ioctl).", nil, nil),
		handleDenials: prometheus.NewDesc("weightfs_handle_denials_total",
			"Requests for CUDA handles refused for lack of permission.", nil, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.requests
	ch <- c.daemonReads
	ch <- c.handleRequests
	ch <- c.handleDenials
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	cnt := &c.s.m.counters
	for i, name := range opNames {
		ch <- prometheus.MustNewConstMetric(c.requests, prometheus.CounterValue, float64(cnt.ops[i].Load()), name)
	}
	ch <- prometheus.MustNewConstMetric(c.daemonReads, prometheus.CounterValue, float64(cnt.reads.Load()))
	ch <- prometheus.MustNewConstMetric(c.handleRequests, prometheus.CounterValue, float64(cnt.handleRequests.Load()))
	ch <- prometheus.MustNewConstMetric(c.handleDenials, prometheus.CounterValue, float64(cnt.handleDenials.Load()))
}
