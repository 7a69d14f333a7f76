package integration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/weightfs/weightfs/store/codec/codectest"
	"github.com/weightfs/weightfs/store/control"
	"github.com/weightfs/weightfs/store/safetensors"
)

// writeTrainedModel writes a one-file model of mib MiB of trained-like BF16
// weights (they compress about 1.5x, as real ones do).
func writeTrainedModel(t *testing.T, dir string, mib int, seed uint64) {
	t.Helper()
	data, err := codectest.Model("BF16", mib<<20, seed)
	if err != nil {
		t.Fatal(err)
	}
	writeSafetensors(t, filepath.Join(dir, "model.safetensors"), []safetensors.Tensor{
		{Name: "w", DType: safetensors.BF16, Shape: []int64{int64(len(data) / 2)}, Data: data}})
	writeFile(t, filepath.Join(dir, "config.json"), `{"model_type": "llama"}`)
}

// twoTrainedModels writes two 12 MiB trained models (seeds seed and
// seed+1) and returns their folders and the first one's bytes.
func twoTrainedModels(t *testing.T, seed uint64) (src1, src2 string, want1 map[string][]byte) {
	t.Helper()
	src1, src2 = t.TempDir(), t.TempDir()
	writeTrainedModel(t, src1, 12, seed)
	writeTrainedModel(t, src2, 12, seed+1)
	return src1, src2, sourceBytes(t, src1)
}

// TestDaemonCompressIdle: with --compress-idle and a host budget (23 MiB)
// below two 12 MiB models, loading the second compresses the first (nobody
// has it open; about 8 MiB compressed) instead of refusing; once the second
// is unloaded, reading the first through the mount restores it, byte for
// byte.
func TestDaemonCompressIdle(t *testing.T) {
	src1, src2, want := twoTrainedModels(t, 31)
	c := startControl(t, "--model", "a="+src1, "--host-memory", "23Mi", "--compress-idle")
	tier := func(name string) string {
		t.Helper()
		out, stderr, code := c.run(t, "ls", "--json")
		if code != 0 {
			t.Fatalf("weightfs ls: %s", stderr)
		}
		var l control.List
		if err := json.Unmarshal([]byte(out), &l); err != nil {
			t.Fatal(err)
		}
		if m := findModel(l, name); m != nil && len(m.Versions) > 0 {
			return m.Versions[len(m.Versions)-1].Tier
		}
		return ""
	}

	if _, stderr, code := c.run(t, "load", "b", src2); code != 0 {
		t.Fatalf("loading b over the budget with --compress-idle: %s\n%s", stderr, c.log())
	}
	if got := tier("a"); got != "compressed" {
		t.Fatalf("a's tier after loading b: %q, want compressed\n%s", got, c.log())
	}
	if !strings.Contains(c.log(), "evicted") {
		t.Errorf("no evicted line in the log:\n%s", c.log())
	}
	if _, stderr, code := c.run(t, "unload", "b"); code != 0 {
		t.Fatalf("unload b: %s", stderr)
	}
	for rel, b := range want {
		sameBytes(t, rel, mustRead(t, filepath.Join(c.mnt, "a@1", rel)), b)
	}
	if got := tier("a"); got != "host" {
		t.Errorf("a's tier after reading it: %q, want host", got)
	}
}

// TestDaemonCompressedAfterKill: a version compressed by --compress-idle
// survives SIGKILL: the restarted daemon (same flags, same state
// directory) serves it compressed under its number, and once there is
// room, reading it through the mount restores it byte for byte.
func TestDaemonCompressedAfterKill(t *testing.T) {
	requireFUSE(t)
	src1, src2, want := twoTrainedModels(t, 41)
	mnt, sock, state := t.TempDir(), filepath.Join(t.TempDir(), "control.sock"), testStateDir(t)
	args := []string{"--model", "a=" + src1, "--host-memory", "23Mi", "--compress-idle", "--state-dir", state}
	first := startControlAt(t, mnt, sock, args...)
	first.ok(t, "load", "b", src2)
	a := findModel(first.list(t), "a")
	if a == nil || a.Versions[0].Tier != "compressed" {
		t.Fatalf("a is not compressed after loading b:\n%s", first.log())
	}
	must(t, first.cmd.Process.Signal(syscall.SIGKILL))
	<-first.done

	second := startControlAt(t, mnt, sock, args...)
	a = findModel(second.list(t), "a")
	if a == nil || len(a.Versions) != 1 || a.Versions[0].Number != 1 || a.Versions[0].Tier != "compressed" {
		t.Fatalf("a after the restart: %+v, want a@1 compressed\n%s", a, second.log())
	}
	if !strings.Contains(second.log(), "tier=compressed") || !strings.Contains(second.log(), ", compressed)\n") {
		t.Errorf("the adoption of a compressed version is not logged:\n%s", second.log())
	}
	second.ok(t, "unload", "b") // room for a's images under the budget
	for rel, b := range want {
		got, err := os.ReadFile(filepath.Join(mnt, "a@1", rel))
		if err != nil {
			t.Fatalf("read a@1/%s: %v\n%s", rel, err, second.log())
		}
		sameBytes(t, rel, got, b)
	}
	if a = findModel(second.list(t), "a"); a.Versions[0].Tier != "host" {
		t.Errorf("a's tier after reading it: %q, want host", a.Versions[0].Tier)
	}
}
