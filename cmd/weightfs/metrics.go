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
	r.MustRegister(newStateCollector(d), d.srv.Collector(),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// stateCollector reads the store when scraped; the mount's figures come
// from its own collector.
type stateCollector struct {
	d                                     *daemon
	resident, budget, versions, openFiles *prometheus.Desc
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
	}
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.resident, c.budget, c.versions, c.openFiles} {
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
}

// daemon is what the metrics read: the store and the mount.
type daemon struct {
	store   *store.Store
	srv     *wfs.Server
	control *control.Server
}
