package store

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/cuda/cudatest"
)

// stateDir is a fresh state directory; as root OpenStateDir mounts a tmpfs
// on its images folder, unmounted when the test ends.
func stateDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "state")
	t.Cleanup(func() { unix.Unmount(filepath.Join(dir, imagesDir), unix.MNT_DETACH) })
	return dir
}

// openStateStore opens a store on the state directory dir and adopts.
func openStateStore(t *testing.T, dir string, fresh bool) (*Store, AdoptResult) {
	t.Helper()
	sd, err := OpenStateDir(dir, fresh)
	if err != nil {
		t.Fatal(err)
	}
	s := New(OpenStateArena(sd), Options{State: sd, Logger: quiet})
	t.Cleanup(func() { s.Close() })
	return s, s.Adopt(context.Background())
}

// crash abandons a store as a killed daemon would: its images and manifest
// stay, its mappings and descriptors go (and with them the state
// directory's lock).
func crash(s *Store) {
	s.mu.Lock()
	for _, v := range s.allVersionsLocked() {
		v.stopBackground()
		for _, f := range v.files {
			if f.buf != nil {
				f.buf.image = "" // Close keeps the file
				f.buf.Close()
			}
			if f.packed != nil {
				f.packed.image = "" // likewise
				f.packed.close()
			}
		}
	}
	s.models, s.closed = nil, true
	sd, snap := s.state, s.snap
	s.state, s.snap = nil, nil
	s.mu.Unlock()
	sd.closeFDs()
	if snap != nil {
		snap.close() // its lock
	}
}

func images(t *testing.T, dir string) []string {
	t.Helper()
	names, err := os.ReadDir(filepath.Join(dir, imagesDir))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, n := range names {
		out = append(out, n.Name())
	}
	return out
}

func snapshot(v *Version) map[string][]byte {
	out := map[string][]byte{}
	for _, f := range v.Files() {
		out[f.Path()] = bytes.Clone(f.Bytes())
	}
	return out
}

func sameVersion(t *testing.T, got *Version, want map[string][]byte) {
	t.Helper()
	if got == nil {
		t.Fatal("version not adopted")
	}
	if len(got.Files()) != len(want) {
		t.Fatalf("%s: %d files, want %d", got.Name(), len(got.Files()), len(want))
	}
	for _, f := range got.Files() {
		if !bytes.Equal(f.Bytes(), want[f.Path()]) {
			t.Errorf("%s/%s: other bytes after adoption", got.Name(), f.Path())
		}
		if f.Kind() == Weights && f.Header() == nil {
			t.Errorf("%s/%s: no header after adoption", got.Name(), f.Path())
		}
	}
}

