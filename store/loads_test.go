package store

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/weightfs/weightfs/store/safetensors"
)

// logBuffer collects a store's log lines.
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

func newLoggedStore(t *testing.T) (*Store, *logBuffer) {
	t.Helper()
	var logs logBuffer
	s := New(OpenMemfdArena(), Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	t.Cleanup(func() { s.Close() })
	return s, &logs
}

// weights is a one-tensor safetensors file of size bytes, each of them b.
func weights(t *testing.T, size int, b byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	err := safetensors.Write(&buf, []safetensors.Tensor{{Name: "w", DType: safetensors.U8, Shape: []int64{int64(size)},
		Data: bytes.Repeat([]byte{b}, size)}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func leftNothing(t *testing.T, s *Store) {
	t.Helper()
	if len(s.Models()) != 0 || len(s.Loads()) != 0 || s.Usage().HostReserved != 0 {
		t.Error("a failed load left something behind")
	}
}

// A source rewritten while it is copied is never served as a mix of old and
// new bytes: the load sees the change (size, mtime, ctime, inode of the open
// file and of the path), reads the folder again once, and fails naming the
// file if it changed again. The change is made by the load's own progress
// callback, in the middle of the copy: no timing.
func TestSourceChangedWhileLoading(t *testing.T) {
	const size = 1 << 20
	old := time.Now().Add(-time.Hour)
	inPlace := func(b byte) func(p string) error { // same size, other bytes, same inode
		return func(p string) error {
			f, err := os.OpenFile(p, os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			defer f.Close()
			_, err = f.Write(weights(t, size, b))
			return err
		}
	}
	for _, c := range []struct {
		what    string
		file    string
		changes int // on how many tries (1: the first only, 2: both)
		change  func(p string) error
		want    []byte // the bytes served ("" : the load fails)
	}{
		{"rewritten in place once", "model.safetensors", 1, inPlace(8), weights(t, size, 8)},
		{"rewritten in place on every try", "model.safetensors", 2, inPlace(8), nil},
		{"replaced by rename once", "model.safetensors", 1, func(p string) error {
			tmp := p + ".tmp"
			if err := os.WriteFile(tmp, weights(t, size, 9), 0o644); err != nil {
				return err
			}
			return os.Rename(tmp, p)
		}, weights(t, size, 9)},
		{"grows once", "config.json", 1, func(p string) error { return os.WriteFile(p, []byte(`{"a": 1}`), 0o644) },
			[]byte(`{"a": 1}`)},
		{"shrinks on every try", "model.safetensors", 2, func(p string) error { return os.Truncate(p, size/2) }, nil},
	} {
		t.Run(c.what, func(t *testing.T) {
			dir := t.TempDir()
			writeFile(t, filepath.Join(dir, "model.safetensors"), weights(t, size, 7))
			writeFile(t, filepath.Join(dir, "config.json"), []byte("{}"))
			path := filepath.Join(dir, c.file)
			// Written an hour ago, rewritten now: mtime tells.
			for _, name := range []string{"model.safetensors", "config.json"} {
				if err := os.Chtimes(filepath.Join(dir, name), old, old); err != nil {
					t.Fatal(err)
				}
			}
			s, logs := newLoggedStore(t)
			var tries, changed int
			var changeErr error
			v, err := s.Load(context.Background(), "m", dir, LoadOptions{Readers: 1, ChunkSize: 64 << 10,
				Progress: func(done, total int64) {
					if done == 0 {
						tries++
						return
					}
					// config.json (2 bytes) is read first (files in name order):
					// change after the first chunk of the weights.
					if done > 64<<10 && changed < tries && tries <= c.changes {
						changed++
						changeErr = c.change(path)
						if c.file == "config.json" {
							os.Chtimes(path, old, old) // only the size tells
						}
					}
				}})
			if changeErr != nil {
				t.Fatal(changeErr)
			}
			if c.want == nil {
				if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), path) {
					t.Fatalf("load of a source that keeps changing: %v; want ErrInvalid naming %s", err, path)
				}
				leftNothing(t, s)
				return
			}
			if err != nil {
				t.Fatalf("load of a source that changed once: %v", err)
			}
			if tries != 2 {
				t.Errorf("copied %d times, want 2", tries)
			}
			for _, f := range v.Files() {
				if f.Path() == c.file && !bytes.Equal(f.Bytes(), c.want) {
					t.Errorf("%s is served with bytes that are not the file's as it is now", c.file)
				}
			}
			if !strings.Contains(logs.String(), "a source changed while it was read") {
				t.Errorf("the retry is not logged:\n%s", logs)
			}
		})
	}
}

func mkfifo(t *testing.T, path string) {
	t.Helper()
	if err := syscall.Mkfifo(path, 0o644); err != nil {
		t.Skipf("no FIFO here: %v", err)
	}
}

// A named pipe in a model folder never blocks a load: the scan skips it with
// a logged reason; one put in place of a file between the scan and the copy
// is refused once open. A hang fails by the test's timeout.
func TestFIFOSource(t *testing.T) {
	t.Run("in the folder", func(t *testing.T) {
		dir := writeFolder(t, 4096)
		fifo := filepath.Join(dir, "model-00002-of-00002.safetensors")
		mkfifo(t, fifo)
		s, logs := newLoggedStore(t)
		v, err := s.Load(context.Background(), "m", dir, LoadOptions{})
		if err != nil || len(v.Files()) != 2 {
			t.Fatalf("load of a folder with a FIFO: %v", err)
		}
		if l := logs.String(); !strings.Contains(l, "not a regular file") || !strings.Contains(l, fifo) || !strings.Contains(l, "named pipe") {
			t.Errorf("the FIFO was skipped without a word:\n%s", l)
		}
	})
	for _, name := range []string{"config.json", "model.safetensors"} {
		t.Run("replaces "+name+" after the scan", func(t *testing.T) {
			dir := writeFolder(t, 4096)
			path := filepath.Join(dir, name)
			afterScan = func(string) {
				os.Remove(path)
				mkfifo(t, path)
			}
			t.Cleanup(func() { afterScan = nil })
			s, _ := newLoggedStore(t)
			_, err := s.Load(context.Background(), "m", dir, LoadOptions{})
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "named pipe") {
				t.Errorf("load of a file replaced by a FIFO: %v; want ErrInvalid naming %s", err, path)
			}
			leftNothing(t, s)
		})
	}
}

// The readers of sources never block on a FIFO (the code before
// the non-blocking opener hung here; these tests then fail by timeout).
func TestReadersRefuseFIFO(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "model.safetensors")
	mkfifo(t, fifo)
	if _, _, err := openSource(fifo, fifo); err == nil || !strings.Contains(err.Error(), fifo) || !strings.Contains(err.Error(), "named pipe") {
		t.Errorf("openSource of a FIFO: %v", err)
	}
	s, _ := newLoggedStore(t)
	files := []*sourceFile{{rel: "config.json", abs: fifo, size: 2, sourceInfo: sourceInfo{real: fifo}}}
	if _, err := s.copyIn(context.Background(), filepath.Dir(fifo), files, 0, LoadOptions{}); err == nil || !strings.Contains(err.Error(), fifo) {
		t.Errorf("copyIn of a FIFO: %v", err)
	}
	if _, _, err := openSource(t.TempDir(), "dir"); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "a directory") {
		t.Errorf("openSource of a directory: %v", err)
	}
	if _, _, err := openSource(filepath.Join(t.TempDir(), "none"), "none"); !errors.Is(err, ErrInvalid) {
		t.Errorf("openSource of nothing: %v", err)
	}
	if _, _, err := openSource("/dev/null", "/dev/null"); err == nil || !strings.Contains(err.Error(), "character device") {
		t.Errorf("openSource of /dev/null: %v", err)
	}
}

