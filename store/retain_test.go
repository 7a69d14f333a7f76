package store

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
)

// numbers are the numbers of versions, in order.
func numbers(vs []*Version) []int {
	out := []int{}
	for _, v := range vs {
		out = append(out, v.number)
	}
	return out
}

func freed(v *Version) bool {
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	return v.use.freed
}

// retentionStore keeps keep versions of each model and logs to log.
func retentionStore(t *testing.T, keep int, log *bytes.Buffer) *Store {
	t.Helper()
	s := New(OpenMemfdArena(), Options{KeepVersions: keep, Logger: slog.New(slog.NewTextHandler(log, nil))})
	t.Cleanup(func() { s.Close() })
	return s
}

func TestRetention(t *testing.T) {
	dir := writeFolder(t, 4096)
	for _, tc := range []struct {
		keep, loads int
		kept        []int
	}{
		{keep: 1, loads: 4, kept: []int{4}},
		{keep: 2, loads: 4, kept: []int{3, 4}},
		{keep: 3, loads: 5, kept: []int{3, 4, 5}},
		{keep: 3, loads: 2, kept: []int{1, 2}},
		{keep: 0, loads: 5, kept: []int{1, 2, 3, 4, 5}},
	} {
		t.Run(fmt.Sprintf("keep=%d,loads=%d", tc.keep, tc.loads), func(t *testing.T) {
			var log bytes.Buffer
			s := retentionStore(t, tc.keep, &log)
			var removed []string
			s.OnRemove(func(v *Version) { removed = append(removed, v.Name()) })
			var all []*Version
			for range tc.loads {
				all = append(all, load(t, s, "m", dir))
			}
			s.reaps.Wait() // a commit frees what it dropped after it returns
			m := s.Model("m")
			if got := numbers(m.Versions()); !slices.Equal(got, tc.kept) {
				t.Errorf("versions %v, want %v", got, tc.kept)
			}
			if m.Current() != all[len(all)-1] {
				t.Errorf("current %s, want the newest", m.Current().Name())
			}
			var wantRemoved []string
			for _, v := range all {
				dropped := !slices.Contains(tc.kept, v.number)
				if dropped {
					wantRemoved = append(wantRemoved, v.Name())
					if !strings.Contains(log.String(), `msg="dropped an old version" version=`+v.Name()) {
						t.Errorf("no log line for dropping %s:\n%s", v.Name(), log.String())
					}
				}
				if freed(v) != dropped || s.Version("m", v.number) != nil == dropped {
					t.Errorf("%s: freed %v, visible %v; want dropped %v", v.Name(), freed(v), s.Version("m", v.number) != nil, dropped)
				}
			}
			if !slices.Equal(removed, wantRemoved) {
				t.Errorf("OnRemove told of %v, want %v", removed, wantRemoved)
			}
			if len(s.Draining()) != 0 {
				t.Errorf("draining %v: nothing was in use", s.Draining())
			}
			if got, want := s.Usage().HostBytes, int64(len(tc.kept))*all[0].HostBytes(); got != want {
				t.Errorf("host bytes %d, want %d", got, want)
			}
		})
	}
}

func TestRetentionDrainsOpenVersion(t *testing.T) {
	var log bytes.Buffer
	s := retentionStore(t, 1, &log)
	dir := writeFolder(t, 4096)
	v1 := load(t, s, "m", dir)
	if !v1.Acquire() { // an open file
		t.Fatal("acquire m@1")
	}
	v2 := load(t, s, "m", dir)
	if s.Version("m", 1) != nil || s.Model("m").Current() != v2 {
		t.Fatal("m@1 still on the mount, or m@2 not current")
	}
	if d := s.Draining(); len(d) != 1 || d[0] != v1 || v1.State() != StateDraining || freed(v1) {
		t.Fatalf("draining %v, m@1 %s, freed %v: want m@1 draining", d, v1.State(), freed(v1))
	}
	if !strings.Contains(log.String(), "open_files=1") {
		t.Errorf("the log does not say m@1 was in use:\n%s", log.String())
	}
	s.Usage() // reading the state frees nothing
	if freed(v1) {
		t.Fatal("freed by a read of the state")
	}
	v1.Release()
	if !freed(v1) || len(s.Draining()) != 0 {
		t.Errorf("m@1 not freed at its last release (draining %v)", s.Draining())
	}
}

