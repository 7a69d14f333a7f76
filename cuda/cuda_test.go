package cuda

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"unsafe"
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

// fakeDriver builds a Driver over a fake api that mimics a two-GPU driver,
// recording the copies it is asked for.
type fakeGPU struct {
	a       *api
	copies  []string
	current uintptr
	mem     map[uint64]uint64 // live allocations
	next    uint64
	free    uint64
}

var errStrings = map[int32][2]string{
	2:   {"CUDA_ERROR_OUT_OF_MEMORY\x00", "out of memory\x00"},
	100: {"CUDA_ERROR_NO_DEVICE\x00", "no CUDA-capable device is detected\x00"},
}

func cstr(s string) *byte { return unsafe.StringData(s) }

func newFake(initResult int32) *fakeGPU {
	f := &fakeGPU{mem: map[uint64]uint64{}, next: 0x7f0000000000, free: 8 << 30}
	f.a = &api{
		cuInit:             func(uint32) int32 { return initResult },
		cuDriverGetVersion: func(v *int32) int32 { *v = 13000; return 0 },
		cuGetErrorName: func(c int32, s **byte) int32 {
			e, ok := errStrings[c]
			if !ok {
				return 1
			}
			*s = cstr(e[0])
			return 0
		},
		cuGetErrorString: func(c int32, s **byte) int32 {
			e, ok := errStrings[c]
			if !ok {
				return 1
			}
			*s = cstr(e[1])
			return 0
		},
		cuDeviceGetCount: func(n *int32) int32 { *n = 2; return 0 },
		cuDeviceGet: func(d *int32, o int32) int32 {
			if o < 0 || o > 1 {
				return CodeInvalidDevice
			}
			*d = o
			return 0
		},
		cuDeviceGetName: func(b *byte, n int32, d int32) int32 {
			copy(unsafe.Slice(b, n), "NVIDIA H200\x00")
			return 0
		},
		cuDeviceGetUuid_v2: func(u *[16]byte, d int32) int32 {
			for i := range u {
				u[i] = byte(d*16 + int32(i))
			}
			return 0
		},
		cuDeviceTotalMem_v2: func(b *uint64, d int32) int32 { *b = 150754820096; return 0 },
		cuDeviceGetPCIBusId: func(b *byte, n int32, d int32) int32 {
			copy(unsafe.Slice(b, n), fmt.Sprintf("0000:%02x:00.0\x00", 6+d))
			return 0
		},
		cuDeviceGetAttribute: func(v *int32, attr int32, d int32) int32 {
			*v = map[int32]int32{attrComputeCapabilityMajor: 9, attrComputeCapabilityMinor: 0}[attr]
			return 0
		},
		cuDevicePrimaryCtxRetain:  func(c *uintptr, d int32) int32 { *c = uintptr(0x1000 + d); return 0 },
		cuDevicePrimaryCtxRelease: func(d int32) int32 { return 0 },
		cuCtxSetCurrent:           func(c uintptr) int32 { f.current = c; return 0 },
		cuMemGetInfo_v2:           func(free, total *uint64) int32 { *free, *total = f.free, 150754820096; return 0 },
		cuMemAlloc_v2: func(p *uint64, n uint64) int32 {
			if n > f.free {
				return CodeOutOfMemory
			}
			*p = f.next
			f.mem[f.next] = n
			f.next += AlignUp(n, 2<<20)
			f.free -= n
			return 0
		},
		cuMemFree_v2: func(p uint64) int32 {
			n, ok := f.mem[p]
			if !ok {
				return CodeInvalidValue
			}
			delete(f.mem, p)
			f.free += n
			return 0
		},
		cuStreamCreate:      func(s *uintptr, flags uint32) int32 { *s = uintptr(0x2000 + len(f.copies)); return 0 },
		cuStreamSynchronize: func(uintptr) int32 { return 0 },
		cuStreamDestroy_v2:  func(uintptr) int32 { return 0 },
		cuMemcpyHtoDAsync_v2: func(dst uint64, src unsafe.Pointer, n uint64, s uintptr) int32 {
			f.copies = append(f.copies, fmt.Sprintf("%#x<-%d@%#x", dst, n, s))
			return 0
		},
	}
	return f
}