// Cancel ends a load at any step, frees what it took, and is logged as a
// cancel.
func TestCancel(t *testing.T) {
	for _, step := range []string{"scan", "copy"} {
		t.Run(step, func(t *testing.T) {
			dir := writeFolder(t, 1<<20)
			s, logs := newLoggedStore(t)
			var got []*Load
			if step == "scan" {
				afterScan = func(string) { got = s.Cancel("m") }
				t.Cleanup(func() { afterScan = nil })
			}
			_, err := s.Load(context.Background(), "m", dir, LoadOptions{Readers: 1, ChunkSize: 4096,
				Progress: func(done, total int64) {
					if step == "copy" && done > 0 && got == nil {
						got = s.Cancel("m")
					}
				}})
			if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "load m from "+dir+": cancelled") {
				t.Errorf("cancelled load: %v", err)
			}
			if len(got) != 1 || got[0].Name != "m" || got[0].Source != dir {
				t.Errorf("Cancel returned %v", got)
			}
			leftNothing(t, s)
			if l := logs.String(); !strings.Contains(l, "level=INFO msg=\"load cancelled\" model=m") || strings.Contains(l, "level=ERROR") {
				t.Errorf("the cancel is not logged as one:\n%s", l)
			}
		})
	}
	s, _ := newLoggedStore(t)
	if got := s.Cancel("none"); got != nil {
		t.Errorf("Cancel of no load: %v", got)
	}
	// A load whose caller has already given up ends before it reads.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.Load(ctx, "m", writeFolder(t, 4096), LoadOptions{}); !errors.Is(err, context.Canceled) {
		t.Errorf("load with a cancelled context: %v", err)
	}
	leftNothing(t, s)
}

// A load in progress logs its progress every LogEvery.
func TestProgressLog(t *testing.T) {
	var logs logBuffer
	s := New(OpenMemfdArena(), Options{Logger: slog.New(slog.NewJSONHandler(&logs, nil)), LogEvery: time.Millisecond})
	t.Cleanup(func() { s.Close() })
	dir := writeFolder(t, 1<<20)
	_, err := s.Load(context.Background(), "m", dir, LoadOptions{Readers: 1, ChunkSize: 64 << 10,
		Progress: func(done, total int64) {
			if done > 0 && done < total {
				for !strings.Contains(logs.String(), `"msg":"load progress"`) { // the next tick logs it
					time.Sleep(time.Millisecond)
				}
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	l := logs.String()
	for _, want := range []string{`"msg":"loading","model":"m","source":"` + dir + `","files":2,"bytes":1052674`,
		`"msg":"load progress","model":"m","done":`, `"total":1052674,"percent":`, `"msg":"loaded","version":"m@1"`} {
		if !strings.Contains(l, want) {
			t.Errorf("log lacks %s:\n%s", want, l)
		}
	}
	if strings.LastIndex(l, "load progress") > strings.Index(l, `"msg":"loaded"`) {
		t.Error("progress logged after the load ended")
	}
}