// TestRetainRule: the current version stays even when it is not among the
// newest K, as after a rollback.
func TestRetainRule(t *testing.T) {
	vs := []*Version{{number: 1}, {number: 2}, {number: 3}, {number: 4}}
	for _, tc := range []struct {
		keep, current int // current: index into vs
		kept          []int
	}{
		{keep: 2, current: 3, kept: []int{3, 4}},
		{keep: 2, current: 0, kept: []int{1, 3, 4}},
		{keep: 1, current: 1, kept: []int{2, 4}},
		{keep: 4, current: 0, kept: []int{1, 2, 3, 4}},
		{keep: 0, current: 0, kept: []int{1, 2, 3, 4}},
	} {
		kept, gone := retain(vs, vs[tc.current], tc.keep)
		if !slices.Equal(numbers(kept), tc.kept) || len(kept)+len(gone) != len(vs) {
			t.Errorf("keep %d, current %d: kept %v, gone %v; want kept %v", tc.keep, tc.current+1, numbers(kept), numbers(gone), tc.kept)
		}
	}
}

func TestRollback(t *testing.T) {
	var log bytes.Buffer
	s := retentionStore(t, 3, &log)
	dir := writeFolder(t, 4096)
	for range 3 {
		load(t, s, "m", dir)
	}
	var moved []string
	s.OnCurrent(func(m *Model) { moved = append(moved, m.Current().Name()) })
	m := s.Model("m")
	for _, tc := range []struct {
		to, current int // current after the call
		err         error
		msg         string
	}{
		{to: 0, current: 2},
		{to: 0, current: 1},
		{to: 0, current: 1, err: ErrInvalid, msg: "no version older than the current m@1"},
		{to: 3, current: 3},
		{to: 3, current: 3},
		{to: 7, current: 3, err: ErrNotFound, msg: "no version 7 (versions: 1, 2, 3)"},
		{to: -1, current: 3, err: ErrInvalid},
		{to: 1, current: 1},
	} {
		v, err := s.Rollback("m", tc.to)
		if tc.err != nil {
			if !errors.Is(err, tc.err) || !strings.Contains(err.Error(), tc.msg) || v != nil {
				t.Errorf("rollback --to %d: %v, %v; want %v with %q", tc.to, v, err, tc.err, tc.msg)
			}
		} else if err != nil || v != m.Current() {
			t.Errorf("rollback --to %d: %v, %v; current %v", tc.to, v, err, m.Current())
		}
		if m.Current().number != tc.current {
			t.Errorf("rollback --to %d: current %s, want m@%d", tc.to, m.Current().Name(), tc.current)
		}
	}
	if want := []string{"m@2", "m@1", "m@3", "m@1"}; !slices.Equal(moved, want) {
		t.Errorf("OnCurrent told of %v, want %v (only real moves)", moved, want)
	}
	if !strings.Contains(log.String(), `msg="rolled back" model=m from=m@3 to=m@1`) {
		t.Errorf("no log line for the rollback:\n%s", log.String())
	}
	if _, err := s.Rollback("nope", 0); !errors.Is(err, ErrNotFound) {
		t.Errorf("rollback of an unknown model: %v, want ErrNotFound", err)
	}
	if _, err := s.Rollback("a/b", 0); !errors.Is(err, ErrInvalid) {
		t.Errorf("rollback of a bad name: %v, want ErrInvalid", err)
	}

	// Unloading another version keeps the current one where it was rolled
	// back to; unloading the current one moves it to the newest left.
	if _, err := s.Unload("m", 3); err != nil || m.Current().number != 1 {
		t.Fatalf("unload m@3: %v; current %s, want m@1", err, m.Current().Name())
	}
	if _, err := s.Unload("m", 1); err != nil || m.Current().number != 2 {
		t.Fatalf("unload m@1: %v; current %s, want m@2", err, m.Current().Name())
	}

	// A load after a rollback becomes current with the next number, and
	// retention drops the oldest.
	s.Rollback("m", 0) // nothing older than m@2 is left
	load(t, s, "m", dir)
	load(t, s, "m", dir)
	v := load(t, s, "m", dir)
	if v.number != 6 || m.Current() != v || !slices.Equal(numbers(m.Versions()), []int{4, 5, 6}) {
		t.Errorf("after loads: %s current, versions %v; want m@6 current of 4, 5, 6", m.Current().Name(), numbers(m.Versions()))
	}

	s.Close()
	if _, err := s.Rollback("m", 0); !errors.Is(err, ErrBusy) {
		t.Errorf("rollback on a closed store: %v, want ErrBusy", err)
	}
}
