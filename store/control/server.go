package control

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/weightfs/weightfs/store"
)

// Server answers the control API over a store.
type Server struct {
	store   *store.Store
	log     *slog.Logger
	metrics *metrics
	mount   atomic.Pointer[func() MountStatus]
	gpuProc func(uuid string) uint64
	build   Build
	ctx     context.Context // the daemon's lifetime: loads run on it
	// progressHook, when set (tests), runs after each progress event of a
	// load has been sent, with the request's context.
	progressHook func(ctx context.Context, done, total int64)

	pushTimeout  time.Duration
	scratchBytes int64 // the scratch's default size (tests make it small)
	pushMu       sync.Mutex
	pushes       map[*store.Staged]*activePush // pushes with an open connection
	// pushEnded, when set (tests), runs when a push's connection is done
	// with: the push committed or aborted, its scratch closed.
	pushEnded func(name string)
}

// Options configure a Server.
type Options struct {
	// Logger receives request failures (default: slog.Default()).
	Logger *slog.Logger
	// GPUProcessBytes, if set, is NVML's figure of this process's memory on
	// a GPU, shown beside the store's own count.
	GPUProcessBytes func(uuid string) uint64
	// Version is the version stamped into the daemon's binary, shown in
	// the status with its module and commit.
	Version string
	// Context is the daemon's lifetime (default: context.Background()):
	// loads asked over the API run on it, not on their request, so that a
	// load goes on when its client goes away. Ending it cancels them.
	Context context.Context
	// PushTimeout aborts a push not committed that long after it started
	// (0: no limit; the daemon's --push-timeout defaults to
	// DefaultPushTimeout).
	PushTimeout time.Duration
}

// NewServer serves st.
func NewServer(st *store.Store, opts Options) *Server {
	s := &Server{store: st, log: opts.Logger, metrics: newMetrics(), gpuProc: opts.GPUProcessBytes,
		build: BuildOf(opts.Version), ctx: opts.Context, pushTimeout: max(opts.PushTimeout, 0),
		scratchBytes: defaultScratchBytes, pushes: map[*store.Staged]*activePush{}}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.ctx == nil {
		s.ctx = context.Background()
	}
	return s
}

// SetMount names what reports the file system's side of the status; it is
// set once the mount exists (the mount shows the server's status in turn).
func (s *Server) SetMount(report func() MountStatus) { s.mount.Store(&report) }

// Load loads a model folder as the next version of name and counts it in
// the metrics (ok, error or cancelled); progress may be nil. The store logs
// the load's start, progress and end; a failure is the caller's to log.
func (s *Server) Load(ctx context.Context, name, path string, progress func(done, total int64)) (*store.Version, error) {
	start := time.Now()
	v, err := s.store.Load(ctx, name, path, store.LoadOptions{Progress: progress})
	s.metrics.observeLoad(time.Since(start), err)
	if err == nil && v.GPUError() != nil {
		s.metrics.errors.WithLabelValues("gpu").Inc()
	}
	return v, err
}

// Handler is the HTTP API (docs/CONTROL.md).
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/models", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.List())
	})
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, s.Status())
	})
	mux.HandleFunc("POST /v1/load", s.serveLoad)
	mux.HandleFunc("POST /v1/unload", s.serveUnload)
	mux.HandleFunc("POST /v1/rollback", s.serveRollback)
	mux.HandleFunc("POST /v1/verify", s.serveVerify)
	mux.HandleFunc("POST /v1/cancel", s.serveCancel)
	mux.HandleFunc("GET /v1/watch", s.serveWatch)
	mux.HandleFunc("POST /v1/push", s.servePush)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errorOf(store.ErrNotFound, "no such request: %s %s", r.Method, r.URL.Path))
	})
	return mux
}

