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
	r.MustRegister(newStateCollector(d),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// stateCollector reads the store and the mount when scraped.
type stateCollector struct {
	d                                               *daemon
	resident, budget, versions, openFiles, requests *prometheus.Desc
	daemonReads, handleRequests, handleDenials      *prometheus.Desc
}

func newStateCollector(d *daemon) *stateCollector {
	return &stateCollector{
		d: d,
		resident: prometheus.NewDesc("weightfs_resident_bytes",
			"Bytes resident, by tier (host, gpu) and GPU UUID; draining versions included.", []string{"tier", "gpu"}, nil),
		budget: prometheus.NewDesc("weightfs_budget_bytes",
			"Memory budget by tier (0: none).", []string{"tier"}, nil),
		versions: prometheus.NewDesc("weightfs_versions",
			"Model versions, by state (ready, draining).", []string{"state"}, nil),
		openFiles: prometheus.NewDesc("weightfs_open_files",
			"Files open on the mount.", nil, nil),
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
	for _, d := range []*prometheus.Desc{c.resident, c.budget, c.versions, c.openFiles,
		c.requests, c.daemonReads, c.handleRequests, c.handleDenials} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	u := c.d.store.Usage()
	ch <- prometheus.MustNewConstMetric(c.resident, prometheus.GaugeValue, float64(u.HostBytes), "host", "")
	ch <- prometheus.MustNewConstMetric(c.budget, prometheus.GaugeValue, float64(u.HostBudget), "host")
	var gpuBudget int64
	for _, g := range u.GPUs {
		ch <- prometheus.MustNewConstMetric(c.resident, prometheus.GaugeValue, float64(g.Bytes), "gpu", g.UUID)
		gpuBudget = g.Budget
	}
	ch <- prometheus.MustNewConstMetric(c.budget, prometheus.GaugeValue, float64(gpuBudget), "gpu")
	ready, open := 0, 0
	for _, m := range c.d.store.Models() {
		for _, v := range m.Versions() {
			ready++
			open += v.OpenFiles()
		}
	}
	draining := c.d.store.Draining()
	for _, v := range draining {
		open += v.OpenFiles()
	}
	ch <- prometheus.MustNewConstMetric(c.versions, prometheus.GaugeValue, float64(ready), store.StateReady)
	ch <- prometheus.MustNewConstMetric(c.versions, prometheus.GaugeValue, float64(len(draining)), store.StateDraining)
	ch <- prometheus.MustNewConstMetric(c.openFiles, prometheus.GaugeValue, float64(open))
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
