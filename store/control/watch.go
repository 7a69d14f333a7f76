package control

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/weightfs/weightfs/store"
)

// serveWatch answers GET /v1/watch?name=NAME: one WatchEvent per line, the
// current version at once, then each change of it, until the client goes,
// the model goes (a last line with Gone) or the daemon stops.
func (s *Server) serveWatch(w http.ResponseWriter, r *http.Request) {
	name := r.URL.Query().Get("name")
	if err := store.ValidateModelName(name); err != nil {
		writeError(w, errorOf(store.ErrInvalid, "watch: %w", err))
		return
	}
	n, changed := s.store.Watch(name)
	if n == 0 {
		writeError(w, errorOf(store.ErrNotFound, "watch %s: no such model", name))
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	flusher, _ := w.(http.Flusher)
	for {
		if enc.Encode(WatchEvent{Name: name, Version: n, Gone: n == 0, Time: time.Now().UTC()}) != nil || n == 0 {
			return
		}
		if flusher != nil {
			flusher.Flush()
		}
		for last := n; n == last; {
			select {
			case <-changed:
			case <-r.Context().Done():
				return
			case <-s.ctx.Done():
				n = 0
				continue
			}
			n, changed = s.store.Watch(name)
		}
	}
}

// Watch writes a JSON line (a WatchEvent) to out for the current version of
// name and for each new one, until ctx ends (then it returns nil), the model
// goes (its last line has "gone": true) or the connection fails.
func (c *Client) Watch(ctx context.Context, name string, out io.Writer) error {
	resp, err := c.do(ctx, http.MethodGet, "/v1/watch?name="+url.QueryEscape(name), nil)
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return nil
	} else if err != nil {
		return err
	}
	defer resp.Body.Close()
	dec, enc := json.NewDecoder(resp.Body), json.NewEncoder(out)
	for {
		var e WatchEvent
		if err := dec.Decode(&e); ctx.Err() != nil || err == io.EOF {
			return nil
		} else if err != nil {
			return c.explain(err)
		}
		if err := enc.Encode(e); err != nil || e.Gone {
			return err
		}
	}
}
