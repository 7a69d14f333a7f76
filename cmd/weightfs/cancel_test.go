package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/control"
)

func TestCancelCommand(t *testing.T) {
	sock := serve(t, controlHandler, store.Budgets{})
	_, stderr, code := weightfs(t, "cancel", "m", "--socket", sock)
	if code != 1 {
		t.Errorf("cancel with no load in progress: exit %d", code)
	}
	oneLineError(t, []string{"cancel"}, stderr, "cancel m: no load or push of m in progress")
	if _, _, code := weightfs(t, "cancel", "--socket", sock); code != 2 {
		t.Errorf("cancel without a name: exit %d, want 2", code)
	}
	// A daemon with a load in progress (the real one is in store/control's
	// tests): what the command sends, prints and exits with.
	var asked control.CancelRequest
	sock = serve(t, func(*store.Store) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method != http.MethodPost || r.URL.Path != "/v1/cancel" || json.NewDecoder(r.Body).Decode(&asked) != nil {
				http.Error(w, "no", http.StatusBadRequest)
				return
			}
			json.NewEncoder(w).Encode(control.Cancelled{Cancelled: []control.Load{
				{Name: asked.Name, Source: "/models/m", Done: 1 << 20, Total: 4 << 20}}})
		})
	}, store.Budgets{})
	stdout, stderr, code := weightfs(t, "cancel", "m", "--socket", sock)
	if want := "cancelled the load of m from /models/m (1.0 MiB of 4.0 MiB copied)\n"; code != 0 || stdout != want || stderr != "" || asked.Name != "m" {
		t.Errorf("cancel: exit %d, stdout %q, stderr %q, asked %+v; want %q", code, stdout, stderr, asked, want)
	}
	stdout, _, code = weightfs(t, "cancel", "m", "--json", "--socket", sock)
	var out control.Cancelled
	if err := json.Unmarshal([]byte(stdout), &out); code != 0 || err != nil || len(out.Cancelled) != 1 || out.Cancelled[0].Done != 1<<20 {
		t.Errorf("cancel --json: exit %d, %v, %q", code, err, stdout)
	}
}

// Ctrl-C during `weightfs load` stops waiting, not the load: the command
// says that the load goes on in the daemon and how to cancel it, and exits
// 130. SIGINT is stood in for by the end of the command's context (the
// signal's context is made from it).
func TestLoadInterrupted(t *testing.T) {
	src := writeModel(t, 4096)
	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) {
			started := make(chan struct{})
			gone := make(chan struct{})
			sock := serve(t, func(*store.Store) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					w.WriteHeader(http.StatusOK)
					json.NewEncoder(w).Encode(control.LoadEvent{Done: 0, Total: 4096})
					w.(http.Flusher).Flush()
					close(started)
					<-r.Context().Done() // the daemon goes on; this client is gone
					close(gone)
				})
			}, store.Budgets{})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var stdout, stderr bytes.Buffer
			exit := make(chan int)
			go func() {
				exit <- run(ctx, []string{"load", "m", src, "--socket", sock, "--log-format", format}, &stdout, &stderr)
			}()
			<-started
			cancel()
			code := <-exit
			<-gone
			if code != 130 || stdout.Len() != 0 {
				t.Errorf("interrupted load: exit %d, stdout %q; want 130 and nothing", code, stdout.String())
			}
			msg := stderr.String()
			if format == "text" {
				oneLineError(t, []string{"load"}, msg, "the load of m goes on in the daemon")
			} else {
				var rec struct {
					Level, Msg string
					Exit       int
				}
				if err := json.Unmarshal(stderr.Bytes(), &rec); err != nil || rec.Exit != 130 || strings.Count(msg, "\n") != 1 {
					t.Errorf("--log-format json: %v, %q; want one JSON record", err, msg)
				}
				msg = rec.Msg
			}
			if !strings.Contains(msg, "goes on in the daemon") || !strings.Contains(msg, "weightfs cancel m") {
				t.Errorf("the interrupted load says %q; want that it goes on and how to cancel it", msg)
			}
		})
	}
}
