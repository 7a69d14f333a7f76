package store

// The store tells watchers of a change of a model's current version: a
// commit, an unload, a rollback. Each name has at most one channel, closed
// (and forgotten) at the next change; Close closes them all. Nothing else
// runs: a watcher that stops waiting leaves nothing behind.

// Watch returns the current version number of the model (0: there is none:
// never loaded, unloaded, or the store is closed) and a channel that is
// closed at the next change of it (a new version committed, the current one
// unloaded or rolled back) or when the store closes. The number and the
// channel are taken together: no change falls between them.
func (s *Store) Watch(name string) (number int, changed <-chan struct{}) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return 0, closedChan
	}
	if m := s.models[name]; m != nil {
		if v := m.Current(); v != nil {
			number = v.number
		}
	}
	s.watchMu.Lock()
	defer s.watchMu.Unlock()
	ch := s.watchers[name]
	if ch == nil {
		ch = make(chan struct{})
		s.watchers[name] = ch
	}
	return number, ch
}

// changed wakes the watchers of name. Call it, with s.mu held for writing,
// wherever a model's current version changes (commit, Unload, Rollback).
func (s *Store) changed(name string) {
	s.watchMu.Lock()
	defer s.watchMu.Unlock()
	if ch := s.watchers[name]; ch != nil {
		close(ch)
		delete(s.watchers, name)
	}
}

// changedAll wakes every watcher (the store closes); s.mu is held for writing.
func (s *Store) changedAll() {
	s.watchMu.Lock()
	defer s.watchMu.Unlock()
	for name, ch := range s.watchers {
		close(ch)
		delete(s.watchers, name)
	}
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()
