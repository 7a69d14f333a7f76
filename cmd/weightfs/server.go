package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	wfs "github.com/weightfs/weightfs/fs"
	"github.com/weightfs/weightfs/store"
)

// daemon is the running mount with its store: what the control socket and
// the metrics serve.
type daemon struct {
	store   *store.Store
	srv     *wfs.Server
	log     *slog.Logger
	metrics *metrics
	// gpuProcessBytes, if set, is NVML's figure for this process on a GPU.
	gpuProcessBytes func(uuid string) uint64
}

// load loads a model and counts it; progress may be nil.
func (d *daemon) load(ctx context.Context, name, path string, progress func(done, total int64)) (*store.Version, error) {
	start := time.Now()
	v, err := d.store.Load(ctx, name, path, store.LoadOptions{Progress: progress})
	d.metrics.observeLoad(time.Since(start), err)
	if err == nil && v.GPUError() != nil {
		d.metrics.errors.WithLabelValues("gpu").Inc()
	}
	return v, err
}

func (d *daemon) status() StatusJSON { return statusJSON(d.store, d.srv, d.gpuProcessBytes) }

func (d *daemon) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/models", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, listJSON(d.store))
	})
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, d.status())
	})
	mux.HandleFunc("POST /v1/load", d.serveLoad)
	mux.HandleFunc("POST /v1/unload", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Name    string `json:"name"`
			Version int    `json:"version"`
		}
		if !readJSON(w, r, &req) {
			return
		}
		gone, err := d.store.Unload(req.Name, req.Version)
		if err != nil {
			d.metrics.errors.WithLabelValues("unload").Inc()
			writeJSON(w, http.StatusNotFound, ErrorJSON{Error: err.Error()})
			return
		}
		out := UnloadJSON{Unloaded: []VersionJSON{}}
		for _, v := range gone {
			out.Unloaded = append(out.Unloaded, versionJSON(v, false))
		}
		writeJSON(w, http.StatusOK, out)
	})
	mux.HandleFunc("POST /v1/verify", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Name    string `json:"name"`
			Version int    `json:"version"`
		}
		if !readJSON(w, r, &req) {
			return
		}
		v, checks, err := d.store.Verify(r.Context(), req.Name, req.Version)
		if err != nil {
			d.metrics.errors.WithLabelValues("verify").Inc()
			writeJSON(w, http.StatusNotFound, ErrorJSON{Error: err.Error()})
			return
		}
		out := VerifyJSON{Version: v.Name(), OK: true, Files: []VerifyFileJSON{}}
		for _, c := range checks {
			out.OK = out.OK && c.OK
			out.Files = append(out.Files, VerifyFileJSON{Path: c.Path, Source: c.Source, OK: c.OK,
				Problem: c.Problem, SHA256: c.SHA256, SourceSHA256: c.SourceSHA256})
		}
		if !out.OK {
			d.log.Warn("verify found differences", "version", v.Name())
		}
		writeJSON(w, http.StatusOK, out)
	})
	return mux
}

// serveLoad streams progress as JSON lines, then the version or the error.
// The load stops if the client goes away.
func (d *daemon) serveLoad(w http.ResponseWriter, r *http.Request) {
	var req LoadRequest
	if !readJSON(w, r, &req) {
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	flusher, _ := w.(http.Flusher)
	var mu sync.Mutex
	enc := json.NewEncoder(w)
	send := func(ev LoadEvent) {
		mu.Lock()
		defer mu.Unlock()
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
		}
	}
	v, err := d.load(r.Context(), req.Name, req.Path, progress)
	if err != nil {
		d.log.Error("load failed", "model", req.Name, "path", req.Path, "err", err)
		send(LoadEvent{Error: err.Error()})
		return
	}
	vj := versionJSON(v, true)
	send(LoadEvent{Version: &vj})
}

func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(v); err != nil {
		writeJSON(w, http.StatusBadRequest, ErrorJSON{Error: "bad request: " + err.Error()})
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// defaultSocket is where the daemon listens unless --socket says otherwise:
// $WEIGHTFS_SOCKET, /run/weightfs/weightfs.sock for root, else under
// $XDG_RUNTIME_DIR.
func defaultSocket() string {
	if s := os.Getenv("WEIGHTFS_SOCKET"); s != "" {
		return s
	}
	if os.Geteuid() == 0 {
		return "/run/weightfs/weightfs.sock"
	}
	if dir := os.Getenv("XDG_RUNTIME_DIR"); dir != "" {
		return filepath.Join(dir, "weightfs", "weightfs.sock")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("weightfs-%d", os.Geteuid()), "weightfs.sock")
}

// listenControl listens on the control socket, mode 0600, replacing a socket
// left by a daemon that died but refusing to take over a live one.
func listenControl(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if _, err := os.Lstat(path); err == nil {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("control socket %s: another weightfs daemon is listening there", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("control socket %s: remove stale socket: %w", path, err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	return l, nil
}

// serveHTTP serves h on l until ctx ends.
func serveHTTP(ctx context.Context, l net.Listener, h http.Handler, log *slog.Logger, what string) {
	s := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		s.Shutdown(sctx)
	}()
	if err := s.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error(what+" stopped", "err", err)
	}
}

// addrOrPath names a listener for messages.
func addrOrPath(l net.Listener) string {
	return strings.TrimPrefix(l.Addr().String(), "@")
}
