package store

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// snapTierStore is a store with CompressIdle writing snapshots to a fresh
// folder, and p@1, p@2 pushed, snapshotted and compressed; want1 is p@1's
// bytes.
func snapTierStore(t *testing.T) (s *Store, logs *logBuffer, dir string, p1, p2 *Version, want1 map[string][]byte) {
	t.Helper()
	dir = filepath.Join(t.TempDir(), "snap")
	sd, err := OpenSnapshotDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	logs = &logBuffer{}
	s = New(OpenMemfdArena(), Options{Logger: slog.New(slog.NewTextHandler(logs, nil)), Snapshots: sd, CompressIdle: true})
	t.Cleanup(func() { s.Close() })
	p1, p2 = pushSnapshotted(t, s, "p", 1), pushSnapshotted(t, s, "p", 2)
	want1 = snapshot(p1)
	for _, v := range []*Version{p1, p2} {
		settle(t, v)
		if _, err := s.Compress(context.Background(), "p", v.Number()); err != nil {
			t.Fatal(err)
		}
	}
	return s, logs, dir, p1, p2, want1
}

// checkSnapshotTier checks v is in the snapshot tier: its weights files'
// streams are its snapshot's and take no host memory, the others' stay.
func checkSnapshotTier(t *testing.T, v *Version) {
	t.Helper()
	if v.Tier() != TierSnapshot {
		t.Fatalf("%s is in tier %s, want snapshot", v.Name(), v.Tier())
	}
	var plain int64
	for _, f := range v.Files() {
		want := TierSnapshot
		if f.Kind() != Weights {
			want = TierCompressed
			plain += f.packed.Size()
		}
		if r := f.Residency(); r[0] != want || f.Bytes() != nil {
			t.Errorf("%s: residency %v, want %s and no host image", f.Path(), r, want)
		}
	}
	if v.HostBytes() != plain || v.CompressedBytes() <= plain {
		t.Errorf("%s: host bytes %d (want %d, the plain files' streams), compressed bytes %d", v.Name(),
			v.HostBytes(), plain, v.CompressedBytes())
	}
}

// TestSnapshotTier: a compressed pushed version whose snapshot is on disk
// moves to the snapshot tier, frees its weights streams, and restores byte
// for byte from the snapshot; one whose snapshot is gone, differs, or that
// is open does not move.
func TestSnapshotTier(t *testing.T) {
	cases := []struct {
		name   string
		before func(t *testing.T, v *Version, dir string) (after func())
		reason string // "": moved
	}{
		{"written", nil, ""},
		{"deleted", func(t *testing.T, v *Version, dir string) func() {
			if err := os.RemoveAll(filepath.Join(dir, "p", strconv.Itoa(v.Number()))); err != nil {
				t.Fatal(err)
			}
			return nil
		}, "no such file"},
		{"differs", func(t *testing.T, v *Version, dir string) func() {
			p := filepath.Join(dir, "p", strconv.Itoa(v.Number()), snapshotManifest)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			sum, _ := weightsFiles(v)[0].Checksum()
			b = []byte(strings.Replace(string(b), FormatChecksum(sum), FormatChecksum(sum^1), 1))
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
			return nil
		}, "the version's is"},
		{"open", func(t *testing.T, v *Version, dir string) func() {
			v.Acquire()
			return v.Release
		}, "in use"},
		{"snapshot failed", func(t *testing.T, v *Version, dir string) func() {
			v.snapErr = errors.New("disk full") // its goroutine is over
			return func() { v.snapErr = nil }
		}, "to=snapshot"}, // p@2's move only: p@1 is no candidate
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, logs, dir, p1, p2, want := snapTierStore(t)
			hostBefore := p1.HostBytes()
			var after func()
			if c.before != nil {
				after = c.before(t, p1, dir)
			}
			moved := s.snapshotOne("test")
			if c.reason != "" {
				// p@2 is taken instead, then nothing is left.
				if again := s.snapshotOne("test"); again {
					t.Error("a second version was moved")
				}
			}
			if after != nil {
				after()
			}
			if c.reason != "" {
				if p1.Tier() != TierCompressed || p1.HostBytes() != hostBefore {
					t.Fatalf("p@1: tier %s, host bytes %d (were %d)", p1.Tier(), p1.HostBytes(), hostBefore)
				}
				if !moved || p2.Tier() != TierSnapshot {
					t.Errorf("p@2 not moved instead: %v, tier %s", moved, p2.Tier())
				}
				if !strings.Contains(logs.String(), c.reason) {
					t.Errorf("no %q in the log:\n%s", c.reason, logs)
				}
				return
			}
			if !moved {
				t.Fatalf("not moved:\n%s", logs)
			}
			checkSnapshotTier(t, p1)
			if p2.Tier() != TierCompressed {
				t.Errorf("p@2 moved too: %s", p2.Tier())
			}
			if !strings.Contains(logs.String(), "to=snapshot") || !strings.Contains(logs.String(), "reason=\"memory pressure: test\"") {
				t.Errorf("no log of the move:\n%s", logs)
			}
			// Pruned meanwhile: the open data files still read.
			if err := os.RemoveAll(filepath.Join(dir, "p", strconv.Itoa(p1.Number()))); err != nil {
				t.Fatal(err)
			}
			restoreAndCheck(t, p1, want)
			if s.restoreSnapshot.Load() != 1 || s.moveSnapshot.Load() != 1 {
				t.Errorf("moves counted: %d to the snapshot tier, %d restores from it", s.moveSnapshot.Load(), s.restoreSnapshot.Load())
			}
			n := testutil.CollectAndCount(s.Collector(), "weightfs_tier_moves_total")
			if n != 6 {
				t.Errorf("%d tier move series, want 6", n)
			}
		})
	}
}

