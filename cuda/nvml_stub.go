//go:build !linux || !cgo

package cuda

import "fmt"

// Monitor reads GPU figures through NVML. This build has no NVML (it needs
// cgo on Linux): OpenMonitor always fails with ErrNoDriver.
type Monitor struct{}

// OpenMonitor returns an error wrapping ErrNoDriver in this build.
func OpenMonitor() (*Monitor, error) {
	return nil, fmt.Errorf("%w: NVML needs cgo on linux (this build has none)", ErrNoDriver)
}

// GPUs returns ErrNoDriver.

// ProcessMemory returns ErrNoDriver.
func (m *Monitor) ProcessMemory(uuid string, pid int) (uint64, error) { return 0, ErrNoDriver }

// Close does nothing.
func (m *Monitor) Close() error { return nil }
