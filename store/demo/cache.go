package demo

import (
	"fmt"
	"os"
	"path/filepath"
)

// WriteCache writes the demo model into a cache folder and returns that
// folder: /var/cache/weightfs/demo for root, so that every user may read the
// demo on the mount (it carries its source's permissions over, and root's
// own cache folder is closed to others); the user's cache folder otherwise
// (the temporary folder where there is none).
func WriteCache() (string, error) {
	base, err := os.UserCacheDir()
	if os.Geteuid() == 0 {
		base, err = "/var/cache", nil
	}
	if err != nil {
		base = os.TempDir()
	}
	dir := filepath.Join(base, "weightfs", "demo")
	if err := Write(dir); err != nil {
		return "", fmt.Errorf("write demo model to %s: %w", dir, err)
	}
	for d := dir; d != base; d = filepath.Dir(d) { // MkdirAll honours the umask
		if err := os.Chmod(d, 0o755); err != nil {
			return "", fmt.Errorf("write demo model to %s: %w", dir, err)
		}
	}
	return dir, nil
}
