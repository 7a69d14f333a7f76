package control

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/safetensors"
)

// The control API in process, without root: a real store on memfds, the real
// handler served on a Unix socket, the real client.

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// socketPath is a fresh socket path, short enough for sun_path whatever the
// test's name.
func socketPath(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "wfsctl-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "control.sock")
}

// serve serves h on a fresh socket until the test ends and returns the socket.
func serve(t *testing.T, h http.Handler) string {
	t.Helper()
	sock := socketPath(t)
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		Serve(ctx, l, h, quiet, "control socket")
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("Serve did not return after its context ended")
		}
	})
	return sock
}

type harness struct {
	st  *store.Store
	srv *Server
	c   *Client
	raw *http.Client // speaks HTTP to the socket without the client's checks
}

// newHarness serves a fresh store; hook, if any, is the server's
// progressHook.
func newHarness(t *testing.T, budgets store.Budgets, hook ...func(ctx context.Context, done, total int64)) *harness {
	t.Helper()
	st := store.New(store.OpenMemfdArena(), store.Options{Logger: quiet, Budgets: budgets})
	srv := NewServer(st, Options{Logger: quiet})
	if len(hook) > 0 {
		srv.progressHook = hook[0]
	}
	sock := serve(t, srv.Handler())
	t.Cleanup(func() { st.Close() })
	return &harness{st: st, srv: srv, c: NewClient(sock), raw: NewClient(sock).http}
}

// writeModel writes a model folder with one weights file of about size bytes
// and a config.json, and returns it with its total size.
func writeModel(t *testing.T, size int) (string, int64) {
	t.Helper()
	dir := t.TempDir()
	var b bytes.Buffer
	err := safetensors.Write(&b, []safetensors.Tensor{
		{Name: "w", DType: "U8", Shape: []int64{int64(size)}, Data: bytes.Repeat([]byte{3}, size)},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{"model.safetensors": b.Bytes(), "config.json": []byte(`{"x": 1}`)}
	var total int64
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
		total += int64(len(data))
	}
	return dir, total
}

// hostCost is the host memory the files of dir take in st's arena.
func hostCost(st *store.Store, dir string) int64 {
	var n int64
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if info, err := e.Info(); err == nil && info.Mode().IsRegular() {
			n += st.Arena().Cost(info.Size())
		}
	}
	return n
}

