package control

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/weightfs/weightfs/store"
)

// lines collects what Watch writes.
type lines struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lines) events(t *testing.T) []WatchEvent {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []WatchEvent
	for _, s := range strings.Split(strings.TrimSpace(l.b.String()), "\n") {
		if s == "" {
			continue
		}
		var e WatchEvent
		if err := json.Unmarshal([]byte(s), &e); err != nil {
			t.Fatalf("line %q: %v", s, err)
		}
		out = append(out, e)
	}
	return out
}

func (l *lines) waitFor(t *testing.T, n int) []WatchEvent {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if e := l.events(t); len(e) >= n {
			return e
		}
	}
	t.Fatalf("fewer than %d watch events: %+v", n, l.events(t))
	return nil
}

func TestWatch(t *testing.T) {
	h := newHarness(t, store.Budgets{})
	ctx := context.Background()
	if err := h.c.Watch(ctx, "nope", &lines{}); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("watch of no model: %v, want ErrNotFound", err)
	}
	if err := h.c.Watch(ctx, "a/b", &lines{}); !errors.Is(err, store.ErrInvalid) {
		t.Fatalf("watch of a bad name: %v, want ErrInvalid", err)
	}
	dir, _ := writeModel(t, 4096)
	if _, err := h.srv.Load(ctx, "m", dir, nil); err != nil {
		t.Fatal(err)
	}

	var out lines
	done := make(chan error, 1)
	go func() { done <- h.c.Watch(ctx, "m", &out) }()
	out.waitFor(t, 1)
	if _, err := h.srv.Load(ctx, "m", dir, nil); err != nil {
		t.Fatal(err)
	}
	out.waitFor(t, 2)
	if _, err := h.st.Unload("m", 0); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Watch did not end when the model went")
	}
	e := out.events(t)
	if len(e) != 3 || e[0].Version != 1 || e[1].Version != 2 || e[2].Version != 0 || !e[2].Gone || e[1].Name != "m" || e[1].Time.IsZero() {
		t.Fatalf("events: %+v", e)
	}

	// Ending the context ends the watch without an error.
	if _, err := h.srv.Load(ctx, "m", dir, nil); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	go func() { done <- h.c.Watch(cctx, "m", &lines{}) }()
	time.Sleep(50 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("watch ended by its context: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Watch did not end with its context")
	}
}
