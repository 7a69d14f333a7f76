//go:build cgo

package cuda

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

// The go-nvml dgxh200 mock server needs github.com/google/uuid, which this
// module does not carry; the moq-generated mock types need nothing, so the
// test builds an H200 box from them.

func int8s(s string) [32]int8 {
	var b [32]int8
	for i := range len(s) {
		b[i] = int8(s[i])
	}
	return b
}

func mockH200(n int, procs map[int][]nvml.ProcessInfo) *mock.Interface {
	devs := make([]*mock.Device, n)
	byUUID := map[string]*mock.Device{}
	for i := range n {
		uuid := fmt.Sprintf("GPU-%08x-0000-4000-8000-%012x", i, i)
		bus := fmt.Sprintf("00000000:%02X:00.0", 0x18+i)
		d := &mock.Device{
			GetUUIDFunc: func() (string, nvml.Return) { return uuid, nvml.SUCCESS },
			GetNameFunc: func() (string, nvml.Return) { return "NVIDIA H200", nvml.SUCCESS },
			GetPciInfoFunc: func() (nvml.PciInfo, nvml.Return) {
				return nvml.PciInfo{BusId: int8s(bus), PciDeviceId: 0x233510de}, nvml.SUCCESS
			},
			GetMemoryInfoFunc: func() (nvml.Memory, nvml.Return) {
				return nvml.Memory{Total: 150754820096, Used: 644939776 + uint64(i)<<30, Free: 150754820096 - 644939776 - uint64(i)<<30}, nvml.SUCCESS
			},
			GetComputeRunningProcessesFunc: func() ([]nvml.ProcessInfo, nvml.Return) {
				return procs[i], nvml.SUCCESS
			},
		}
		devs[i] = d
		byUUID[uuid] = d
	}
	return &mock.Interface{
		InitFunc:           func() nvml.Return { return nvml.SUCCESS },
		ShutdownFunc:       func() nvml.Return { return nvml.SUCCESS },
		DeviceGetCountFunc: func() (int, nvml.Return) { return n, nvml.SUCCESS },
		DeviceGetHandleByIndexFunc: func(i int) (nvml.Device, nvml.Return) {
			if i < 0 || i >= n {
				return nil, nvml.ERROR_INVALID_ARGUMENT
			}
			return devs[i], nvml.SUCCESS
		},
		DeviceGetHandleByUUIDFunc: func(u string) (nvml.Device, nvml.Return) {
			d, ok := byUUID[u]
			if !ok {
				return nil, nvml.ERROR_NOT_FOUND
			}
			return d, nvml.SUCCESS
		},
	}
}

func TestMonitorMock(t *testing.T) {
	procs := map[int][]nvml.ProcessInfo{
		3: {
			{Pid: 4242, UsedGpuMemory: 17 << 30},
			{Pid: 99, UsedGpuMemory: 1 << 20},
			{Pid: 4242, UsedGpuMemory: 1 << 30}, // second MIG instance
		},
		5: {{Pid: 7, UsedGpuMemory: ^uint64(0)}},
	}
	lib := mockH200(8, procs)
	m, err := openMonitor(lib)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		uuid   string
		pid    int
		want   uint64
		errSub string
	}{
		{"GPU-00000003-0000-4000-8000-000000000003", 4242, 18 << 30, ""},
		{"00000003-0000-4000-8000-000000000003", 99, 1 << 20, ""}, // no prefix
		{"gpu-00000003-0000-4000-8000-000000000003", 1, 0, ""},    // not a user
		{"GPU-00000000-0000-4000-8000-000000000000", 4242, 0, ""}, // no processes
		{"GPU-00000005-0000-4000-8000-000000000005", 7, 0, "not available"},
		{"GPU-ffffffff-0000-4000-8000-000000000000", 1, 0, "ERROR_NOT_FOUND"},
		{"nope", 1, 0, "bad GPU UUID"},
	}
	for _, c := range cases {
		got, err := m.ProcessMemory(c.uuid, c.pid)
		if c.errSub != "" {
			if err == nil || !strings.Contains(err.Error(), c.errSub) {
				t.Errorf("ProcessMemory(%s, %d) error = %v, want %q", c.uuid, c.pid, err, c.errSub)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("ProcessMemory(%s, %d) = %d, %v; want %d", c.uuid, c.pid, got, err, c.want)
		}
	}

	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if n := len(lib.ShutdownCalls()); n != 1 {
		t.Errorf("Shutdown called %d times, want 1", n)
	}
	if _, err := m.ProcessMemory("GPU-00000003-0000-4000-8000-000000000003", 4242); err == nil {
		t.Error("ProcessMemory after Close succeeded")
	}
}

func TestMonitorInitFails(t *testing.T) {
	for _, r := range []nvml.Return{nvml.ERROR_LIBRARY_NOT_FOUND, nvml.ERROR_DRIVER_NOT_LOADED} {
		lib := &mock.Interface{InitFunc: func() nvml.Return { return r }}
		_, err := openMonitor(lib)
		if !errors.Is(err, ErrNoDriver) || !strings.Contains(err.Error(), r.Error()) {
			t.Errorf("openMonitor with Init = %v: error %v", r, err)
		}
		// Any other call would panic in the mock ("mock out the ... method").
	}
}

// TestOpenMonitor uses the real NVML: ErrNoDriver where there is none (CI),
// an open monitor that closes where there is.
func TestOpenMonitor(t *testing.T) {
	m, err := OpenMonitor()
	if err != nil {
		if !errors.Is(err, ErrNoDriver) {
			t.Fatalf("OpenMonitor() = %v, want an error wrapping ErrNoDriver", err)
		}
		t.Logf("no NVML, as expected here: %v", err)
		return
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
}
