package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/weightfs/weightfs/store/codec/codectest"
	"github.com/weightfs/weightfs/store/control"
)

// TestDaemonSnapshotReload: a pushed version (32 MB of trained-like BF16
// weights) is written to --snapshot-dir; after a clean stop, which deletes
// the host images, a restart serves it again under the same number, byte
// for byte, and numbering continues after it.
func TestDaemonSnapshotReload(t *testing.T) {
	requireFUSE(t)
	mnt, snap := t.TempDir(), filepath.Join(t.TempDir(), "snap")
	sock := filepath.Join(t.TempDir(), "control.sock")
	args := []string{"mount", mnt, "--socket", sock, "--snapshot-dir", snap, "--state-dir", testStateDir(t)}

	first := startDaemon(t, args...)
	first.waitFor(t, "the daemon to serve", func() bool { return strings.Contains(first.log(), "serving") })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var tensors []control.PushTensor
	data := map[string][]byte{}
	for i, name := range []string{"layers.0.w", "layers.1.w", "layers.2.w", "layers.3.w"} {
		b, err := codectest.Tensor(codectest.Linear, "BF16", 2048, 2048, uint64(i+1)) // 8 MB
		must(t, err)
		data[name] = b
		tensors = append(tensors, control.PushTensor{Name: name, DType: "BF16", Shape: []int64{2048, 2048}})
	}
	c := control.NewClient(sock)
	v := pushHost(ctx, t, c, tensors, data, map[string][]byte{"config.json": []byte(`{"layers": 4}`)})
	if v.Number != 1 {
		t.Fatalf("pushed %s, want m@1", v.Name)
	}
	first.waitFor(t, "the snapshot", func() bool { return strings.Contains(first.log(), "snapshot written") })
	want := map[string][]byte{}
	entries, err := os.ReadDir(filepath.Join(mnt, "m@1"))
	must(t, err)
	for _, e := range entries {
		if !e.IsDir() {
			want[e.Name()] = mustRead(t, filepath.Join(mnt, "m@1", e.Name()))
		}
	}
	if len(want) < 2 {
		t.Fatalf("m@1 serves %d files", len(want))
	}
	stop(t, first)

	second := startDaemon(t, args...)
	second.waitFor(t, "the restarted daemon to serve m@1", func() bool {
		target, err := os.Readlink(filepath.Join(mnt, "m"))
		return err == nil && target == "m@1"
	})
	if !strings.Contains(second.log(), "loaded from snapshot") {
		t.Errorf("the restarted daemon did not load the snapshot:\n%s", second.log())
	}
	for rel, b := range want {
		sameBytes(t, rel, mustRead(t, filepath.Join(mnt, "m@1", rel)), b)
	}
	v2 := pushHost(ctx, t, c, tensors, data, nil)
	if v2.Number != 2 {
		t.Errorf("the next push is %s, want m@2", v2.Name)
	}
	stop(t, second)
}

// pushHost pushes model "m" writing every tensor from the host.
func pushHost(ctx context.Context, t testing.TB, c *control.Client, tensors []control.PushTensor, data, files map[string][]byte) *control.Version {
	t.Helper()
	p, err := c.Push(ctx, "m", tensors, files)
	must(t, err)
	for _, x := range tensors {
		must(t, p.WriteHost(x.Name, data[x.Name]))
	}
	v, err := p.Commit()
	must(t, err)
	return v
}

// stop stops a daemon cleanly (SIGTERM), which unmounts.
func stop(t testing.TB, d *daemon) {
	t.Helper()
	must(t, d.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-d.done:
	case <-time.After(30 * time.Second):
		// Its goroutines say where it hangs: SIGQUIT makes Go print them.
		d.cmd.Process.Signal(syscall.SIGQUIT)
		select {
		case <-d.done:
		case <-time.After(10 * time.Second):
		}
		t.Fatalf("daemon did not exit on SIGTERM:\n%s", d.log())
	}
}