func (s *Server) serveUnload(w http.ResponseWriter, r *http.Request) {
	var req VersionRequest
	if !readJSON(w, r, &req) {
		return
	}
	gone, err := s.store.Unload(req.Name, req.Version)
	if err != nil {
		s.metrics.errors.WithLabelValues("unload").Inc()
		writeError(w, err)
		return
	}
	out := Unloaded{Unloaded: []Version{}}
	for _, v := range gone {
		out.Unloaded = append(out.Unloaded, versionOf(v, false))
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) serveRollback(w http.ResponseWriter, r *http.Request) {
	var req VersionRequest
	if !readJSON(w, r, &req) {
		return
	}
	v, err := s.store.Rollback(req.Name, req.Version)
	if err != nil {
		s.metrics.errors.WithLabelValues("rollback").Inc()
		writeError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, RolledBack{Version: versionOf(v, true)})
}

func (s *Server) serveVerify(w http.ResponseWriter, r *http.Request) {
	var req VersionRequest
	if !readJSON(w, r, &req) {
		return
	}
	v, checks, err := s.store.Verify(r.Context(), req.Name, req.Version)
	if err != nil {
		s.metrics.errors.WithLabelValues("verify").Inc()
		writeError(w, err)
		return
	}
	out := Verified{Version: v.Name(), OK: true, Files: []VerifiedFile{}}
	for _, c := range checks {
		out.OK = out.OK && c.OK
		f := VerifiedFile{Path: c.Path, Source: c.Source, OK: c.OK, Problem: c.Problem, SHA256: c.SHA256,
			SourceSHA256: c.SourceSHA256, XXH3: c.XXH3, ServedXXH3: c.ServedXXH3}
		for _, g := range c.GPUs {
			f.GPUs = append(f.GPUs, VerifiedSlab{GPU: g.GPU, OK: g.OK, Problem: g.Problem})
		}
		out.Files = append(out.Files, f)
	}
	if !out.OK {
		s.log.Warn("verify found differences", "version", v.Name())
	}
	writeJSON(w, http.StatusOK, out)
}

// serveLoad streams progress as JSON lines, then the version or the error.
// A load refused before copying starts (a bad name or folder, a malformed
// file, a budget) is answered with its own status; the 200 stream starts with
// the first progress event, and an error after that is its last event. The
// load is the daemon's: it runs on the server's context and goes on when the
// client goes away (Ctrl-C, a dropped session); POST /v1/cancel stops it.
func (s *Server) serveLoad(w http.ResponseWriter, r *http.Request) {
	var req LoadRequest
	if !readJSON(w, r, &req) {
		return
	}
	if !filepath.IsAbs(req.Path) {
		err := errorOf(store.ErrInvalid, "load %s: path %q: want the absolute path of a model folder", req.Name, req.Path)
		s.metrics.observeLoad(0, err)
		writeError(w, err)
		return
	}
	flusher, _ := w.(http.Flusher)
	var mu sync.Mutex
	started := false
	enc := json.NewEncoder(w)
	send := func(ev LoadEvent) {
		mu.Lock()
		defer mu.Unlock()
		if !started {
			started = true
			w.Header().Set("Content-Type", "application/x-ndjson")
			w.WriteHeader(http.StatusOK)
		}
		enc.Encode(ev)
		if flusher != nil {
			flusher.Flush()
		}
	}
	var last time.Time
	progress := func(done, total int64) {
		mu.Lock()
		due := time.Since(last) > 100*time.Millisecond || done == total
		if due {
			last = time.Now()
		}
		mu.Unlock()
		if due {
			send(LoadEvent{Done: done, Total: total})
			if s.progressHook != nil {
				s.progressHook(r.Context(), done, total)
			}
		}
	}
	v, err := s.Load(s.ctx, req.Name, req.Path, progress)
	if err != nil {
		if !errors.Is(err, context.Canceled) { // the store logs a cancel as one
			s.log.Error("load failed", "model", req.Name, "path", req.Path, "err", err)
		}
		mu.Lock()
		inStream := started
		mu.Unlock()
		if !inStream {
			writeError(w, err)
			return
		}
		body, _ := errorBody(err)
		send(LoadEvent{Error: &body})
		return
	}
	vj := versionOf(v, true)
	send(LoadEvent{Version: &vj})
}

// serveCancel cancels the loads and the staged push of a model in
// progress; none is 404.
func (s *Server) serveCancel(w http.ResponseWriter, r *http.Request) {
	var req CancelRequest
	if !readJSON(w, r, &req) {
		return
	}
	if err := store.ValidateModelName(req.Name); err != nil {
		writeError(w, err)
		return
	}
	out := Cancelled{Cancelled: []Load{}}
	for _, l := range s.store.Cancel(req.Name) {
		done, total := l.Progress()
		out.Cancelled = append(out.Cancelled, Load{Name: l.Name, Source: l.Source, Done: done, Total: total})
	}
	out.Pushes = s.cancelPushes(req.Name)
	if len(out.Cancelled) == 0 && len(out.Pushes) == 0 {
		writeError(w, errorOf(store.ErrNotFound, "cancel %s: no load or push of %[1]s in progress", req.Name))
		return
	}
	s.log.Info("cancel requested", "model", req.Name, "loads", len(out.Cancelled), "pushes", len(out.Pushes))
	writeJSON(w, http.StatusOK, out)
}

// readJSON decodes a request's body, one JSON object of at most 1 MiB, and
// answers 400 when it is not that.
func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	return readJSONMax(w, r, v, 1<<20)
}

