package control

import (
	"io"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

func TestBuild(t *testing.T) {
	for _, c := range []struct {
		stamp, want string
	}{{"", "dev"}, {"v1.2.3-4-gabcdef", "v1.2.3-4-gabcdef"}} {
		b := BuildOf(c.stamp)
		if b.Version != c.want || !strings.Contains(b.Go, runtime.Version()) || b.Module == "" {
			t.Errorf("BuildOf(%q) = %+v", c.stamp, b)
		}
	}
	for _, c := range []struct {
		b    Build
		want []string
	}{
		{Build{Version: "abc", Module: "m v0", Go: "go1 linux/amd64"},
			[]string{"weightfs abc\n", "module:  m v0\n", "commit:  unknown (built without VCS stamping)\n", "go:      go1 linux/amd64\n"}},
		{Build{Version: "abc", Commit: "1234 2026-01-01T00:00:00Z", Dirty: true},
			[]string{"commit:  1234 2026-01-01T00:00:00Z (dirty)\n"}},
	} {
		s := c.b.String()
		for _, w := range c.want {
			if !strings.Contains(s, w) {
				t.Errorf("%+v.String() = %q, want it to contain %q", c.b, s, w)
			}
		}
	}
}

func TestMetricsHandler(t *testing.T) {
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "weightfs_test_total", Help: "A test counter."})
	c.Add(3)
	rec := httptest.NewRecorder()
	MetricsHandler(c).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Result().Body)
	for _, want := range []string{"weightfs_test_total 3", "go_goroutines", "process_"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}
