//go:build !linux || !(amd64 || arm64)

package cuda

import "fmt"

// OpenLibrary is Open with an explicit library name or path. Off 64-bit Linux
// (amd64, arm64) there is no CUDA driver support: it always returns an error wrapping ErrNoDriver.
func OpenLibrary(name string) (*Driver, error) {
	return nil, fmt.Errorf("%w: %s: only supported on linux/amd64 and linux/arm64", ErrNoDriver, name)
}
