package fs

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/weightfs/weightfs/store"
)

// TestOpenRestoresCompressed: opening a file of a compressed version
// restores the version before the open returns, in both serving modes,
// and every byte reads back.
func TestOpenRestoresCompressed(t *testing.T) {
	for _, cached := range []bool{false, true} {
		st := newStore(t)
		v, m := loadModel(t, st, "m", 5)
		for _, f := range v.Files() {
			if _, err := f.WaitChecksum(context.Background()); err != nil {
				t.Fatal(err)
			}
		}
		srv := mountStore(t, st, Options{ForceCached: cached})
		var err error
		for range 100 { // the background may still be finishing
			if _, err = st.Compress(context.Background(), "m", v.Number()); err == nil {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if err != nil || v.Tier() != store.TierCompressed {
			t.Fatalf("compress: %v (tier %s)", err, v.Tier())
		}
		for _, p := range m.paths() {
			got, err := os.ReadFile(filepath.Join(srv.Mountpoint(), "m@1", filepath.FromSlash(p)))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, m[p]) {
				t.Fatalf("%s (cached %v) differs after the restore", p, cached)
			}
		}
		if v.Tier() != store.TierHost {
			t.Fatalf("tier %s after reading", v.Tier())
		}
	}
}
