package demo

import (
	"fmt"
	"os"
	"path/filepath"
)

// WriteCache writes the demo model into the user's cache folder (the
// temporary folder where there is none) and returns that folder.
func WriteCache() (string, error) {
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	dir := filepath.Join(base, "weightfs", "demo")
	if err := Write(dir); err != nil {
		return "", fmt.Errorf("write demo model to %s: %w", dir, err)
	}
	return dir, nil
}
