package integration

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/weightfs/weightfs/store"
)

// TestBadInputs loads each malformed model next to a good one that a reader
// keeps reading: every load fails with an error naming the file and the
// problem, nothing of it becomes visible, and the good model never falters.
func TestBadInputs(t *testing.T) {
	m := mountStore(t, false)
	good := t.TempDir()
	writeModel(t, good, 5, 2000)
	m.load(t, "good", good)
	goodFile := filepath.Join(m.dir, "good", "model-00001-of-00002.safetensors")
	want := mustRead(t, filepath.Join(good, "model-00001-of-00002.safetensors"))

	// A reader that keeps reading the good model during every bad load.
	var stop atomic.Bool
	var wg sync.WaitGroup
	var reads, bad atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			if got, err := os.ReadFile(goodFile); err != nil || !bytes.Equal(got, want) {
				bad.Add(1)
			}
			reads.Add(1)
		}
	}()

	f32 := func(n int) []byte { return make([]byte, 4*n) }
	withLen := func(n uint64, rest string) []byte {
		b := binary.LittleEndian.AppendUint64(nil, n)
		return append(b, rest...)
	}
	cases := []struct {
		name    string
		file    string // the file that is broken
		content []byte
		extra   func(dir string) // further changes to the folder
		want    string           // part of the error message
	}{
		{name: "truncated file", file: "model.safetensors",
			content: rawSafetensors(`{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}`, f32(3)),
			want:    "data section"},
		{name: "header length past the end", file: "model.safetensors",
			content: withLen(5000, `{"w":{}}`), want: "exceeds"},
		{name: "header over 100,000,000 bytes", file: "model.safetensors",
			content: withLen(100_000_001, `{}`), want: "100000000"},
		{name: "gap in offsets", file: "model.safetensors",
			content: rawSafetensors(`{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}`, f32(3)),
			want:    `"b"`},
		{name: "overlap in offsets", file: "model.safetensors",
			content: rawSafetensors(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}`, f32(3)),
			want:    `"b"`},
		{name: "unknown dtype", file: "model.safetensors",
			content: rawSafetensors(`{"w":{"dtype":"F12","shape":[1],"data_offsets":[0,4]}}`, f32(1)),
			want:    "F12"},
		{name: "invalid UTF-8", file: "model.safetensors",
			content: rawSafetensors("{\"w\xff\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", f32(1)),
			want:    "UTF-8"},
		{name: "invalid JSON", file: "model.safetensors",
			content: rawSafetensors(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}`, f32(1)),
			want:    "JSON"},
		{name: "non-string metadata value", file: "model.safetensors",
			content: rawSafetensors(`{"__metadata__":{"format":1},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}`, f32(1)),
			want:    "format"},
		{name: "duplicate tensor names", file: "model.safetensors",
			content: rawSafetensors(`{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, f32(2)),
			want:    `duplicate`},
		{name: "index names a missing shard", file: "model.safetensors.index.json",
			extra: func(dir string) { os.Remove(filepath.Join(dir, "model-00002-of-00002.safetensors")) },
			want:  "model-00002-of-00002.safetensors"},
		{name: "index disagrees with a shard", file: "model.safetensors.index.json",
			extra: func(dir string) {
				writeJSON(t, filepath.Join(dir, "model.safetensors.index.json"), map[string]any{"weight_map": map[string]string{
					"a.embed.weight": "model-00002-of-00002.safetensors",
				}})
			},
			want: "weight_map"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			writeModel(t, dir, 6, 16)
			if c.content != nil {
				must(t, os.WriteFile(filepath.Join(dir, c.file), c.content, 0o644))
			}
			if c.extra != nil {
				c.extra(dir)
			}
			name := "bad-" + strings.ReplaceAll(c.name, " ", "-")
			name = strings.ReplaceAll(name, ",", "")
			_, err := m.store.Load(context.Background(), name, dir, store.LoadOptions{})
			if err == nil {
				t.Fatalf("load succeeded, want an error about %s", c.name)
			}
			msg := err.Error()
			if !strings.Contains(msg, filepath.Join(dir, c.file)) || !strings.Contains(msg, c.want) {
				t.Errorf("error %q should name %s and mention %q", msg, c.file, c.want)
			}
			if m.store.Model(name) != nil {
				t.Errorf("failed load left model %s visible", name)
			}
			if _, err := os.Stat(filepath.Join(m.dir, name)); !os.IsNotExist(err) {
				t.Errorf("failed load visible on the mount: %v", err)
			}
			t.Logf("%s: %v", c.name, err)
		})
	}
	stop.Store(true)
	wg.Wait()
	if bad.Load() != 0 || reads.Load() == 0 {
		t.Errorf("good model: %d of %d reads failed or differed during the bad loads", bad.Load(), reads.Load())
	}
	if got := m.store.Stats().Versions; got != 1 {
		t.Errorf("store holds %d versions, want only the good one", got)
	}
}

// TestHuggingFaceCacheSnapshot loads a snapshot folder whose files are
// symlinks into blobs/, as huggingface_hub lays them out.
func TestHuggingFaceCacheSnapshot(t *testing.T) {
	m := mountStore(t, false)
	plain := t.TempDir()
	writeModel(t, plain, 7, 300)
	repo := filepath.Join(t.TempDir(), "models--org--tiny") // blobs serve only their own repository
	snap := filepath.Join(repo, "snapshots", "0123abcd")
	for rel, abs := range sourceFiles(t, plain) {
		blob := filepath.Join(repo, "blobs", strings.ReplaceAll(rel, "/", "_")+".blob")
		writeFile(t, blob, string(mustRead(t, abs)))
		link := filepath.Join(snap, rel)
		must(t, os.MkdirAll(filepath.Dir(link), 0o755))
		target, err := filepath.Rel(filepath.Dir(link), blob)
		must(t, err)
		must(t, os.Symlink(target, link))
	}
	m.load(t, "hf", snap)
	for rel, abs := range sourceFiles(t, plain) {
		sameBytes(t, rel, mustRead(t, filepath.Join(m.dir, "hf", rel)), mustRead(t, abs))
	}
}