func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestLoadListStatusUnload(t *testing.T) {
	h := newHarness(t, store.Budgets{Host: 1 << 30})
	ctx := context.Background()
	dir, size := writeModel(t, 3<<20)

	// Progress comes streamed: from 0 to the total, never backwards.
	var mu sync.Mutex
	var events [][2]int64
	v, err := h.c.Load(ctx, "m", dir, func(done, total int64) {
		mu.Lock()
		events = append(events, [2]int64{done, total})
		mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(events) < 2 || events[0] != [2]int64{0, size} || events[len(events)-1] != [2]int64{size, size} {
		t.Errorf("progress %v; want from 0/%d to %d/%d", events, size, size, size)
	}
	for i := 1; i < len(events); i++ {
		if events[i][0] < events[i-1][0] || events[i][1] != size {
			t.Errorf("progress goes back or changes its total: %v", events)
			break
		}
	}
	if v.Name != "m@1" || v.Model != "m" || v.Number != 1 || v.State != store.StateReady || !v.Current ||
		v.Files != 2 || v.Bytes != size || v.HostBytes != hostCost(h.st, dir) || v.Source != dir || v.OpenFiles != 0 || v.HandleHolders == nil ||
		len(v.Residency) != 1 || v.Residency[0] != "host" || v.LoadSeconds <= 0 || v.LoadRate <= 0 || v.GPUError != "" {
		t.Errorf("loaded version %+v", v)
	}
	if _, err := time.Parse(time.RFC3339, v.LoadedAt); err != nil {
		t.Errorf("loaded_at: %v", err)
	}
	v2, err := h.c.Load(ctx, "m", dir, nil)
	if err != nil || v2.Name != "m@2" {
		t.Fatalf("second load: %+v %v", v2, err)
	}

	l, err := h.c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Models) != 1 || l.Models[0].Name != "m" || l.Models[0].Current != 2 || len(l.Models[0].Versions) != 2 ||
		l.Models[0].Versions[0].Current || !l.Models[0].Versions[1].Current || len(l.Draining) != 0 {
		t.Errorf("list %+v", l)
	}

	// Status, before and after the mount reports.
	st, err := h.c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Host.Bytes != 2*hostCost(h.st, dir) || st.Host.Budget != 1<<30 || st.Host.Reserved != 0 || st.Host.Arena != "memfd" ||
		st.Requests == nil || st.Mountpoint != "" || len(st.GPUs) != 0 || len(st.Loads) != 0 || len(st.Models) != 1 {
		t.Errorf("status without a mount: %+v", st)
	}
	mount := MountStatus{Mountpoint: "/mnt/w", ReadMode: "cached", CachedReason: "no passthrough",
		Requests: map[string]uint64{"open": 3}, DaemonReads: 4, HandleRequests: 5, HandleDenials: 1}
	h.srv.SetMount(func() MountStatus { return mount })
	if st, err = h.c.Status(ctx); err != nil {
		t.Fatal(err)
	}
	if st.Mountpoint != "/mnt/w" || st.ReadMode != "cached" || st.CachedReason != "no passthrough" ||
		st.Requests["open"] != 3 || st.DaemonReads != 4 || st.HandleRequests != 5 || st.HandleDenials != 1 {
		t.Errorf("status with a mount: %+v", st.MountStatus)
	}

	// Unload m@1 while a file of it is open: it drains.
	sv1 := h.st.Version("m", 1)
	if !sv1.Acquire() {
		t.Fatal("acquire m@1")
	}
	gone, err := h.c.Unload(ctx, "m", 1)
	if err != nil || len(gone) != 1 || gone[0].Name != "m@1" || gone[0].State != store.StateDraining || gone[0].OpenFiles != 1 {
		t.Fatalf("unload m@1: %+v %v", gone, err)
	}
	if l, err = h.c.List(ctx); err != nil || len(l.Draining) != 1 || l.Draining[0].Name != "m@1" ||
		len(l.Models) != 1 || len(l.Models[0].Versions) != 1 || l.Models[0].Current != 2 {
		t.Errorf("list while m@1 drains: %+v %v", l, err)
	}
	if st, err = h.c.Status(ctx); err != nil || st.Host.Bytes != 2*hostCost(h.st, dir) || len(st.Draining) != 1 {
		t.Errorf("status while m@1 drains: host %d, draining %+v, %v", st.Host.Bytes, st.Draining, err)
	}
	sv1.Release()
	if l, err = h.c.List(ctx); err != nil || len(l.Draining) != 0 {
		t.Errorf("list after the last release: %+v %v", l, err)
	}
	if gone, err = h.c.Unload(ctx, "m", 0); err != nil || len(gone) != 1 || gone[0].Name != "m@2" || gone[0].State != store.StateDraining {
		t.Fatalf("unload m: %+v %v", gone, err)
	}
	if l, err = h.c.List(ctx); err != nil || len(l.Models) != 0 || len(l.Draining) != 0 {
		t.Errorf("list after unloading everything: %+v %v", l, err)
	}
	if st, err = h.c.Status(ctx); err != nil || st.Host.Bytes != 0 {
		t.Errorf("status after unloading everything: %+v %v", st.Host, err)
	}

	if got := testutil.ToFloat64(h.srv.metrics.loads.WithLabelValues("ok")); got != 2 {
		t.Errorf("weightfs_loads_total{result=ok} = %v, want 2", got)
	}
	if n := testutil.CollectAndCount(h.srv.metrics.loadSeconds); n != 1 {
		t.Errorf("load_seconds: %d series", n)
	}
	if len(h.srv.Collectors()) != 5 { // loads, load seconds, errors, pushes, pushed bytes
		t.Errorf("collectors: %d", len(h.srv.Collectors()))
	}
}

func TestRollback(t *testing.T) {
	h := newHarness(t, store.Budgets{})
	ctx := context.Background()
	dir, _ := writeModel(t, 4096)
	for range 3 {
		if _, err := h.c.Load(ctx, "m", dir, nil); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct{ to, want int }{{0, 2}, {0, 1}, {3, 3}, {1, 1}} {
		v, err := h.c.Rollback(ctx, "m", tc.to)
		if err != nil || v.Name != fmt.Sprintf("m@%d", tc.want) || v.Number != tc.want || !v.Current || v.State != store.StateReady {
			t.Fatalf("rollback --to %d: %+v, %v; want current m@%d", tc.to, v, err, tc.want)
		}
		l, err := h.c.List(ctx)
		if err != nil || l.Models[0].Current != tc.want {
			t.Fatalf("after rollback --to %d: list %+v, %v; want current %d", tc.to, l, err, tc.want)
		}
		for _, lv := range l.Models[0].Versions {
			if lv.Current != (lv.Number == tc.want) {
				t.Errorf("after rollback --to %d: %s current %v", tc.to, lv.Name, lv.Current)
			}
		}
	}
	// The wire form: {"version": Version}.
	resp, err := h.raw.Post("http://weightfs/v1/rollback", "application/json", strings.NewReader(`{"name":"m","version":2}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != 200 || out["version"]["name"] != "m@2" || out["version"]["current"] != true {
		t.Errorf("POST /v1/rollback: %d %v, %v", resp.StatusCode, out, err)
	}
	if _, err := h.c.Rollback(ctx, "m", 9); err == nil {
		t.Fatal("rollback to m@9 succeeded")
	}
	if got := testutil.ToFloat64(h.srv.metrics.errors.WithLabelValues("rollback")); got != 1 {
		t.Errorf("weightfs_errors_total{kind=rollback} = %v, want 1", got)
	}
}

func TestVerify(t *testing.T) {
	h := newHarness(t, store.Budgets{})
	ctx := context.Background()
	dir, _ := writeModel(t, 8192)
	if _, err := h.c.Load(ctx, "m", dir, nil); err != nil {
		t.Fatal(err)
	}
	out, err := h.c.Verify(ctx, "m", 0)
	if err != nil || !out.OK || out.Version != "m@1" || len(out.Files) != 2 {
		t.Fatalf("verify unchanged: %+v %v", out, err)
	}
	for _, f := range out.Files {
		if !f.OK || f.Problem != "" || f.SHA256 == "" || f.SHA256 != f.SourceSHA256 || f.Source != filepath.Join(dir, f.Path) {
			t.Errorf("%s unchanged: %+v", f.Path, f)
		}
	}
	p := filepath.Join(dir, "model.safetensors")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-1] ^= 1
	writeFile(t, p, b)
	out, err = h.c.Verify(ctx, "m", 1)
	if err != nil || out.OK || len(out.Files) != 2 {
		t.Fatalf("verify changed: %+v %v", out, err)
	}
	for _, f := range out.Files {
		changed := f.Path == "model.safetensors"
		if f.OK == changed || (changed && (f.SHA256 == f.SourceSHA256 || !strings.Contains(f.Problem, "checksums differ"))) {
			t.Errorf("%s (changed: %v): %+v", f.Path, changed, f)
		}
	}
}

// rawSafetensors is a safetensors file with a header of our own making.
func rawSafetensors(header string, data []byte) []byte {
	var b bytes.Buffer
	binary.Write(&b, binary.LittleEndian, uint64(len(header)))
	b.WriteString(header)
	b.Write(data)
	return b.Bytes()
}

var allKinds = []error{store.ErrInvalid, store.ErrNotFound, store.ErrBusy, store.ErrNoMemory, context.Canceled}

// checkError checks that err is an *Error with that status, code and kind,
// and no other kind, whose message mentions want.
func checkError(t *testing.T, err error, status int, code string, kind error, want ...string) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T), want an *Error", err, err)
	}
	if e.Status != status || e.Code != code {
		t.Errorf("error %q: status %d code %q, want %d %q", e, e.Status, e.Code, status, code)
	}
	for _, k := range allKinds {
		if errors.Is(err, k) != (k == kind) {
			t.Errorf("error %q: errors.Is(%v) = %v", e, k, !(k == kind))
		}
	}
	for _, w := range want {
		if !strings.Contains(e.Error(), w) {
			t.Errorf("error %q does not mention %q", e, w)
		}
	}
	if strings.Contains(e.Error(), "--") {
		t.Errorf("error %q names a flag", e)
	}
	return e
}

func TestErrors(t *testing.T) {
	good, _ := writeModel(t, 64<<10)
	modelBytes, err := os.ReadFile(filepath.Join(good, "model.safetensors"))
	if err != nil {
		t.Fatal(err)
	}
	malformed := t.TempDir()
	writeFile(t, filepath.Join(malformed, "config.json"), []byte("{}"))
	writeFile(t, filepath.Join(malformed, "model.safetensors"),
		rawSafetensors(`{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,99]}}`, make([]byte, 16)))
	badIndex := t.TempDir()
	writeFile(t, filepath.Join(badIndex, "config.json"), []byte("{}"))
	writeFile(t, filepath.Join(badIndex, "model.safetensors"), modelBytes)
	writeFile(t, filepath.Join(badIndex, "model.safetensors.index.json"), []byte(`{"weight_map": {"w": "model-2.safetensors"}}`))
	const budget = 32 << 10

	for _, x := range []struct {
		what    string
		budgets store.Budgets
		setup   func(h *harness)
		call    func(ctx context.Context, c *Client) error
		status  int
		code    string
		kind    error
		want    []string
	}{
		{what: "load: bad name", call: func(ctx context.Context, c *Client) error {
			_, err := c.Load(ctx, ".m", good, nil)
			return err
		}, status: 400, code: CodeInvalid, kind: store.ErrInvalid, want: []string{"must not start with"}},
		{what: "load: empty path", call: func(ctx context.Context, c *Client) error {
			_, err := c.Load(ctx, "m", "", nil)
			return err
		}, status: 400, code: CodeInvalid, kind: store.ErrInvalid, want: []string{"absolute path"}},
		{what: "load: missing folder", call: func(ctx context.Context, c *Client) error {
			_, err := c.Load(ctx, "m", filepath.Join(good, "nope"), nil)
			return err
		}, status: 400, code: CodeInvalid, kind: store.ErrInvalid, want: []string{"nope", "no such file"}},
		{what: "load: not a folder", call: func(ctx context.Context, c *Client) error {
			_, err := c.Load(ctx, "m", filepath.Join(good, "config.json"), nil)
			return err
		}, status: 400, code: CodeInvalid, kind: store.ErrInvalid, want: []string{"config.json", "not a directory"}},
		{what: "load: malformed safetensors", call: func(ctx context.Context, c *Client) error {
			_, err := c.Load(ctx, "m", malformed, nil)
			return err
		}, status: 400, code: CodeInvalid, kind: store.ErrInvalid, want: []string{filepath.Join(malformed, "model.safetensors")}},
		{what: "load: index disagrees with shards", call: func(ctx context.Context, c *Client) error {
			_, err := c.Load(ctx, "m", badIndex, nil)
			return err
		}, status: 400, code: CodeInvalid, kind: store.ErrInvalid, want: []string{"model.safetensors.index.json", "model-2.safetensors"}},
		{what: "load: over the budget", budgets: store.Budgets{Host: budget}, call: func(ctx context.Context, c *Client) error {
			_, err := c.Load(ctx, "m", good, nil)
			return err
		}, status: 507, code: CodeNoMemory, kind: store.ErrNoMemory, want: []string{"needs", "host memory", "free"}},
		{what: "load: closed store", setup: func(h *harness) { h.st.Close() }, call: func(ctx context.Context, c *Client) error {
			_, err := c.Load(ctx, "m", good, nil)
			return err
		}, status: 409, code: CodeBusy, kind: store.ErrBusy, want: []string{"closed"}},
		{what: "unload: unknown model", call: func(ctx context.Context, c *Client) error {
			_, err := c.Unload(ctx, "nope", 0)
			return err
		}, status: 404, code: CodeNotFound, kind: store.ErrNotFound, want: []string{"nope", "no such model"}},
		{what: "unload: unknown version", call: func(ctx context.Context, c *Client) error {
			_, err := c.Unload(ctx, "m", 7)
			return err
		}, status: 404, code: CodeNotFound, kind: store.ErrNotFound, want: []string{"no version 7", "versions: 1"}},
		{what: "unload: negative version", call: func(ctx context.Context, c *Client) error {
			_, err := c.Unload(ctx, "m", -1)
			return err
		}, status: 400, code: CodeInvalid, kind: store.ErrInvalid, want: []string{"-1"}},
		{what: "unload: closed store", setup: func(h *harness) { h.st.Close() }, call: func(ctx context.Context, c *Client) error {
			_, err := c.Unload(ctx, "m", 0)
			return err
		}, status: 409, code: CodeBusy, kind: store.ErrBusy, want: []string{"closed"}},
		{what: "rollback: unknown model", call: func(ctx context.Context, c *Client) error {
			_, err := c.Rollback(ctx, "nope", 0)
			return err
		}, status: 404, code: CodeNotFound, kind: store.ErrNotFound, want: []string{"nope", "no such model"}},
		{what: "rollback: unknown version", call: func(ctx context.Context, c *Client) error {
			_, err := c.Rollback(ctx, "m", 7)
			return err
		}, status: 404, code: CodeNotFound, kind: store.ErrNotFound, want: []string{"no version 7", "versions: 1"}},
		{what: "rollback: nothing older", call: func(ctx context.Context, c *Client) error {
			_, err := c.Rollback(ctx, "m", 0)
			return err
		}, status: 400, code: CodeInvalid, kind: store.ErrInvalid, want: []string{"no version older than the current m@1"}},
		{what: "rollback: negative version", call: func(ctx context.Context, c *Client) error {
			_, err := c.Rollback(ctx, "m", -1)
			return err
		}, status: 400, code: CodeInvalid, kind: store.ErrInvalid, want: []string{"-1"}},
		{what: "rollback: closed store", setup: func(h *harness) { h.st.Close() }, call: func(ctx context.Context, c *Client) error {
			_, err := c.Rollback(ctx, "m", 0)
			return err
		}, status: 409, code: CodeBusy, kind: store.ErrBusy, want: []string{"closed"}},
		{what: "verify: unknown model", call: func(ctx context.Context, c *Client) error {
			_, err := c.Verify(ctx, "nope", 0)
			return err
		}, status: 404, code: CodeNotFound, kind: store.ErrNotFound, want: []string{"nope"}},
		{what: "verify: unknown version", call: func(ctx context.Context, c *Client) error {
			_, err := c.Verify(ctx, "m", 3)
			return err
		}, status: 404, code: CodeNotFound, kind: store.ErrNotFound, want: []string{"no version 3"}},
		{what: "unknown request", call: func(ctx context.Context, c *Client) error {
			return c.call(ctx, http.MethodGet, "/v1/nope", nil, &struct{}{})
		}, status: 404, code: CodeNotFound, kind: store.ErrNotFound, want: []string{"GET /v1/nope"}},
		{what: "wrong method", call: func(ctx context.Context, c *Client) error {
			return c.call(ctx, http.MethodDelete, "/v1/load", nil, &struct{}{})
		}, status: 404, code: CodeNotFound, kind: store.ErrNotFound, want: []string{"DELETE /v1/load"}},
	} {
		t.Run(x.what, func(t *testing.T) {
			h := newHarness(t, x.budgets)
			ctx := context.Background()
			if x.budgets == (store.Budgets{}) {
				if _, err := h.c.Load(ctx, "m", good, nil); err != nil {
					t.Fatal(err)
				}
			}
			before, err := h.c.List(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if x.setup != nil {
				x.setup(h)
			}
			checkError(t, x.call(ctx, h.c), x.status, x.code, x.kind, x.want...)
			if after, err := h.c.List(ctx); x.setup == nil && (err != nil || len(after.Models) != len(before.Models)) {
				t.Errorf("a refused request changed the models: %+v, %v", after, err)
			}
			if st := h.st.Usage(); st.HostReserved != 0 || len(h.st.Loads()) != 0 {
				t.Errorf("a refused request left a reservation or a load behind")
			}
		})
	}

	t.Run("budget numbers", func(t *testing.T) {
		h := newHarness(t, store.Budgets{Host: budget})
		_, err := h.c.Load(context.Background(), "m", good, nil)
		e := checkError(t, err, 507, CodeNoMemory, store.ErrNoMemory)
		var be *store.BudgetError
		if !errors.As(err, &be) || be != e.Budget {
			t.Fatalf("errors.As found no *store.BudgetError in %v", err)
		}
		want := store.BudgetError{Model: "m", Source: good, Tier: store.TierHost, Need: hostCost(h.st, good), Free: budget, Budget: budget}
		if *be != want {
			t.Errorf("budget %+v, want %+v", *be, want)
		}
		if got := testutil.ToFloat64(h.srv.metrics.loads.WithLabelValues("error")); got != 1 {
			t.Errorf("weightfs_loads_total{result=error} = %v, want 1", got)
		}
	})

	// A source that changes once copying started fails in the stream: the
	// status was 200 already, the error is the last event.
	t.Run("source changed while loading", func(t *testing.T) {
		dir, _ := writeModel(t, 1<<20)
		var once sync.Once
		h := newHarness(t, store.Budgets{}, func(ctx context.Context, done, total int64) {
			once.Do(func() {
				f, err := os.OpenFile(filepath.Join(dir, "model.safetensors"), os.O_APPEND|os.O_WRONLY, 0)
				if err == nil {
					f.Write([]byte("more"))
					f.Close()
				}
			})
		})
		var events int
		_, err := h.c.Load(context.Background(), "m", dir, func(done, total int64) { events++ })
		checkError(t, err, 0, CodeInvalid, store.ErrInvalid, "model.safetensors", "changed")
		if events == 0 {
			t.Error("no progress before the error")
		}
		if l, err := h.c.List(context.Background()); err != nil || len(l.Models) != 0 {
			t.Errorf("a failed load is listed: %+v %v", l, err)
		}
	})
}

// Requests the client would not send.
func TestBadRequests(t *testing.T) {
	h := newHarness(t, store.Budgets{})
	dir, _ := writeModel(t, 4096)
	for _, x := range []struct {
		method, path, body string
		status             int
		code, want         string
	}{
		{"POST", "/v1/load", `{"name": "m", "path": `, 400, CodeInvalid, "bad request"},
		{"POST", "/v1/load", `{"name": "m", "path": 7}`, 400, CodeInvalid, "bad request"},
		{"POST", "/v1/load", `{"name": "m", "path": "x"} {}`, 400, CodeInvalid, "more than one"},
		{"POST", "/v1/load", `{"name": "m", "path": "relative/model"}`, 400, CodeInvalid, "absolute path"},
		{"POST", "/v1/load", `{"name": "m", "path": ""}`, 400, CodeInvalid, "absolute path"},
		{"POST", "/v1/load", `{"name": "m@", "path": "` + dir + `"}`, 400, CodeInvalid, "must not contain"},
		{"POST", "/v1/unload", `[]`, 400, CodeInvalid, "bad request"},
		{"POST", "/v1/unload", strings.Repeat(" ", 2<<20), 400, CodeInvalid, "too large"},
		{"POST", "/v1/verify", `nope`, 400, CodeInvalid, "bad request"},
		{"GET", "/", ``, 404, CodeNotFound, "no such request"},
	} {
		req, err := http.NewRequest(x.method, "http://weightfs"+x.path, strings.NewReader(x.body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := h.raw.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var e errorAnswer
		derr := decodeJSON(resp.Body, &e)
		resp.Body.Close()
		if resp.StatusCode != x.status || derr != nil || e.Error.Code != x.code || !strings.Contains(e.Error.Message, x.want) ||
			resp.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s %s %.40q: %d %q %+v (%v); want %d, code %s, message mentioning %q",
				x.method, x.path, x.body, resp.StatusCode, resp.Header.Get("Content-Type"), e, derr, x.status, x.code, x.want)
		}
	}
	if l, err := h.c.List(context.Background()); err != nil || len(l.Models) != 0 {
		t.Errorf("bad requests changed the daemon: %+v %v", l, err)
	}
}

func decodeJSON(r io.Reader, v any) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// logBuffer collects log lines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// newLoggedHarness is newHarness with the store's and the server's log
// lines kept, loads logging their progress every logEvery, and the
// server's loads on ctx.
func newLoggedHarness(t *testing.T, ctx context.Context, logEvery time.Duration, hook func(ctx context.Context, done, total int64)) (*harness, *logBuffer) {
	t.Helper()
	logs := &logBuffer{}
	log := slog.New(slog.NewTextHandler(logs, nil))
	st := store.New(store.OpenMemfdArena(), store.Options{Logger: log, LogEvery: logEvery})
	srv := NewServer(st, Options{Logger: log, Context: ctx})
	srv.progressHook = hook
	sock := serve(t, srv.Handler())
	t.Cleanup(func() { st.Close() })
	return &harness{st: st, srv: srv, c: NewClient(sock), raw: NewClient(sock).http}, logs
}

// waitLoads waits until the store has no load in progress; a load that
// never ends fails by the test's timeout.
func waitLoads(st *store.Store) {
	for len(st.Loads()) > 0 {
		time.Sleep(time.Millisecond)
	}
}

// waitLoadsDone waits until the server has finished n loads, counted in its
// metrics: a load leaves the store's list before it commits and is counted,
// so an empty list does not mean it has ended (the test's timeout catches a
// hang).
func waitLoadsDone(h *harness, n float64) {
	for {
		ok, failed, cancelled := loadResults(h)
		if ok+failed+cancelled >= n {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

func loadResults(h *harness) (ok, failed, cancelled float64) {
	l := h.srv.metrics.loads
	return testutil.ToFloat64(l.WithLabelValues("ok")), testutil.ToFloat64(l.WithLabelValues("error")),
		testutil.ToFloat64(l.WithLabelValues("cancelled"))
}

// A load is the daemon's: when its client goes away (Ctrl-C, a dropped
// session), it goes on and commits.
func TestLoadOutlivesClient(t *testing.T) {
	dir, size := writeModel(t, 4<<20)
	// The daemon's load waits after its first progress event until the
	// request's context ends: the client is surely gone before it copies.
	h, logs := newLoggedHarness(t, context.Background(), 0, func(ctx context.Context, done, total int64) { <-ctx.Done() })
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err := h.c.Load(ctx, "m", dir, func(done, total int64) { cancel() })
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("load whose client gave up: %v, want context.Canceled", err)
	}
	waitLoadsDone(h, 1)
	m := h.st.Model("m")
	if m == nil || m.Current() == nil || m.Current().Bytes() != size {
		t.Fatalf("the load did not commit once its client went away:\n%s", logs)
	}
	if ok, failed, cancelled := loadResults(h); ok != 1 || failed != 0 || cancelled != 0 {
		t.Errorf("weightfs_loads_total ok %v error %v cancelled %v; want 1 0 0", ok, failed, cancelled)
	}
}

// Cancel stops a load in progress; the load's client gets a cancelled
// error; the daemon logs a cancel, not an error, and counts it as one.
func TestCancel(t *testing.T) {
	dir, _ := writeModel(t, 4<<20)
	started, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	h, logs := newLoggedHarness(t, context.Background(), 0, func(ctx context.Context, done, total int64) {
		once.Do(func() { close(started); <-release })
	})
	ctx := context.Background()
	if _, err := h.c.Cancel(ctx, "m"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("cancel with no load: %v, want ErrNotFound", err)
	}
	if _, err := h.c.Cancel(ctx, ""); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("cancel of no name: %v, want ErrInvalid", err)
	}
	result := make(chan error, 1)
	go func() {
		_, err := h.c.Load(ctx, "m", dir, nil)
		result <- err
	}()
	<-started
	out, err := h.c.Cancel(ctx, "m")
	var loads []Load
	if out != nil {
		loads = out.Cancelled
	}
	if err != nil || len(loads) != 1 || loads[0].Name != "m" || loads[0].Source != dir || loads[0].Total == 0 {
		t.Errorf("cancel: %+v, %v", loads, err)
	}
	close(release)
	err = <-result
	var e *Error
	if !errors.As(err, &e) || e.Code != CodeCanceled || !errors.Is(err, context.Canceled) ||
		!strings.Contains(err.Error(), "load m from "+dir+": cancelled") {
		t.Errorf("the cancelled load's client got %v", err)
	}
	waitLoads(h.st)
	if h.st.Model("m") != nil || h.st.Usage().HostReserved != 0 || h.st.Usage().HostBytes != 0 {
		t.Error("a cancelled load left something in the store")
	}
	if ok, failed, cancelled := loadResults(h); ok != 0 || failed != 0 || cancelled != 1 {
		t.Errorf("weightfs_loads_total ok %v error %v cancelled %v; want 0 0 1", ok, failed, cancelled)
	}
	if got := testutil.ToFloat64(h.srv.metrics.errors.WithLabelValues("load")); got != 0 {
		t.Errorf("weightfs_errors_total{kind=load} = %v after a cancel", got)
	}
	if l := logs.String(); !strings.Contains(l, `level=INFO msg="load cancelled" model=m`) || strings.Contains(l, "level=ERROR") {
		t.Errorf("the cancel is not logged as a cancel:\n%s", l)
	}
}

// Ending the server's context (the daemon shutting down) cancels its loads.
func TestShutdownCancelsLoads(t *testing.T) {
	dir, _ := writeModel(t, 1<<20)
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	h, _ := newLoggedHarness(t, ctx, 0, func(context.Context, int64, int64) { stop() })
	if _, err := h.c.Load(context.Background(), "m", dir, nil); !errors.Is(err, context.Canceled) {
		t.Errorf("load during shutdown: %v, want cancelled", err)
	}
	waitLoadsDone(h, 1)
	if h.st.Model("m") != nil {
		t.Error("a load cancelled by shutdown committed")
	}
}

// The daemon logs a load's start, its progress every few seconds (here
// every millisecond) and its end, for journalctl and kubectl logs.
func TestLoadProgressLog(t *testing.T) {
	dir, size := writeModel(t, 4<<20)
	var logs *logBuffer
	var once sync.Once
	h, logs := newLoggedHarness(t, context.Background(), time.Millisecond, func(ctx context.Context, done, total int64) {
		once.Do(func() { // the load holds until the next tick has logged it
			for !strings.Contains(logs.String(), "load progress") {
				time.Sleep(time.Millisecond)
			}
		})
	})
	if _, err := h.c.Load(context.Background(), "m", dir, nil); err != nil {
		t.Fatal(err)
	}
	l := logs.String()
	for _, want := range []string{
		fmt.Sprintf(`level=INFO msg=loading model=m source=%s files=2 bytes=%d`, dir, size),
		fmt.Sprintf(`level=INFO msg="load progress" model=m done=0 total=%d percent=0`, size),
		`level=INFO msg=loaded version=m@1 files=2`,
	} {
		if !strings.Contains(l, want) {
			t.Errorf("the log lacks %q:\n%s", want, l)
		}
	}
}

func TestNoDaemon(t *testing.T) {
	stale := socketPath(t)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	notDir := filepath.Join(t.TempDir(), "file")
	writeFile(t, notDir, nil)

	denied := NewClient(socketPath(t))
	denied.http.Transport.(*http.Transport).DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
		return nil, &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.EACCES)}
	}

	for _, x := range []struct {
		what string
		c    *Client
		want string
	}{
		{"no socket", NewClient(filepath.Join(t.TempDir(), "none.sock")), "no weightfs daemon at "},
		{"stale socket", NewClient(stale), "no weightfs daemon at " + stale},
		{"permission", denied, "permission denied on the control socket"},
		{"not a socket path", NewClient(filepath.Join(notDir, "sock")), "control socket " + notDir},
	} {
		ctx := context.Background()
		for name, call := range map[string]func() error{
			"ls":       func() error { _, err := x.c.List(ctx); return err },
			"status":   func() error { _, err := x.c.Status(ctx); return err },
			"load":     func() error { _, err := x.c.Load(ctx, "m", "/models/m", nil); return err },
			"unload":   func() error { _, err := x.c.Unload(ctx, "m", 0); return err },
			"rollback": func() error { _, err := x.c.Rollback(ctx, "m", 0); return err },
			"verify":   func() error { _, err := x.c.Verify(ctx, "m", 0); return err },
		} {
			err := call()
			var e *Error
			if err == nil || errors.As(err, &e) || !strings.Contains(err.Error(), x.want) || strings.Contains(err.Error(), "\n") {
				t.Errorf("%s: %s: %v; want one line mentioning %q", x.what, name, err, x.want)
			}
		}
	}
	if x := NewClient("/x.sock"); x.Socket() != "/x.sock" {
		t.Errorf("Socket() = %q", x.Socket())
	}
}

// A socket without permission, for real: only without root, which ignores
// the socket's mode.
func TestSocketPermission(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root connects to a 0600 socket of anyone: TestNoDaemon covers EACCES")
	}
	h := newHarness(t, store.Budgets{})
	if err := os.Chmod(h.c.Socket(), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := h.c.List(context.Background()); err == nil || !strings.Contains(err.Error(), "permission denied on the control socket") {
		t.Errorf("list on a socket without permission: %v", err)
	}
}

// Answers that are not what the API promises.
func TestBadAnswers(t *testing.T) {
	for _, x := range []struct {
		what string
		body string
		call func(c *Client) error
		want string
	}{
		{"list not JSON", "nope", func(c *Client) error { _, err := c.List(context.Background()); return err }, "bad answer to GET /v1/models"},
		{"load event not JSON", "{\"done\": 1}\nnope\n", func(c *Client) error {
			_, err := c.Load(context.Background(), "m", "/m", nil)
			return err
		}, "bad answer from the daemon"},
		{"load without an answer", "{\"done\": 1, \"total\": 2}\n", func(c *Client) error {
			_, err := c.Load(context.Background(), "m", "/m", nil)
			return err
		}, "without an answer"},
	} {
		sock := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, x.body) }))
		if err := x.call(NewClient(sock)); err == nil || !strings.Contains(err.Error(), x.want) {
			t.Errorf("%s: %v, want an error mentioning %q", x.what, err, x.want)
		}
	}
	// An error answer from something that is not the daemon: still an *Error.
	sock := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "teapot", http.StatusTeapot)
	}))
	_, err := NewClient(sock).Unload(context.Background(), "m", 0)
	checkError(t, err, http.StatusTeapot, CodeInternal, nil, "418")
}

func TestErrorBody(t *testing.T) {
	be := &store.BudgetError{Model: "m", Tier: store.TierGPU, GPU: "GPU-1", Need: 3, Free: 1, Budget: 2}
	for _, x := range []struct {
		err    error
		status int
		code   string
		budget bool
	}{
		{errors.New("boom"), 500, CodeInternal, false},
		{context.Canceled, 409, CodeCanceled, false},
		{context.DeadlineExceeded, 500, CodeInternal, false},
		{errorOf(store.ErrInvalid, "bad"), 400, CodeInvalid, false},
		{errorOf(store.ErrNotFound, "gone"), 404, CodeNotFound, false},
		{errorOf(store.ErrBusy, "busy"), 409, CodeBusy, false},
		{errorOf(store.ErrNoMemory, "full"), 507, CodeNoMemory, false},
		{be, 507, CodeNoMemory, true},
		{errors.Join(errors.New("wrapped"), be), 507, CodeNoMemory, true},
	} {
		body, status := errorBody(x.err)
		if status != x.status || body.Code != x.code || (body.Budget != nil) != x.budget || body.Message != x.err.Error() {
			t.Errorf("errorBody(%v) = %+v %d, want %d %s", x.err, body, status, x.status, x.code)
		}
		// Back on the client's side: the same kind, the same budget.
		e := newError(status, body)
		for _, k := range allKinds {
			if errors.Is(x.err, k) != errors.Is(e, k) {
				t.Errorf("%v: errors.Is(%v) differs on the client's side", x.err, k)
			}
		}
		var got *store.BudgetError
		if errors.As(e, &got) != x.budget || (x.budget && *got != *be) {
			t.Errorf("%v: budget on the client's side: %+v", x.err, got)
		}
	}
	if !strings.Contains(be.Error(), "GPU memory on GPU-1") {
		t.Errorf("GPU budget error: %q", be.Error())
	}
}

func TestListen(t *testing.T) {
	sock := socketPath(t)
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 || st.Mode().Type() != os.ModeSocket {
		t.Errorf("socket: %v %v, want a 0600 socket", st.Mode(), err)
	}
	if _, err := Listen(sock); err == nil || !strings.Contains(err.Error(), "another weightfs daemon") {
		t.Errorf("a second Listen on a live socket: %v", err)
	}
	// Left by a daemon that died: replaced.
	l.ul.Close() // unlinks nothing

	if l, err = Listen(sock); err != nil {
		t.Fatalf("Listen over a stale socket: %v", err)
	}
	l.Close()
	notDir := filepath.Join(t.TempDir(), "file")
	writeFile(t, notDir, nil)
	if _, err := Listen(filepath.Join(notDir, "sock")); err == nil || !strings.Contains(err.Error(), notDir) {
		t.Errorf("Listen under a file: %v", err)
	}
	// A directory where the socket goes: not removed.
	dir := filepath.Join(t.TempDir(), "d")
	os.MkdirAll(filepath.Join(dir, "x"), 0o700)
	if _, err := Listen(dir); err == nil || !strings.Contains(err.Error(), dir) {
		t.Errorf("Listen on a directory: %v", err)
	}
}

func TestDefaultSocket(t *testing.T) {
	t.Setenv("WEIGHTFS_SOCKET", "/somewhere/w.sock")
	if got := DefaultSocket(); got != "/somewhere/w.sock" {
		t.Errorf("with WEIGHTFS_SOCKET: %q", got)
	}
	t.Setenv("WEIGHTFS_SOCKET", "")
	t.Setenv("XDG_RUNTIME_DIR", "/run/user/1000")
	want := "/run/user/1000/weightfs/weightfs.sock"
	if os.Geteuid() == 0 {
		want = "/run/weightfs/weightfs.sock"
	}
	if got := DefaultSocket(); got != want {
		t.Errorf("DefaultSocket() = %q, want %q", got, want)
	}
	if os.Geteuid() != 0 {
		t.Setenv("XDG_RUNTIME_DIR", "")
		if got := DefaultSocket(); !strings.HasPrefix(got, os.TempDir()) {
			t.Errorf("without XDG_RUNTIME_DIR: %q", got)
		}
	}
}