// TestEvictionToSnapshot: a load refused by the host budget once every
// idle version is compressed moves the least recently used pushed version
// to its snapshot, and goes on; without a snapshot directory, a pushed
// version stays compressed and the load is refused.
func TestEvictionToSnapshot(t *testing.T) {
	for _, withSnap := range []bool{true, false} {
		t.Run(map[bool]string{true: "snapshot", false: "none"}[withSnap], func(t *testing.T) {
			s, _, _, p1, p2, want := snapTierStore(t)
			if !withSnap {
				s.snap = nil // as without --snapshot-dir (its folder closes with the test)
			}
			dirC := writeFolder(t, 1<<20)
			s.budgets.Host = s.Usage().HostBytes + dirCost(t, s, dirC) - 1
			v, err := s.Load(context.Background(), "c", dirC, LoadOptions{})
			if !withSnap {
				var be *BudgetError
				if !errors.As(err, &be) || p1.Tier() != TierCompressed || p2.Tier() != TierCompressed {
					t.Fatalf("load: %v; tiers %s, %s", err, p1.Tier(), p2.Tier())
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			settle(t, v)
			checkSnapshotTier(t, p1)
			if p2.Tier() != TierCompressed {
				t.Errorf("p@2 is %s, want compressed (one move was enough)", p2.Tier())
			}
			if _, err := s.Unload("c", 0); err != nil {
				t.Fatal(err)
			}
			restoreAndCheck(t, p1, want)
		})
	}
}

// TestAdoptSnapshotTier: a version in the snapshot tier survives a killed
// daemon in that tier (its plain files' streams from the state directory,
// its weights files' from the snapshot) and restores byte for byte; one
// whose snapshot went meanwhile is dropped, saying so.
func TestAdoptSnapshotTier(t *testing.T) {
	for _, gone := range []bool{false, true} {
		t.Run(map[bool]string{false: "intact", true: "snapshot gone"}[gone], func(t *testing.T) {
			stateD, snapD := stateDir(t), filepath.Join(t.TempDir(), "snap")
			open := func() *Store {
				sd, err := OpenStateDir(stateD, false)
				if err != nil {
					t.Fatal(err)
				}
				snap, err := OpenSnapshotDir(snapD)
				if err != nil {
					t.Fatal(err)
				}
				s := New(OpenStateArena(sd), Options{State: sd, Snapshots: snap, Logger: quiet})
				t.Cleanup(func() { s.Close() })
				return s
			}
			s := open()
			p1 := pushSnapshotted(t, s, "p", 1)
			pushSnapshotted(t, s, "p", 2)
			want := snapshot(p1)
			settle(t, p1)
			if _, err := s.Compress(context.Background(), "p", 1); err != nil {
				t.Fatal(err)
			}
			if !s.snapshotOne("test") {
				t.Fatal("not moved to the snapshot tier")
			}
			checkSnapshotTier(t, p1)
			crash(s)
			if gone {
				if err := os.RemoveAll(filepath.Join(snapD, "p", "1")); err != nil {
					t.Fatal(err)
				}
			}
			s2 := open()
			res := s2.Adopt(context.Background())
			got := s2.Version("p", 1)
			if gone {
				if got != nil || !strings.Contains(res.Dropped["p@1"], filepath.Join(snapD, "p", "1")) {
					t.Fatalf("adopted without its snapshot; dropped %v", res.Dropped)
				}
				return
			}
			if got == nil {
				t.Fatalf("not adopted: %v", res.Dropped)
			}
			checkSnapshotTier(t, got)
			restoreAndCheck(t, got, want)
		})
	}
}
