//go:build cgo

package cuda

import (
	"errors"
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Monitor reads GPU figures through NVML (libnvidia-ml.so.1, loaded at run
// time by go-nvml). It is safe for concurrent use.
type Monitor struct {
	mu     sync.Mutex
	lib    nvml.Interface
	closed bool
}

// OpenMonitor loads and initialises NVML. Without the library or a loaded
// driver the error wraps ErrNoDriver.
func OpenMonitor() (*Monitor, error) {
	return openMonitor(nvml.New())
}

// openMonitor initialises lib; nothing else is called on lib unless Init
// succeeds (go-nvml resolves its symbols lazily: calling before a
// successful Init kills the process).
func openMonitor(lib nvml.Interface) (*Monitor, error) {
	if r := lib.Init(); r != nvml.SUCCESS {
		return nil, fmt.Errorf("%w: nvmlInit: %s", ErrNoDriver, r.Error())
	}
	return &Monitor{lib: lib}, nil
}

var errMonitorClosed = errors.New("cuda: NVML monitor closed")

func nvmlErr(call string, r nvml.Return) error {
	return fmt.Errorf("%s: %s", call, r.Error())
}

// ProcessMemory is the GPU memory used on the GPU with this UUID (with or
// without "GPU-") by pid, from nvmlDeviceGetComputeRunningProcesses; 0 when
// pid has no context there. The pid is in the driver's (host) PID namespace.
// When NVML cannot tell the figure (it reports "not available", as in some
// containers) the error says so.
func (m *Monitor) ProcessMemory(uuid string, pid int) (uint64, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return 0, errMonitorClosed
	}
	u := NormalizeUUID(uuid)
	if u == "" {
		return 0, fmt.Errorf("cuda: bad GPU UUID %q", uuid)
	}
	d, r := m.lib.DeviceGetHandleByUUID(u)
	if r != nvml.SUCCESS {
		return 0, nvmlErr(fmt.Sprintf("nvmlDeviceGetHandleByUUID(%s)", u), r)
	}
	procs, r := d.GetComputeRunningProcesses()
	if r != nvml.SUCCESS {
		return 0, nvmlErr(fmt.Sprintf("GPU %s: nvmlDeviceGetComputeRunningProcesses", u), r)
	}
	var total uint64
	for _, p := range procs {
		if int(p.Pid) != pid {
			continue
		}
		if p.UsedGpuMemory == notAvailable {
			return 0, fmt.Errorf("GPU %s: memory used by pid %d not available from NVML", u, pid)
		}
		total += p.UsedGpuMemory // one entry per MIG instance
	}
	return total, nil
}

// notAvailable is NVML_VALUE_NOT_AVAILABLE as an unsigned long long.
const notAvailable = ^uint64(0)

// Close shuts NVML down (go-nvml refcounts Init/Shutdown). A second Close is a no-op.
func (m *Monitor) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	m.closed = true
	if r := m.lib.Shutdown(); r != nvml.SUCCESS {
		return nvmlErr("nvmlShutdown", r)
	}
	return nil
}
