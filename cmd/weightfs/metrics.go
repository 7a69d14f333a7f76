package main

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	wfs "github.com/weightfs/weightfs/fs"
	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/control"
)

// newRegistry gathers the daemon's Prometheus metrics: the control server's,
// the store's and the mount's, with the Go and process collectors.
func newRegistry(d *daemon) *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(d.control.Collectors()...)
	r.MustRegister(d.store.Collector(), newStateCollector(d),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// stateCollector reads the mount when scraped.
type stateCollector struct {
	d                                                    *daemon
	requests, daemonReads, handleRequests, handleDenials *prometheus.Desc
}

func newStateCollector(d *daemon) *stateCollector {
	return &stateCollector{
		d: d,
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

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.requests, c.daemonReads, c.handleRequests, c.handleDenials} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	cnt := c.d.srv.Counters()
	for op, n := range cnt.Requests {
		ch <- prometheus.MustNewConstMetric(c.requests, prometheus.CounterValue, float64(n), op)
	}
	ch <- prometheus.MustNewConstMetric(c.daemonReads, prometheus.CounterValue, float64(cnt.DaemonReads))
	ch <- prometheus.MustNewConstMetric(c.handleRequests, prometheus.CounterValue, float64(cnt.HandleRequests))
	ch <- prometheus.MustNewConstMetric(c.handleDenials, prometheus.CounterValue, float64(cnt.HandleDenials))
}

// daemon is what the metrics read: the store and the mount.
type daemon struct {
	store   *store.Store
	srv     *wfs.Server
	control *control.Server
}
