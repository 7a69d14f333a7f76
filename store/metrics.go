package store

import "github.com/prometheus/client_golang/prometheus"

// collector reports what the store holds when scraped. Collecting reads the
// store and frees nothing.
type collector struct {
	s                                     *Store
	resident, budget, versions, openFiles *prometheus.Desc
	snapshots, snapshotBytes              *prometheus.Desc
	tierMoves                             *prometheus.Desc
}

// Collector is the store's Prometheus collector: resident bytes and budgets
// by tier, versions by state and open files.
func (s *Store) Collector() prometheus.Collector {
	return &collector{
		s: s,
		resident: prometheus.NewDesc("weightfs_resident_bytes",
			"Bytes resident, by tier (host, gpu) and GPU UUID; draining versions included.", []string{"tier", "gpu"}, nil),
		budget: prometheus.NewDesc("weightfs_budget_bytes",
			"Memory budget by tier (0: none).", []string{"tier"}, nil),
		versions: prometheus.NewDesc("weightfs_versions",
			"Model versions, by state (ready, draining).", []string{"state"}, nil),
		openFiles: prometheus.NewDesc("weightfs_open_files",
			"Files open on the mount.", nil, nil),
		snapshots: prometheus.NewDesc("weightfs_snapshots_total",
			"Snapshots of pushed versions to --snapshot-dir, by result (written, failed); only with --snapshot-dir.", []string{"result"}, nil),
		snapshotBytes: prometheus.NewDesc("weightfs_snapshot_written_bytes_total",
			"Bytes written to --snapshot-dir by snapshots; only with --snapshot-dir.", nil, nil),
		tierMoves: prometheus.NewDesc("weightfs_tier_moves_total",
			"Versions moved between memory tiers (from, to), by eviction or restore.", []string{"from", "to"}, nil),
	}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.resident
	ch <- c.budget
	ch <- c.versions
	ch <- c.openFiles
	ch <- c.snapshots
	ch <- c.snapshotBytes
	ch <- c.tierMoves
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	u := c.s.Usage()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	gauge(c.resident, float64(u.HostBytes), TierHost, "")
	gauge(c.budget, float64(u.HostBudget), TierHost)
	for _, g := range u.GPUs {
		gauge(c.resident, float64(g.Bytes), TierGPU, g.UUID)
	}
	c.s.mu.RLock()
	gauge(c.budget, float64(c.s.budgets.GPU), TierGPU)
	c.s.mu.RUnlock()
	ready, open := 0, 0
	for _, m := range c.s.Models() {
		for _, v := range m.Versions() {
			ready++
			open += v.OpenFiles()
		}
	}
	draining := c.s.Draining()
	for _, v := range draining {
		open += v.OpenFiles()
	}
	gauge(c.versions, float64(ready), StateReady)
	gauge(c.versions, float64(len(draining)), StateDraining)
	gauge(c.openFiles, float64(open))
	if c.s.compressIdle || c.s.moveCompress.Load() > 0 {
		ch <- prometheus.MustNewConstMetric(c.tierMoves, prometheus.CounterValue, float64(c.s.moveCompress.Load()), TierHost, TierCompressed)
		ch <- prometheus.MustNewConstMetric(c.tierMoves, prometheus.CounterValue, float64(c.s.moveRestore.Load()), TierCompressed, TierHost)
		ch <- prometheus.MustNewConstMetric(c.tierMoves, prometheus.CounterValue, float64(c.s.moveGPU.Load()), TierGPUReplica, TierHost)
		ch <- prometheus.MustNewConstMetric(c.tierMoves, prometheus.CounterValue, float64(c.s.moveDrop.Load()), TierCompressed, TierDropped)
		if c.s.snap != nil {
			ch <- prometheus.MustNewConstMetric(c.tierMoves, prometheus.CounterValue, float64(c.s.moveSnapshot.Load()), TierCompressed, TierSnapshot)
			ch <- prometheus.MustNewConstMetric(c.tierMoves, prometheus.CounterValue, float64(c.s.restoreSnapshot.Load()), TierSnapshot, TierHost)
		}
	}
	if c.s.snap != nil {
		counter := func(d *prometheus.Desc, v int64, labels ...string) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
		}
		counter(c.snapshots, c.s.snapWritten.Load(), "written")
		counter(c.snapshots, c.s.snapFailed.Load(), "failed")
		counter(c.snapshotBytes, c.s.snapBytes.Load())
	}
}