// readJSONMax is readJSON for a body of at most max bytes.
func readJSONMax(w http.ResponseWriter, r *http.Request, v any, max int64) bool {
	body := http.MaxBytesReader(w, r.Body, max)
	dec := json.NewDecoder(body)
	err := dec.Decode(v)
	if err == nil {
		// Read to the end: one object and nothing after it.
		var extra json.RawMessage
		if dec.Decode(&extra) != io.EOF {
			err = errors.New("more than one JSON value")
		}
	}
	if err != nil {
		writeError(w, errorOf(store.ErrInvalid, "bad request %s %s: %w", r.Method, r.URL.Path, err))
		return false
	}
	return true
}

func writeError(w http.ResponseWriter, err error) {
	body, status := errorBody(err)
	writeJSON(w, status, errorAnswer{body})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func versionOf(v *store.Version, current bool) Version {
	secs := v.LoadTime().Seconds()
	j := Version{
		Name: v.Name(), Model: v.Model(), Number: v.Number(), State: v.State(), Current: current,
		Files: len(v.Files()), Bytes: v.Bytes(), HostBytes: v.HostBytes(), Residency: v.Residency(), OpenFiles: v.OpenFiles(),
		HandleHolders: v.HandleHolders(), LoadedAt: v.LoadedAt().UTC().Format(time.RFC3339),
		LoadSeconds: secs, Source: v.Source(), Tier: v.Tier(), CompressedBytes: v.CompressedBytes(),
	}
	if j.HandleHolders == nil {
		j.HandleHolders = []int{}
	}
	if secs > 0 {
		j.LoadRate = float64(v.Bytes()) / secs
	}
	if err := v.GPUError(); err != nil {
		j.GPUError = err.Error()
	}
	return j
}

// List is every model with its versions, and the draining versions.
func (s *Server) List() List {
	out := List{Models: []Model{}, Draining: []Version{}, Pushes: s.Pushes()}
	for _, m := range s.store.Models() {
		cur := m.Current()
		mj := Model{Name: m.Name()}
		if cur != nil {
			mj.Current = cur.Number()
		}
		for _, v := range m.Versions() {
			mj.Versions = append(mj.Versions, versionOf(v, v == cur))
		}
		out.Models = append(out.Models, mj)
	}
	for _, v := range s.store.Draining() {
		out.Draining = append(out.Draining, versionOf(v, false))
	}
	sort.Slice(out.Draining, func(i, j int) bool { return out.Draining[i].Name < out.Draining[j].Name })
	return out
}

// Status is the whole picture: mount, memory, GPUs, versions, loads.
func (s *Server) Status() Status {
	list := s.List()
	u := s.store.Usage()
	out := Status{
		Daemon: s.build,
		Host:   Host{Bytes: u.HostBytes, Reserved: u.HostReserved, Budget: u.HostBudget, Arena: s.store.Arena().Kind()},
		GPUs:   []GPU{},
		Models: list.Models, Draining: list.Draining, Loads: []Load{}, Pushes: list.Pushes,
	}
	if report := s.mount.Load(); report != nil {
		out.MountStatus = (*report)()
	}
	if out.Requests == nil {
		out.Requests = map[string]uint64{}
	}
	for _, g := range u.GPUs {
		gj := GPU{Index: g.Ordinal, UUID: g.UUID, Name: g.Name, Bytes: g.Bytes, Reserved: g.Reserved,
			Budget: g.Budget, Free: g.DeviceFree, Total: g.DeviceTotal}
		if s.gpuProc != nil {
			gj.ProcessBytes = s.gpuProc(g.UUID)
		}
		out.GPUs = append(out.GPUs, gj)
	}
	for _, l := range s.store.Loads() {
		done, total := l.Progress()
		out.Loads = append(out.Loads, Load{Name: l.Name, Source: l.Source, Done: done, Total: total})
	}
	return out
}
