package store

import (
	"testing"
	"time"
)

// fired says whether ch is closed.
func fired(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestWatchFiresOnEveryChangeOfCurrent(t *testing.T) {
	s := newTestStore(t, Budgets{})
	dir := writeFolder(t, 4096)

	n, ch := s.Watch("m")
	if n != 0 || fired(ch) {
		t.Fatalf("before any load: %d, fired %v", n, fired(ch))
	}
	other, otherCh := s.Watch("other")
	load(t, s, "m", dir)
	if !fired(ch) {
		t.Fatal("a commit did not fire the watch")
	}
	if other != 0 || fired(otherCh) {
		t.Fatal("a commit of m fired the watch of another name")
	}
	n, ch = s.Watch("m")
	if n != 1 || fired(ch) {
		t.Fatalf("after the load: %d, fired %v", n, fired(ch))
	}
	n2, ch2 := s.Watch("m")
	if n2 != 1 || ch2 != ch {
		t.Fatal("two watchers of one name between changes should share one channel")
	}
	load(t, s, "m", dir)
	if n, ch = s.Watch("m"); n != 2 {
		t.Fatalf("after the second load: %d", n)
	}
	// Unloading a version that is not current changes nothing.
	if _, err := s.Unload("m", 1); err != nil {
		t.Fatal(err)
	}
	if fired(ch) {
		t.Fatal("unloading a version that is not current fired the watch")
	}
	load(t, s, "m", dir) // 3
	_, ch = s.Watch("m")
	if _, err := s.Unload("m", 3); err != nil {
		t.Fatal(err)
	}
	if !fired(ch) {
		t.Fatal("unloading the current version did not fire the watch")
	}
	if n, ch = s.Watch("m"); n != 2 {
		t.Fatalf("after unloading 3: current %d, want 2", n)
	}
	if _, err := s.Unload("m", 0); err != nil {
		t.Fatal(err)
	}
	if !fired(ch) {
		t.Fatal("unloading the model did not fire the watch")
	}
	if n, ch = s.Watch("m"); n != 0 {
		t.Fatalf("after unloading the model: %d", n)
	}
	s.Close()
	select {
	case <-ch:
	case <-time.After(time.Second):
		t.Fatal("Close did not fire the watch")
	}
	if n, ch = s.Watch("m"); n != 0 || !fired(ch) {
		t.Fatal("a closed store should answer 0 and a closed channel")
	}
	if len(s.watchers) != 0 {
		t.Fatalf("watchers left after Close: %d", len(s.watchers))
	}
}

// A rollback moves the current version: watchers hear of it; a rollback to
// the version already current changes nothing and wakes nobody.
func TestWatchFiresOnRollback(t *testing.T) {
	s := newTestStore(t, Budgets{})
	dir := writeFolder(t, 4096)
	load(t, s, "m", dir)
	load(t, s, "m", dir)
	n, ch := s.Watch("m")
	if n != 2 {
		t.Fatalf("current %d, want 2", n)
	}
	if _, err := s.Rollback("m", 2); err != nil || fired(ch) {
		t.Fatalf("rollback to the current version: %v, fired %v", err, fired(ch))
	}
	if _, err := s.Rollback("m", 0); err != nil {
		t.Fatal(err)
	}
	if !fired(ch) {
		t.Fatal("a rollback did not fire the watch")
	}
	if n, _ = s.Watch("m"); n != 1 {
		t.Fatalf("after the rollback the watch says %d, want 1", n)
	}
}
