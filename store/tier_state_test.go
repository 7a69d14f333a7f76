package store

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/weightfs/weightfs/store/codec"
)

// compressedInState compresses v (settled) and checks its streams are files
// of the state directory that the manifest names.
func compressedInState(t *testing.T, s *Store, dir string, v *Version) {
	t.Helper()
	settle(t, v)
	if _, err := s.Compress(context.Background(), v.Model(), v.Number()); err != nil {
		t.Fatal(err)
	}
	checkCompressed(t, v)
	var m stateManifest
	raw, err := os.ReadFile(filepath.Join(dir, manifestName))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	imgs := images(t, dir)
	for _, mm := range m.Models {
		for _, mv := range mm.Versions {
			if mm.Name != v.Model() || mv.Number != v.Number() {
				continue
			}
			for _, mf := range mv.Files {
				if mf.Tier != TierCompressed || mf.Image != "" || !slices.Contains(imgs, mf.Packed) || mf.PackedSize <= 0 {
					t.Fatalf("%s/%s in the manifest: %+v (images %v)", v.Name(), mf.Path, mf, imgs)
				}
			}
			return
		}
	}
	t.Fatalf("%s is not in the manifest after its compression", v.Name())
}

// pushOnHost pushes a version of m (loaded as m@1 first), written on the
// host, and waits for its checksums.
func pushOnHost(t *testing.T, s *Store) *Version {
	t.Helper()
	base := loadBase(t, s, "m")
	st, err := s.Stage("m", manifestOf(base), nil, StageOptions{Writer: "pid 1"})
	if err != nil {
		t.Fatal(err)
	}
	writeAll(t, st, pushData(t, st, 5))
	v, err := st.Commit(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	settle(t, v)
	return v
}

// TestAdoptCompressed: a compressed version (loaded or pushed) survives a
// killed daemon in the compressed tier under its number, and restores byte
// for byte; the restore deletes its streams; a clean stop leaves nothing.
func TestAdoptCompressed(t *testing.T) {
	for _, kind := range []string{"loaded", "pushed"} {
		t.Run(kind, func(t *testing.T) {
			dir := stateDir(t)
			s, _ := openStateStore(t, dir, false)
			var v *Version
			if kind == "loaded" {
				v = loadBase(t, s, "m")
			} else {
				v = pushOnHost(t, s)
			}
			settle(t, v)
			want := snapshot(v)
			compressedInState(t, s, dir, v)
			crash(s)

			s2, res := openStateStore(t, dir, false)
			got := s2.Version("m", v.Number())
			if got == nil {
				t.Fatalf("%s not adopted: %v", v.Name(), res.Dropped)
			}
			checkCompressed(t, got)
			if s2.Model("m").Current() != got {
				t.Errorf("current %s, want %s", s2.Model("m").Current().Name(), got.Name())
			}
			for _, f := range got.Files() {
				if f.Kind() == Weights && f.Header() == nil {
					t.Errorf("%s: no header after adoption", f.Path())
				}
			}
			restoreAndCheck(t, got, want)
			// The streams are gone with the restore; the manifest names
			// the new images only.
			n := 0
			for _, x := range s2.Model("m").Versions() {
				n += len(x.Files())
			}
			if imgs := images(t, dir); len(imgs) != n {
				t.Errorf("%d files in the images folder, want %d host images: %v", len(imgs), n, imgs)
			}
			// Compressed again, then a clean stop: nothing stays.
			compressedInState(t, s2, dir, got)
			s2.Close()
			if imgs := images(t, dir); len(imgs) != 0 {
				t.Errorf("files left after a clean stop: %v", imgs)
			}
		})
	}
}

// TestAdoptCompressedDamaged: a stream damaged while the daemon was down is
// either dropped at adoption with the reason, or (a payload byte, which only
// decoding sees) fails the restore naming the file, and the version stays
// compressed while the others serve.
func TestAdoptCompressedDamaged(t *testing.T) {
	cases := []struct {
		name   string
		file   string // the file whose stream is damaged
		damage func(b []byte) []byte
		reason string // adoption drops it with this reason; "": the restore fails
	}{
		{"payload", "config.json", func(b []byte) []byte { b[len(b)-1] ^= 0x5a; return b }, ""},
		{"xxh3", "config.json", nil, ""}, // the manifest's checksum, not the stream
		{"truncated", "model-00001-of-00002.safetensors", func(b []byte) []byte { return b[:len(b)/2] }, "bytes, the manifest says"},
		{"magic", "model-00001-of-00002.safetensors", func(b []byte) []byte { b[0] ^= 0xff; return b }, "bad magic"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := stateDir(t)
			s, _ := openStateStore(t, dir, false)
			v1 := loadBase(t, s, "m")
			other := load(t, s, "other", writeShardedFolder(t, 2))
			settle(t, v1)
			wantOther := snapshot(other)
			compressedInState(t, s, dir, v1)
			var image string
			for _, f := range v1.Files() {
				if f.Path() == c.file {
					image = f.packed.image
				}
			}
			if image == "" {
				t.Fatalf("no stream for %s", c.file)
			}
			crash(s)
			p := filepath.Join(dir, imagesDir, image)
			if c.damage == nil {
				p = filepath.Join(dir, manifestName)
			}
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if c.damage == nil {
				sum, _ := v1.Files()[0].Checksum()
				b = []byte(strings.Replace(string(b), `"`+FormatChecksum(sum)+`"`, `"`+FormatChecksum(sum^1)+`"`, 1))
			} else {
				b = c.damage(b)
			}
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}

			s2, res := openStateStore(t, dir, false)
			sameVersion(t, s2.Version("other", other.Number()), wantOther)
			got := s2.Version("m", v1.Number())
			if c.reason != "" {
				if got != nil || !strings.Contains(res.Dropped["m@1"], c.reason) || !strings.Contains(res.Dropped["m@1"], c.file) {
					t.Fatalf("damaged stream: dropped %v, want a reason naming %s with %q", res.Dropped, c.file, c.reason)
				}
				if slices.Contains(images(t, dir), image) {
					t.Error("the damaged stream was not deleted")
				}
				return
			}
			if got == nil {
				t.Fatalf("not adopted: %v", res.Dropped)
			}
			got.Acquire()
			err = got.EnsureHost(context.Background())
			got.Release()
			if c.damage == nil {
				if err == nil || !strings.Contains(err.Error(), "checksum") || !strings.Contains(err.Error(), c.file) {
					t.Fatalf("restore with another recorded XXH3: %v, want a checksum mismatch naming %s", err, c.file)
				}
			} else if !errors.Is(err, codec.ErrCorrupt) || !strings.Contains(err.Error(), c.file) {
				t.Fatalf("restore of a damaged stream: %v, want a corrupt stream naming %s", err, c.file)
			}
			if got.Tier() != TierCompressed {
				t.Errorf("tier %s after a failed restore", got.Tier())
			}
			sameVersion(t, s2.Version("other", other.Number()), wantOther)
		})
	}
}

// TestCompressedUnloadFrees: unloading a compressed version deletes its
// streams at once.
func TestCompressedUnloadFrees(t *testing.T) {
	dir := stateDir(t)
	s, _ := openStateStore(t, dir, false)
	v := loadBase(t, s, "m")
	compressedInState(t, s, dir, v)
	if _, err := s.Unload("m", 0); err != nil {
		t.Fatal(err)
	}
	if imgs := images(t, dir); len(imgs) != 0 {
		t.Errorf("files left by the unload: %v", imgs)
	}
	if a := s.arena.Allocated(); a != 0 {
		t.Errorf("arena still counts %d bytes", a)
	}
}
