package main

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/weightfs/weightfs/store"
)

// metrics are the daemon's Prometheus metrics, on a registry of its own.
type metrics struct {
	registry    *prometheus.Registry
	loads       *prometheus.CounterVec
	loadSeconds prometheus.Histogram
	errors      *prometheus.CounterVec
}

func newMetrics() *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		loads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weightfs_loads_total", Help: "Model loads, by result (ok, error).",
		}, []string{"result"}),
		loadSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "weightfs_load_seconds", Help: "Time to load a model version (successful loads).",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 16),
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weightfs_errors_total", Help: "Errors, by kind (load, unload, verify, gpu).",
		}, []string{"kind"}),
	}
	for _, kind := range []string{"load", "unload", "verify", "gpu"} {
		m.errors.WithLabelValues(kind)
	}
	m.loads.WithLabelValues("ok")
	m.loads.WithLabelValues("error")
	m.registry.MustRegister(m.loads, m.loadSeconds, m.errors,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *metrics) observeLoad(d time.Duration, err error) {
	if err != nil {
		m.loads.WithLabelValues("error").Inc()
		m.errors.WithLabelValues("load").Inc()
		return
	}
	m.loads.WithLabelValues("ok").Inc()
	m.loadSeconds.Observe(d.Seconds())
}

// watch adds the figures read from the store and the mount at each scrape.
func (m *metrics) watch(d *daemon) {
	m.registry.MustRegister(newStateCollector(d), d.srv.Collector())
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.registry, promhttp.HandlerOpts{})
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
