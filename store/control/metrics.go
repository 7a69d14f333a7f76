package control

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics count what the control API does.
type metrics struct {
	loads       *prometheus.CounterVec
	loadSeconds prometheus.Histogram
	errors      *prometheus.CounterVec
	pushes      *prometheus.CounterVec
	pushBytes   prometheus.Counter
}

func newMetrics() *metrics {
	m := &metrics{
		loads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weightfs_loads_total", Help: "Model loads, by result (ok, error, cancelled).",
		}, []string{"result"}),
		loadSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "weightfs_load_seconds", Help: "Time to load a model version (successful loads).",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 16),
		}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "weightfs_errors_total", Help: "Errors, by kind (load, unload, rollback, verify, gpu).",
		}, []string{"kind"}),
	}
	m.pushes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "weightfs_pushes_total", Help: "Pushes, by result (ok, error, cancelled, aborted).",
	}, []string{"result"})
	m.pushBytes = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "weightfs_pushed_bytes_total", Help: "Tensor bytes of the pushes committed.",
	})
	for _, result := range []string{"ok", "error", "cancelled", "aborted"} {
		m.pushes.WithLabelValues(result)
	}
	for _, kind := range []string{"load", "unload", "rollback", "verify", "gpu"} {
		m.errors.WithLabelValues(kind)
	}
	m.loads.WithLabelValues("ok")
	m.loads.WithLabelValues("error")
	m.loads.WithLabelValues("cancelled")
	return m
}

func (m *metrics) observeLoad(d time.Duration, err error) {
	if errors.Is(err, context.Canceled) { // not an error: someone asked for it
		m.loads.WithLabelValues("cancelled").Inc()
		return
	}
	if err != nil {
		m.loads.WithLabelValues("error").Inc()
		m.errors.WithLabelValues("load").Inc()
		return
	}
	m.loads.WithLabelValues("ok").Inc()
	m.loadSeconds.Observe(d.Seconds())
}

// Collectors are the server's Prometheus metrics, to register beside the
// store's and the mount's.
func (s *Server) Collectors() []prometheus.Collector {
	return []prometheus.Collector{s.metrics.loads, s.metrics.loadSeconds, s.metrics.errors, s.metrics.pushes, s.metrics.pushBytes}
}

// MetricsHandler serves the given collectors, with the Go and process
// collectors, in the Prometheus text format.
func MetricsHandler(cs ...prometheus.Collector) http.Handler {
	r := prometheus.NewRegistry()
	r.MustRegister(append(cs, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))...)
	return promhttp.HandlerFor(r, promhttp.HandlerOpts{})
}