func TestAdoptRoundTrip(t *testing.T) {
	ctx := context.Background()
	shard := "model-00001-of-00002.safetensors"
	cases := []struct {
		name   string
		change func(t *testing.T, src string) // nil: unchanged
		reason string
	}{
		{"unchanged", nil, ""},
		{"mtime", func(t *testing.T, src string) {
			p := filepath.Join(src, shard)
			later := time.Now().Add(time.Hour)
			if err := os.Chtimes(p, later, later); err != nil {
				t.Fatal(err)
			}
		}, "mtime changed"},
		{"size", func(t *testing.T, src string) {
			f, err := os.OpenFile(filepath.Join(src, "config.json"), os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteString(" ")
			f.Close()
		}, "size went from"},
		{"inode", func(t *testing.T, src string) {
			p := filepath.Join(src, shard)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			st, _ := os.Stat(p)
			if err := os.WriteFile(p+".new", b, 0o644); err != nil {
				t.Fatal(err)
			}
			os.Chtimes(p+".new", st.ModTime(), st.ModTime())
			if err := os.Rename(p+".new", p); err != nil {
				t.Fatal(err)
			}
		}, "inode changed"},
		{"missing", func(t *testing.T, src string) {
			if err := os.Remove(filepath.Join(src, "config.json")); err != nil {
				t.Fatal(err)
			}
		}, "no such file"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := stateDir(t)
			src := writeShardedFolder(t, 1)
			os.WriteFile(filepath.Join(src, "config.json"), []byte(`{"a":1}`), 0o644)
			s, _ := openStateStore(t, dir, false)
			v1, err := s.Load(ctx, "m", src, LoadOptions{})
			if err != nil {
				t.Fatal(err)
			}
			v2, err := s.Load(ctx, "m", src, LoadOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.Rollback("m", 1); err != nil {
				t.Fatal(err)
			}
			want1, want2 := snapshot(v1), snapshot(v2)
			crash(s)
			if c.change != nil {
				c.change(t, src)
			}

			s2, res := openStateStore(t, dir, false)
			if c.change == nil {
				if len(res.Adopted) != 2 || len(res.Dropped) != 0 {
					t.Fatalf("adopted %d, dropped %v", len(res.Adopted), res.Dropped)
				}
				m := s2.Model("m")
				sameVersion(t, m.Version(1), want1)
				sameVersion(t, m.Version(2), want2)
				if m.Current().Number() != 1 {
					t.Errorf("current %s, want m@1", m.Current().Name())
				}
				if s2.Serving("m", src) != m.Version(1) {
					t.Error("Serving does not find the adopted current version")
				}
				if sum, err := m.Version(1).Files()[0].WaitChecksum(ctx); err != nil || sum == 0 {
					t.Errorf("checksum after adoption: %x %v", sum, err)
				}
			} else {
				if len(res.Adopted) != 0 || len(res.Dropped) != 2 || !strings.Contains(res.Dropped["m@1"], c.reason) {
					t.Fatalf("adopted %d, dropped %v; want a reason with %q", len(res.Adopted), res.Dropped, c.reason)
				}
				if imgs := images(t, dir); len(imgs) != 0 {
					t.Errorf("images of dropped versions left: %v", imgs)
				}
				if c.name == "missing" {
					return
				}
				// Re-read from the source: the next number, not a reused one.
				v, err := s2.Load(ctx, "m", src, LoadOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if v.Number() != 3 {
					t.Errorf("re-read as %s, want m@3", v.Name())
				}
			}
			// A clean stop leaves nothing.
			s2.Close()
			if imgs := images(t, dir); len(imgs) != 0 {
				t.Errorf("images left after a clean stop: %v", imgs)
			}
			if _, err := os.Stat(filepath.Join(dir, manifestName)); !os.IsNotExist(err) {
				t.Errorf("manifest left after a clean stop: %v", err)
			}
		})
	}
}

func TestAdoptPushedByChecksum(t *testing.T) {
	for _, corrupt := range []bool{false, true} {
		t.Run(map[bool]string{false: "intact", true: "corrupted"}[corrupt], func(t *testing.T) {
			ctx := context.Background()
			dir := stateDir(t)
			s, _ := openStateStore(t, dir, false)
			v := pushOnHost(t, s)
			for _, f := range v.Files() {
				if _, err := f.WaitChecksum(ctx); err != nil {
					t.Fatal(err)
				}
			}
			s.saveState() // what Run does once the checksums are known
			want := snapshot(v)
			image := weightsFiles(v)[0].buf.image
			crash(s)
			if corrupt {
				f, err := os.OpenFile(filepath.Join(dir, imagesDir, image), os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				f.WriteAt([]byte{0xff, 0xee}, 100)
				f.Close()
			}
			s2, res := openStateStore(t, dir, false)
			got := s2.Version("m", 2)
			if corrupt {
				if got != nil || !strings.Contains(res.Dropped["m@2"], "checksum") {
					t.Fatalf("corrupted push adopted (dropped: %v)", res.Dropped)
				}
				if s2.Version("m", 1) == nil || s2.Model("m").Current().Number() != 1 {
					t.Fatal("the loaded version was not adopted")
				}
				return
			}
			sameVersion(t, got, want)
			if s2.Model("m").Current() != got {
				t.Error("the pushed version is not current")
			}
		})
	}
}

// TestAdoptFreshAndMalformed: --fresh, or a malformed manifest, deletes
// every image and stream (of a version compressed or not) an earlier
// daemon left.
func TestAdoptFreshAndMalformed(t *testing.T) {
	ctx := context.Background()
	for _, c := range []string{"fresh", "malformed", "fresh compressed", "malformed compressed"} {
		t.Run(c, func(t *testing.T) {
			dir := stateDir(t)
			s, _ := openStateStore(t, dir, false)
			v, err := s.Load(ctx, "m", writeShardedFolder(t, 2), LoadOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if strings.HasSuffix(c, "compressed") {
				compressedInState(t, s, dir, v)
			}
			crash(s)
			if len(images(t, dir)) == 0 {
				t.Fatal("nothing left by the crash")
			}
			if strings.HasPrefix(c, "malformed") {
				os.WriteFile(filepath.Join(dir, manifestName), []byte("{not json"), 0o600)
			}
			s2, res := openStateStore(t, dir, strings.HasPrefix(c, "fresh"))
			if len(res.Adopted) != 0 || s2.Model("m") != nil {
				t.Fatal("adopted")
			}
			if imgs := images(t, dir); len(imgs) != 0 {
				t.Errorf("images left: %v", imgs)
			}
		})
	}
}

func TestStateDirRefused(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	os.Mkdir(dir, 0o777)
	os.Chmod(dir, 0o777)
	if _, err := OpenStateDir(dir, false); err == nil || !strings.Contains(err.Error(), "others can write") {
		t.Errorf("a folder others can write: %v", err)
	}
	link := filepath.Join(t.TempDir(), "link")
	os.Symlink(t.TempDir(), link)
	if _, err := OpenStateDir(link, false); err == nil || !strings.Contains(err.Error(), "symlink") {
		t.Errorf("a symlink: %v", err)
	}
	good := stateDir(t)
	sd, err := OpenStateDir(good, false)
	if err != nil {
		t.Fatal(err)
	}
	defer sd.close(true)
	if _, err := OpenStateDir(good, false); err == nil || !strings.Contains(err.Error(), "another daemon") {
		t.Errorf("a second daemon: %v", err)
	}
}

// TestAdoptReplicatesToGPUs: an adopted version's weights files are copied
// to the GPUs from their host images, as a load does.
// Adoption uploads the GPU replicas from the host images, pinning the next
// file while one is copied; a failed pin or copy leaves the host copy
// serving, and nothing pinned or allocated behind (the fake checks).
func TestAdoptReplicatesToGPUs(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault *cudatest.Fault
	}{
		{"uploaded", nil},
		{"second pin fails", &cudatest.Fault{Call: "cuMemHostRegister_v2", Code: 2, After: 1}},
		{"first copy fails", &cudatest.Fault{Call: "cuMemcpyHtoDAsync_v2", Code: 700}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := stateDir(t)
			s, _ := openStateStore(t, dir, false)
			src := writeShardedFolder(t, 3)
			v, err := s.Load(context.Background(), "m", src, LoadOptions{})
			if err != nil {
				t.Fatal(err)
			}
			want := snapshot(v)
			crash(s)

			g := newGPUStore(t, cudatest.Options{}, Budgets{})
			g.Close() // only its GPUs and fake driver are used
			if tc.fault != nil {
				g.fake.Inject(*tc.fault)
			}
			sd, err := OpenStateDir(dir, false)
			if err != nil {
				t.Fatal(err)
			}
			s2 := New(OpenStateArena(sd), Options{State: sd, GPUs: g.gpus, Logger: quiet})
			defer s2.Close() // before the GPUs close and the fake checks that all is freed
			res := s2.Adopt(context.Background())
			if len(res.Adopted) != 1 {
				t.Fatalf("adopted %d, dropped %v", len(res.Adopted), res.Dropped)
			}
			got := res.Adopted[0]
			sameVersion(t, got, want)
			r := got.Residency()
			if tc.fault == nil {
				if got.GPUError() != nil {
					t.Fatal(got.GPUError())
				}
				if len(r) != 2 || r[0] != "host" {
					t.Errorf("residency %v, want the host and the GPU", r)
				}
				return
			}
			if got.GPUError() == nil {
				t.Fatal("no GPU error after a failed upload")
			}
			if len(r) != 1 || r[0] != "host" {
				t.Errorf("residency %v after a failed upload, want the host alone", r)
			}
			if p := g.fake.Pinned(); len(p) != 0 {
				t.Errorf("still pinned after a failed upload: %v", p)
			}
		})
	}
}

// Close and a manifest save (Run's, on a background request) take the
// store's lock and the manifest's in one order: a save racing the close
// never deadlocks it.
func TestCloseWhileSaving(t *testing.T) {
	for range 20 {
		s, _ := openStateStore(t, stateDir(t), false)
		if _, err := s.Load(context.Background(), "m", writeShardedFolder(t, 1), LoadOptions{}); err != nil {
			t.Fatal(err)
		}
		stop := make(chan struct{})
		saving := make(chan struct{})
		go func() {
			defer close(saving)
			for {
				select {
				case <-stop:
					return
				default:
					s.saveState()
				}
			}
		}()
		closed := make(chan error, 1)
		go func() { closed <- s.Close() }()
		select {
		case err := <-closed:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(20 * time.Second):
			t.Fatal("Close did not return while the manifest was being saved")
		}
		close(stop)
		<-saving
	}
}
