package report_test

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/control"
	"github.com/weightfs/weightfs/store/report"
	"github.com/weightfs/weightfs/store/safetensors"
)

var v1 = control.Version{Name: "qwen@1", Model: "qwen", Number: 1, State: store.StateReady, Current: true, Files: 3,
	Bytes: 3 << 30, Residency: []string{"host", "GPU-1"}, LoadedAt: "2026-12-02T03:00:00Z", LoadSeconds: 1.5,
	LoadRate: 2 << 30, Source: "/models/qwen"}

func ExampleLoaded() {
	report.Loaded(os.Stdout, &v1)
	// Output: loaded qwen@1: 3 files, 3.0 GiB in 1.50s (2.0 GiB/s), on host, GPU-1
}

func ExampleUnloaded() {
	draining := v1
	draining.State, draining.OpenFiles, draining.HandleHolders = store.StateDraining, 2, []int{42}
	report.Unloaded(os.Stdout, []control.Version{draining, {Name: "qwen@2", State: store.StateDraining}})
	// Output:
	// unloaded qwen@1 (draining: 2 open files, 1 processes hold GPU handles)
	// unloaded qwen@2
}

func ExampleVerified() {
	report.Verified(os.Stdout, &control.Verified{Version: "qwen@1", OK: true, Files: []control.VerifiedFile{
		{Path: "config.json", Source: "/models/qwen/config.json", OK: true, SHA256: "ab12", XXH3: "00c0ffee00c0ffee"},
	}})
	report.Verified(os.Stdout, &control.Verified{Version: "policy@8", OK: true, Files: []control.VerifiedFile{
		{Path: "model.safetensors", OK: true, SHA256: "cd34", XXH3: "0123456789abcdef",
			GPUs: []control.VerifiedSlab{{GPU: "GPU-1", OK: true}}},
	}})
	// Output:
	// FILE         RESULT  XXH3              GPUS  SHA-256
	// config.json  ok      00c0ffee00c0ffee  -     ab12
	// qwen@1: every file equals its source
	// FILE               RESULT  XXH3              GPUS  SHA-256
	// model.safetensors  ok      0123456789abcdef  1 ok  cd34
	// policy@8: every file equals its recorded checksum and its GPU slabs
}

func TestVersionsAndStatus(t *testing.T) {
	draining := v1
	draining.Name, draining.State, draining.Current = "old@3", store.StateDraining, false
	st := &control.Status{
		Daemon:      control.Build{Version: "abc123", Go: "go1.26 linux/amd64"},
		MountStatus: control.MountStatus{Mountpoint: "/mnt/weightfs", ReadMode: "cached", CachedReason: "requested", DaemonReads: 7, HandleRequests: 5, HandleDenials: 1},
		Host:        control.Host{Bytes: 3 << 30, Budget: 8 << 30, Arena: "tmpfs"},
		GPUs:        []control.GPU{{Index: 0, Name: "NVIDIA H200", UUID: "GPU-1", Bytes: 1 << 30, Free: 100 << 30, Total: 140 << 30}},
		Models:      []control.Model{{Name: "qwen", Current: 1, Versions: []control.Version{v1}}},
		Draining:    []control.Version{draining},
		Loads:       []control.Load{{Name: "next", Source: "/models/next", Done: 1 << 20, Total: 4 << 20}},
	}
	var b bytes.Buffer
	report.Status(&b, st)
	out := b.String()
	for _, want := range []string{
		"daemon: weightfs abc123 (go1.26 linux/amd64)",
		"mount:  /mnt/weightfs, reads: cached (requested)",
		"host:   3.0 GiB resident (budget 8.0 GiB)",
		"GPU 0:  NVIDIA H200 GPU-1: 1.0 GiB used by weightfs, 100.0 GiB free of 140.0 GiB",
		"reads reaching the daemon: 7; GPU handle requests: 5 (1 refused)",
		"VERSION", "qwen@1 *", "host,GPU-1", "old@3", "draining",
		"loading next from /models/next: 1.0 MiB of 4.0 MiB",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	b.Reset()
	report.Verified(&b, &control.Verified{Version: "qwen@1", Files: []control.VerifiedFile{{Path: "a", Problem: "source changed"}}})
	if !strings.Contains(b.String(), "DIFFERS: source changed") || strings.Contains(b.String(), "every file") {
		t.Errorf("a failed verify reads:\n%s", b.String())
	}
}

func TestProgressOffATerminal(t *testing.T) {
	var b bytes.Buffer
	progress, done := report.Progress(&b, "loading")
	if progress != nil {
		t.Error("a progress bar on a writer that is no terminal")
	}
	done()
	if b.Len() != 0 {
		t.Errorf("wrote %q", b.String())
	}
}

func TestServed(t *testing.T) {
	dir := t.TempDir()
	var w bytes.Buffer
	if err := safetensors.Write(&w, []safetensors.Tensor{{Name: "w", DType: "U8", Shape: []int64{4}, Data: []byte{1, 2, 3, 4}}}, nil); err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{"model.safetensors": w.Bytes(), "config.json": []byte("{}")} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	st := store.New(store.OpenMemfdArena(), store.Options{})
	defer st.Close()
	v, err := st.Load(context.Background(), "tiny", dir, store.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	report.Served(&b, "/mnt/weightfs", v, 0)
	if got := b.String(); !strings.HasPrefix(got, "weightfs: tiny → /mnt/weightfs/tiny@1 (2 files, ") || !strings.HasSuffix(got, ", host)\n") {
		t.Errorf("Served = %q", got)
	}
}

func TestPushes(t *testing.T) {
	var b strings.Builder
	report.Pushes(&b, nil)
	if b.String() != "" {
		t.Errorf("no pushes printed %q", b.String())
	}
	report.Pushes(&b, []control.Push{{Name: "policy", Writer: "pid 4242 (uid 1000)", PID: 4242, UID: 1000,
		Started: "2026-12-02T10:00:00Z", Done: 1 << 30, Total: 2 << 30, Tensors: 399, TensorsWritten: 180}})
	for _, want := range []string{"staged pushes:", "policy", "pid 4242 (uid 1000)", "1.0 GiB of 2.0 GiB", "180 of 399"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("pushes %q lack %q", b.String(), want)
		}
	}
	b.Reset()
	report.Cancelled(&b, &control.Cancelled{Pushes: []control.Push{{Name: "policy", Writer: "pid 7 (uid 0)", Done: 0, Total: 1 << 20}}})
	if want := "cancelled the push of policy by pid 7 (uid 0) (0 B of 1.0 MiB written)\n"; b.String() != want {
		t.Errorf("cancelled %q, want %q", b.String(), want)
	}
}
