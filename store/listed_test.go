package store

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
)

// listedFiles makes files on several goroutines, hands back every file it
// made (the caller frees them on an error) and reports the failing file's
// own error, not the cancellations it caused.
func TestListedFiles(t *testing.T) {
	boom := errors.New("boom")
	for _, tc := range []struct {
		name    string
		n, fail int // fail: index that fails (-1: none)
		cancel  bool
		want    error
	}{
		{"all made", 9, -1, false, nil},
		{"none", 0, -1, false, nil},
		{"one fails", 9, 5, false, boom},
		{"first fails", 9, 0, false, boom},
		{"cancelled", 9, -1, true, context.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tc.cancel {
				cancel()
			}
			var running, peak atomic.Int32
			files, err := listedFiles(ctx, tc.n, func(i int) (*File, error) {
				r := running.Add(1)
				defer running.Add(-1)
				for p := peak.Load(); r > p && !peak.CompareAndSwap(p, r); p = peak.Load() {
				}
				if i == tc.fail {
					return nil, fmt.Errorf("file %d: %w", i, boom)
				}
				return &File{path: fmt.Sprint(i)}, nil
			})
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
			if tc.want == nil && len(files) != tc.n {
				t.Fatalf("%d files made, want %d", len(files), tc.n)
			}
			if tc.fail >= 0 && len(files) >= tc.n {
				t.Fatalf("%d files with file %d failing", len(files), tc.fail)
			}
			if p := peak.Load(); p > listedWorkers {
				t.Fatalf("%d files made at once, at most %d wanted", p, listedWorkers)
			}
		})
	}
}
