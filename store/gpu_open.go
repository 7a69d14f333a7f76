package store

import (
	"fmt"
	"log/slog"
	"os"

	"github.com/weightfs/weightfs/cuda"
)

// OpenDevices opens the CUDA driver and the GPUs ids names (CUDA ordinals
// or UUIDs) for a daemon. Without a driver it says so once on log and
// returns no GPUs: the daemon runs host-only. An unknown device is an
// ErrInvalid error. The caller calls closeAll after closing the store.
func OpenDevices(ids []string, log *slog.Logger) (gpus *GPUs, closeAll func(), err error) {
	if len(ids) == 0 {
		return nil, func() {}, nil
	}
	driver, err := cuda.Open()
	if err != nil {
		log.Warn("no CUDA driver: running host-only", "err", err)
		return nil, func() {}, nil
	}
	gpus, err = OpenGPUs(driver, ids)
	if err != nil {
		driver.Close()
		return nil, nil, errorf(ErrInvalid, "%w", err)
	}
	for _, g := range gpus.List() {
		d := g.Device()
		log.Info("GPU residency", "gpu", d.Ordinal, "uuid", d.UUID, "name", d.Name)
	}
	return gpus, func() { gpus.Close(); driver.Close() }, nil
}

// SmallestMemory is the total memory of the smallest of the GPUs and a
// phrase naming it ("GPU 0's memory"), for a budget that applies to each;
// 0 and "" without GPUs.
func (g *GPUs) SmallestMemory() (total uint64, of string) {
	for _, gpu := range g.List() {
		if d := gpu.Device(); total == 0 || d.TotalMem < total {
			total, of = d.TotalMem, fmt.Sprintf("the memory of GPU %d (%s)", d.Ordinal, d.Name)
		}
	}
	return total, of
}

// ProcessMemory returns NVML's figure of this process's memory on a GPU
// (by UUID), or nil without GPUs or where NVML is not there (a build
// without cgo, no driver); closeMonitor lets go of NVML.
func ProcessMemory(g *GPUs, log *slog.Logger) (figure func(uuid string) uint64, closeMonitor func()) {
	if len(g.List()) == 0 {
		return nil, func() {}
	}
	mon, err := cuda.OpenMonitor()
	if err != nil {
		log.Info("NVML not available; GPU figures come from the CUDA driver", "err", err)
		return nil, func() {}
	}
	pid := os.Getpid()
	return func(uuid string) uint64 {
		n, err := mon.ProcessMemory(uuid, pid)
		if err != nil {
			return 0
		}
		return n
	}, func() { mon.Close() }
}
