package cuda_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	. "github.com/weightfs/weightfs/cuda"
)

func TestErrorFormat(t *testing.T) {
	cases := []struct {
		err  Error
		want string
	}{
		{Error{Call: "cuMemAlloc_v2", Code: 2, Name: "CUDA_ERROR_OUT_OF_MEMORY", Description: "out of memory"},
			"cuMemAlloc_v2: CUDA_ERROR_OUT_OF_MEMORY (2): out of memory"},
		{Error{Call: "cuInit", Code: 100, Name: "CUDA_ERROR_NO_DEVICE"}, "cuInit: CUDA_ERROR_NO_DEVICE (100)"},
		{Error{Call: "cuFoo", Code: 12345}, "cuFoo: CUresult 12345"},
		{Error{Code: 1, Name: "CUDA_ERROR_INVALID_VALUE", Description: "invalid argument"}, "CUDA_ERROR_INVALID_VALUE (1): invalid argument"},
	}
	for _, c := range cases {
		if got := c.err.Error(); got != c.want {
			t.Errorf("Error() = %q, want %q", got, c.want)
		}
	}
}

func TestErrorIs(t *testing.T) {
	var err error = fmt.Errorf("slab: %w", &Error{Call: "cuMemAlloc_v2", Code: CodeOutOfMemory, Name: "CUDA_ERROR_OUT_OF_MEMORY"})
	if !errors.Is(err, &Error{Code: CodeOutOfMemory}) {
		t.Error("errors.Is by code failed")
	}
	if !errors.Is(err, &Error{Call: "cuMemAlloc_v2", Code: CodeOutOfMemory}) {
		t.Error("errors.Is by call and code failed")
	}
	if errors.Is(err, &Error{Call: "cuMemFree_v2", Code: CodeOutOfMemory}) {
		t.Error("errors.Is matched another call")
	}
	if errors.Is(err, &Error{Code: CodeInvalidValue}) {
		t.Error("errors.Is matched another code")
	}
	if !IsOutOfMemory(err) || IsOutOfMemory(errors.New("x")) {
		t.Error("IsOutOfMemory wrong")
	}
}

func TestFormatUUID(t *testing.T) {
	u := [16]byte{0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0xcc}
	if got, want := FormatUUID(u), "GPU-deadbeef-0102-0304-0506-0708090a0bcc"; got != want {
		t.Errorf("FormatUUID = %q, want %q", got, want)
	}
}

func TestNormalizeUUID(t *testing.T) {
	const canon = "GPU-deadbeef-0102-0304-0506-0708090a0bcc"
	cases := []struct{ in, want string }{
		{canon, canon},
		{"gpu-DEADBEEF-0102-0304-0506-0708090A0BCC", canon},
		{"deadbeef-0102-0304-0506-0708090a0bcc", canon},
		{"  deadbeef010203040506 0708090a0bcc", ""},
		{"deadbeef0102030405060708090a0bcc", canon},
		{"deadbeef-0102-0304-0506-0708090a0bc", ""},
		{"deadbeef-0102-0304-0506-0708090a0bcz", ""},
		{"dead-beef0102-0304-0506-0708090a0bcc-", ""},
		{"0", ""},
		{"MIG-Abc", "mig-abc"},
	}
	for _, c := range cases {
		if got := NormalizeUUID(c.in); got != c.want {
			t.Errorf("NormalizeUUID(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

func TestNormalizePCIBusID(t *testing.T) {
	cases := []struct{ in, want string }{
		{"00000000:00:06.0", "0000:00:06.0"},
		{"0000:00:06.0", "0000:00:06.0"},
		{"0000:1A:00.0", "0000:1a:00.0"},
		{"00000001:1a:00.0", "0001:1a:00.0"},
		{"00010000:1a:00.0", "00010000:1a:00.0"},
		{"junk", "junk"},
	}
	for _, c := range cases {
		if got := NormalizePCIBusID(c.in); got != c.want {
			t.Errorf("NormalizePCIBusID(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

var testDevs = []Device{
	{Ordinal: 0, UUID: "GPU-11111111-2222-3333-4444-555555555555", Name: "NVIDIA H200", PCIBusID: "0000:00:06.0"},
	{Ordinal: 1, UUID: "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", Name: "NVIDIA H200", PCIBusID: "0000:1A:00.0"},
}

func TestFindDevice(t *testing.T) {
	cases := []struct {
		id      string
		ordinal int    // expected ordinal when errSub == ""
		errSub  string // substring of the expected error
	}{
		{"0", 0, ""},
		{"1", 1, ""},
		{" 1 ", 1, ""},
		{"01", 1, ""},
		{"2", 0, `GPU "2" not found: ordinal 2 out of range (2 visible`},
		{"GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", 1, ""},
		{"gpu-AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE", 1, ""},
		{"aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", 1, ""},
		{"11111111-2222-3333-4444-555555555555", 0, ""},
		{"GPU-00000000-bbbb-cccc-dddd-eeeeeeeeeeee", 0, `GPU "GPU-00000000-bbbb-cccc-dddd-eeeeeeeeeeee" not found: no visible device has UUID`},
		{"00000000:1a:00.0", 1, ""},
		{"0000:00:06.0", 0, ""},
		{"0000:00:07.0", 0, `GPU "0000:00:07.0" not found: no visible device at PCI bus id`},
		{"-1", 0, `GPU "-1" not found: want a CUDA ordinal, a UUID`},
		{"h200", 0, `GPU "h200" not found`},
		{"", 0, "empty GPU id"},
	}
	for _, c := range cases {
		d, err := FindDevice(testDevs, c.id)
		if c.errSub != "" {
			if err == nil || !strings.Contains(err.Error(), c.errSub) {
				t.Errorf("FindDevice(%q) error = %v, want one containing %q", c.id, err, c.errSub)
			}
			continue
		}
		if err != nil {
			t.Errorf("FindDevice(%q): %v", c.id, err)
			continue
		}
		if d.Ordinal != c.ordinal {
			t.Errorf("FindDevice(%q) = ordinal %d, want %d", c.id, d.Ordinal, c.ordinal)
		}
	}
	if _, err := FindDevice(nil, "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"); err == nil || !strings.Contains(err.Error(), "visible: none") {
		t.Errorf("FindDevice on no devices: %v", err)
	}
}

func TestOpenMissingLibrary(t *testing.T) {
	_, err := OpenLibrary("libcuda-weightfs-does-not-exist.so.1")
	if !errors.Is(err, ErrNoDriver) {
		t.Fatalf("OpenLibrary(missing) = %v, want an error wrapping ErrNoDriver", err)
	}
	if !strings.Contains(err.Error(), "libcuda-weightfs-does-not-exist.so.1") {
		t.Errorf("error does not say which library: %v", err)
	}
}

// TestOpenNoDriver checks the no-driver path on machines without libcuda
// (CI); where a driver exists it checks Open works instead.
func TestOpenNoDriver(t *testing.T) {
	d, err := Open()
	if err != nil {
		if !errors.Is(err, ErrNoDriver) {
			t.Fatalf("Open() = %v, want an error wrapping ErrNoDriver", err)
		}
		t.Logf("no driver, as expected here: %v", err)
		return
	}
	defer d.Close()
	t.Logf("driver present: CUDA %d", d.Version())
}

func TestNilDriver(t *testing.T) {
	var d *Driver
	if _, err := d.Devices(); !errors.Is(err, ErrNoDriver) {
		t.Errorf("nil Driver Devices() = %v, want ErrNoDriver", err)
	}
}