func TestFakeDriver(t *testing.T) {
	if _, err := newDriver(newFake(CodeNoDevice).a, 0); !errors.Is(err, ErrNoDriver) ||
		!strings.Contains(err.Error(), "cuInit: CUDA_ERROR_NO_DEVICE (100): no CUDA-capable device is detected") {
		t.Fatalf("newDriver with cuInit failing = %v", err)
	}

	f := newFake(0)
	d, err := newDriver(f.a, 0)
	if err != nil {
		t.Fatal(err)
	}
	if d.Version() != 13000 {
		t.Errorf("Version = %d", d.Version())
	}
	devs, err := d.Devices()
	if err != nil {
		t.Fatal(err)
	}
	want := Device{Ordinal: 1, UUID: "GPU-10111213-1415-1617-1819-1a1b1c1d1e1f", Name: "NVIDIA H200",
		TotalMem: 150754820096, PCIBusID: "0000:07:00.0", Major: 9, Minor: 0}
	if len(devs) != 2 || devs[1] != want {
		t.Fatalf("Devices = %+v, want [1] = %+v", devs, want)
	}
	dev, err := d.Find("gpu-10111213-1415-1617-1819-1A1B1C1D1E1F")
	if err != nil || dev.Ordinal != 1 {
		t.Fatalf("Find by UUID = %+v, %v", dev, err)
	}
	c, err := d.Context(dev)
	if err != nil {
		t.Fatal(err)
	}
	free, total, err := c.MemInfo()
	if err != nil || free != 8<<30 || total != 150754820096 || f.current != 0x1001 {
		t.Fatalf("MemInfo = %d, %d, %v (current ctx %#x)", free, total, err, f.current)
	}

	_, err = c.Alloc(free + 1)
	var ce *Error
	if !errors.As(err, &ce) || ce.Name != "CUDA_ERROR_OUT_OF_MEMORY" || ce.Call != "cuMemAlloc_v2" {
		t.Fatalf("oversized Alloc = %v", err)
	}
	if got, want := err.Error(), "cuMemAlloc_v2: CUDA_ERROR_OUT_OF_MEMORY (2): out of memory"; got != want {
		t.Errorf("error text %q, want %q", got, want)
	}

	slab, err := c.NewSlab(10 << 20)
	if err != nil {
		t.Fatal(err)
	}
	s1, _ := c.NewStream()
	s2, _ := c.NewStream()
	src := make([]byte, 5<<20+3)
	if err := slab.Upload(1<<20, src, []*Stream{s1, s2}, 2<<20); err != nil {
		t.Fatal(err)
	}
	if len(f.copies) != 3 {
		t.Fatalf("copies = %v, want 3 chunks", f.copies)
	}
	wantCopies := []string{
		fmt.Sprintf("%#x<-%d@%#x", uint64(slab.Ptr)+1<<20, 2<<20, s1.s),
		fmt.Sprintf("%#x<-%d@%#x", uint64(slab.Ptr)+3<<20, 2<<20, s2.s),
		fmt.Sprintf("%#x<-%d@%#x", uint64(slab.Ptr)+5<<20, 1<<20+3, s1.s),
	}
	for i := range wantCopies {
		if f.copies[i] != wantCopies[i] {
			t.Errorf("copy %d = %s, want %s", i, f.copies[i], wantCopies[i])
		}
	}
	if len(s1.pending) != 2 || len(s2.pending) != 1 {
		t.Errorf("pending = %d, %d", len(s1.pending), len(s2.pending))
	}
	if err := SynchronizeAll([]*Stream{s1, s2}); err != nil {
		t.Fatal(err)
	}
	if len(s1.pending) != 0 || len(s2.pending) != 0 {
		t.Errorf("pending after Synchronize = %d, %d", len(s1.pending), len(s2.pending))
	}
	if err := slab.Upload(6<<20, src, []*Stream{s1}, 0); err == nil {
		t.Error("Upload past the slab's end succeeded")
	}
	if err := slab.Free(); err != nil {
		t.Fatal(err)
	}
	if err := slab.Free(); !errors.Is(err, &Error{Code: CodeInvalidValue}) {
		t.Errorf("double Free = %v", err)
	}
	if err := c.Release(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Alloc(1); err == nil {
		t.Error("Alloc after Release succeeded")
	}
	d.Close()
	if _, err := d.Devices(); err == nil {
		t.Error("Devices after Close succeeded")
	}
}

func TestAlignUp(t *testing.T) {
	for _, c := range [][3]uint64{{0, 256, 0}, {1, 256, 256}, {256, 256, 256}, {257, 256, 512}} {
		if got := AlignUp(c[0], c[1]); got != c[2] {
			t.Errorf("AlignUp(%d, %d) = %d, want %d", c[0], c[1], got, c[2])
		}
	}
}
