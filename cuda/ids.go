package cuda

import (
	"fmt"
	"strings"
)

// FormatUUID writes 16 raw UUID bytes (cuDeviceGetUuid_v2) in NVML's form:
// "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx", lower case.
func FormatUUID(u [16]byte) string {
	return fmt.Sprintf("GPU-%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// NormalizeUUID returns the canonical "GPU-..." lower-case form of a GPU
// UUID given with or without the "GPU-" prefix (any case). It returns ""
// when s is not 32 hex digits in the 8-4-4-4-12 grouping (dashes optional).
// MIG UUIDs ("MIG-...") are returned lower-cased as they are.
func NormalizeUUID(s string) string {
	s = strings.ToLower(strings.TrimSpace(s))
	if strings.HasPrefix(s, "mig-") {
		return s
	}
	s = strings.TrimPrefix(s, "gpu-")
	hex := strings.ReplaceAll(s, "-", "")
	if len(hex) != 32 || strings.Trim(hex, "0123456789abcdef") != "" {
		return ""
	}
	if strings.Contains(s, "-") && len(s) != 36 {
		return ""
	}
	return "GPU-" + hex[0:8] + "-" + hex[8:12] + "-" + hex[12:16] + "-" + hex[16:20] + "-" + hex[20:32]
}

// NormalizePCIBusID returns a PCI bus id as "dddd:bb:dd.f" in lower case;
// NVML's 8-digit domain ("00000000:00:06.0") becomes the driver API's
// 4-digit one ("0000:00:06.0"). Unrecognised input is lower-cased only.
func NormalizePCIBusID(s string) string {
	s = strings.ToLower(strings.TrimSpace(s))
	dom, rest, ok := strings.Cut(s, ":")
	if !ok || !strings.Contains(rest, ":") {
		return s
	}
	if len(dom) > 4 && strings.Trim(dom[:len(dom)-4], "0") == "" {
		dom = dom[len(dom)-4:]
	}
	return dom + ":" + rest
}

// FindDevice resolves id among devs: a CUDA ordinal ("0", "1", ...), a UUID
// with or without the "GPU-" prefix (any case), or a PCI bus id.
func FindDevice(devs []Device, id string) (Device, error) {
	want := strings.TrimSpace(id)
	if want == "" {
		return Device{}, fmt.Errorf("cuda: empty GPU id")
	}
	if n, ok := parseOrdinal(want); ok {
		for _, d := range devs {
			if d.Ordinal == n {
				return d, nil
			}
		}
		return Device{}, fmt.Errorf("cuda: GPU %q not found: ordinal %d out of range (%d visible CUDA devices)", id, n, len(devs))
	}
	if u := NormalizeUUID(want); u != "" {
		for _, d := range devs {
			if NormalizeUUID(d.UUID) == u {
				return d, nil
			}
		}
		return Device{}, fmt.Errorf("cuda: GPU %q not found: no visible device has UUID %s (visible: %s)", id, u, uuids(devs))
	}
	if strings.Count(want, ":") >= 1 && strings.Contains(want, ".") {
		b := NormalizePCIBusID(want)
		for _, d := range devs {
			if NormalizePCIBusID(d.PCIBusID) == b {
				return d, nil
			}
		}
		return Device{}, fmt.Errorf("cuda: GPU %q not found: no visible device at PCI bus id %s", id, b)
	}
	return Device{}, fmt.Errorf("cuda: GPU %q not found: want a CUDA ordinal, a UUID (GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx) or a PCI bus id", id)
}

func uuids(devs []Device) string {
	if len(devs) == 0 {
		return "none"
	}
	s := make([]string, len(devs))
	for i, d := range devs {
		s[i] = d.UUID
	}
	return strings.Join(s, ", ")
}
