// Package cuda reaches the CUDA driver API at run time and NVML for discovery.
//
// The driver API (libcuda.so.1) is bound with github.com/ebitengine/purego:
// no CUDA headers or toolkit are needed at build time and the package builds
// with CGO_ENABLED=0. NVML goes through github.com/NVIDIA/go-nvml, which needs
// cgo; without cgo (or off Linux) OpenMonitor returns ErrNoDriver.
//
// Nothing is global: everything hangs off a *Driver (or a *Monitor). Without a
// library, Open and OpenMonitor return an error wrapping ErrNoDriver.
//
// # Threads and contexts
//
// CUDA's current context is per OS thread. Every method of Context, Stream and
// Slab makes the context current on a locked OS thread itself
// (runtime.LockOSThread + cuCtxSetCurrent), so they may be called from any
// goroutine, concurrently. Context.Do runs a function under the same
// arrangement for callers that want several calls on one thread; the methods
// may be called inside it too.
//
// Pointers: DevicePtr is a CUdeviceptr. Host buffers handed to RegisterHost
// or to asynchronous copies should live outside the Go heap (an mmap'ed
// memfd or tmpfs file); a Stream keeps the slices it was given referenced
// until Synchronize returns.
package cuda

import (
	"errors"
	"fmt"
	"reflect"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"
)

// ErrNoDriver is wrapped by every error that means "no usable CUDA driver or
// NVML library here": the caller should run host-only.
var ErrNoDriver = errors.New("CUDA driver not available")

// CUresult codes the package names.
const (
	CodeSuccess                 = 0
	CodeInvalidValue            = 1
	CodeOutOfMemory             = 2
	CodeNotInitialized          = 3
	CodeNoDevice                = 100
	CodeInvalidDevice           = 101
	CodeInvalidContext          = 201
	CodeInvalidHandle           = 400
	CodeNotSupported            = 801
	CodeHostMemoryAlready       = 712 // CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED
	CodeHostMemoryNotRegistered = 713
)

// Error is a failed driver call: the entry point and the driver's own name
// and description of the CUresult, e.g.
// "cuMemAlloc_v2: CUDA_ERROR_OUT_OF_MEMORY (2): out of memory".
type Error struct {
	Call        string
	Code        int
	Name        string
	Description string
}

func (e *Error) Error() string {
	var b strings.Builder
	if e.Call != "" {
		b.WriteString(e.Call)
		b.WriteString(": ")
	}
	if e.Name != "" {
		fmt.Fprintf(&b, "%s (%d)", e.Name, e.Code)
	} else {
		fmt.Fprintf(&b, "CUresult %d", e.Code)
	}
	if e.Description != "" {
		b.WriteString(": ")
		b.WriteString(e.Description)
	}
	return b.String()
}

// Is matches another *Error with the same Code (and the same Call when the
// target names one), so errors.Is(err, &cuda.Error{Code: cuda.CodeOutOfMemory})
// works.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	if !ok {
		return false
	}
	return t.Code == e.Code && (t.Call == "" || t.Call == e.Call)
}

// IsOutOfMemory reports whether err is (or wraps) CUDA_ERROR_OUT_OF_MEMORY.
func IsOutOfMemory(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Code == CodeOutOfMemory
}

// Device is one CUDA device as the driver API numbers it (CUDA ordinal, which
// depends on CUDA_VISIBLE_DEVICES: key anything durable by UUID).
type Device struct {
	Ordinal      int
	UUID         string // "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
	Name         string
	TotalMem     uint64
	PCIBusID     string // as the driver writes it: "0000:00:06.0"
	Major, Minor int    // compute capability
}

// DevicePtr is a CUdeviceptr.
type DevicePtr uint64

// IPCHandle is a CUipcMemHandle: 64 opaque bytes.
type IPCHandle [64]byte

// IsZero reports whether every byte of h is zero.
func (h IPCHandle) IsZero() bool { return h == IPCHandle{} }

// api holds the bound entry points. CUresult is int32, CUdevice int32,
// CUcontext and CUstream uintptr, size_t uint64 (64-bit platforms only).
type api struct {
	cuInit                    func(flags uint32) int32
	cuDriverGetVersion        func(v *int32) int32
	cuGetErrorName            func(code int32, s **byte) int32
	cuGetErrorString          func(code int32, s **byte) int32
	cuDeviceGetCount          func(n *int32) int32
	cuDeviceGet               func(dev *int32, ordinal int32) int32
	cuDeviceGetName           func(buf *byte, n int32, dev int32) int32
	cuDeviceGetUuid_v2        func(uuid *[16]byte, dev int32) int32
	cuDeviceTotalMem_v2       func(bytes *uint64, dev int32) int32
	cuDeviceGetPCIBusId       func(buf *byte, n int32, dev int32) int32
	cuDeviceGetAttribute      func(v *int32, attr int32, dev int32) int32
	cuDevicePrimaryCtxRetain  func(ctx *uintptr, dev int32) int32
	cuDevicePrimaryCtxRelease func(dev int32) int32 // _v2
	cuCtxSetCurrent           func(ctx uintptr) int32
	cuCtxSynchronize          func() int32
	cuMemGetInfo_v2           func(free, total *uint64) int32
	cuMemAlloc_v2             func(p *uint64, bytes uint64) int32
	cuMemFree_v2              func(p uint64) int32
	cuMemGetAddressRange_v2   func(base *uint64, size *uint64, p uint64) int32
	cuMemsetD8_v2             func(p uint64, v uint8, n uint64) int32
	cuMemHostRegister_v2      func(p unsafe.Pointer, bytes uint64, flags uint32) int32
	cuMemHostUnregister       func(p unsafe.Pointer) int32
	cuStreamCreate            func(s *uintptr, flags uint32) int32
	cuStreamSynchronize       func(s uintptr) int32
	cuStreamDestroy_v2        func(s uintptr) int32
	cuMemcpyHtoDAsync_v2      func(dst uint64, src unsafe.Pointer, n uint64, s uintptr) int32
	cuMemcpyHtoD_v2           func(dst uint64, src unsafe.Pointer, n uint64) int32
	cuMemcpyDtoH_v2           func(dst unsafe.Pointer, src uint64, n uint64) int32
	cuMemcpyDtoDAsync_v2      func(dst, src uint64, n uint64, s uintptr) int32
	cuIpcGetMemHandle         func(h *IPCHandle, p uint64) int32
	cuIpcOpenMemHandle_v2     func(p *uint64, h ipcHandleArg, flags uint32) int32
	cuIpcCloseMemHandle       func(p uint64) int32
}

// ipcHandleArg is CUipcMemHandle passed by value (a 64-byte struct).
type ipcHandleArg struct{ R [64]byte }

// symbols maps each entry point to the field it binds; openWith walks it.
func (a *api) symbols() []struct {
	name string
	fn   any
} {
	return []struct {
		name string
		fn   any
	}{
		{"cuInit", &a.cuInit},
		{"cuDriverGetVersion", &a.cuDriverGetVersion},
		{"cuGetErrorName", &a.cuGetErrorName},
		{"cuGetErrorString", &a.cuGetErrorString},
		{"cuDeviceGetCount", &a.cuDeviceGetCount},
		{"cuDeviceGet", &a.cuDeviceGet},
		{"cuDeviceGetName", &a.cuDeviceGetName},
		{"cuDeviceGetUuid_v2", &a.cuDeviceGetUuid_v2},
		{"cuDeviceTotalMem_v2", &a.cuDeviceTotalMem_v2},
		{"cuDeviceGetPCIBusId", &a.cuDeviceGetPCIBusId},
		{"cuDeviceGetAttribute", &a.cuDeviceGetAttribute},
		{"cuDevicePrimaryCtxRetain", &a.cuDevicePrimaryCtxRetain},
		{"cuDevicePrimaryCtxRelease_v2", &a.cuDevicePrimaryCtxRelease},
		{"cuCtxSetCurrent", &a.cuCtxSetCurrent},
		{"cuCtxSynchronize", &a.cuCtxSynchronize},
		{"cuMemGetInfo_v2", &a.cuMemGetInfo_v2},
		{"cuMemAlloc_v2", &a.cuMemAlloc_v2},
		{"cuMemFree_v2", &a.cuMemFree_v2},
		{"cuMemGetAddressRange_v2", &a.cuMemGetAddressRange_v2},
		{"cuMemsetD8_v2", &a.cuMemsetD8_v2},
		{"cuMemHostRegister_v2", &a.cuMemHostRegister_v2},
		{"cuMemHostUnregister", &a.cuMemHostUnregister},
		{"cuStreamCreate", &a.cuStreamCreate},
		{"cuStreamSynchronize", &a.cuStreamSynchronize},
		{"cuStreamDestroy_v2", &a.cuStreamDestroy_v2},
		{"cuMemcpyHtoDAsync_v2", &a.cuMemcpyHtoDAsync_v2},
		{"cuMemcpyHtoD_v2", &a.cuMemcpyHtoD_v2},
		{"cuMemcpyDtoH_v2", &a.cuMemcpyDtoH_v2},
		{"cuMemcpyDtoDAsync_v2", &a.cuMemcpyDtoDAsync_v2},
		{"cuIpcGetMemHandle", &a.cuIpcGetMemHandle},
		{"cuIpcOpenMemHandle_v2", &a.cuIpcOpenMemHandle_v2},
		{"cuIpcCloseMemHandle", &a.cuIpcCloseMemHandle},
	}
}

// Driver is an opened libcuda. It is safe for concurrent use.
type Driver struct {
	api     *api
	version int
	closed  atomic.Bool
	// library handle, released never: unloading libcuda under live
	// contexts or pinned memory is not safe.
	lib uintptr
}

// Open dlopens libcuda.so.1, binds the entry points and calls cuInit(0).
// Without a usable driver the error wraps ErrNoDriver and says why.
func Open() (*Driver, error) { return OpenLibrary("libcuda.so.1") }

// Binder provides one driver entry point. name is the exported symbol (the
// versioned one where a _v2 exists, e.g. "cuMemAlloc_v2"); fn is a non-nil
// pointer to a func variable with the entry point's C signature in Go terms,
// which the binder must set:
//
//   - CUresult is int32 (the only result), CUdevice int32, int int32,
//     unsigned int uint32, size_t and CUdeviceptr uint64;
//   - CUcontext and CUstream are uintptr;
//   - pointers stay pointers (*int32, *uint64, *uintptr, *byte for char*,
//     **byte for const char**, *[16]byte for CUuuid*, *[64]byte-shaped for
//     CUipcMemHandle*), host memory is unsafe.Pointer;
//   - CUipcMemHandle passed by value is a struct{ R [64]byte }-shaped struct.
//
// A binder that cannot provide name returns an error. OpenLibrary binds with
// purego; package cuda/cudatest binds to a fake driver for tests.
type Binder func(name string, fn any) error

// OpenWith binds every entry point the package uses through bind, then calls
// cuInit(0) and cuDriverGetVersion like Open. An error from bind, or an
// entry point it left nil, fails with an error wrapping ErrNoDriver; so does
// a failing cuInit.
func OpenWith(bind Binder) (*Driver, error) { return openWith(bind, 0) }

// openWith is OpenWith keeping the library handle lib: the one binding path.
func openWith(bind Binder, lib uintptr) (*Driver, error) {
	if bind == nil {
		return nil, fmt.Errorf("%w: no binder", ErrNoDriver)
	}
	a := &api{}
	for _, s := range a.symbols() {
		if err := bind(s.name, s.fn); err != nil {
			return nil, fmt.Errorf("%w: %w", ErrNoDriver, err)
		}
		if reflect.ValueOf(s.fn).Elem().IsNil() {
			return nil, fmt.Errorf("%w: binder left %s unset", ErrNoDriver, s.name)
		}
	}
	return newDriver(a, lib)
}

// EntryPoints lists the symbols OpenWith asks its binder for, in order.
func EntryPoints() []string {
	var a api
	syms := a.symbols()
	names := make([]string, len(syms))
	for i, s := range syms {
		names[i] = s.name
	}
	return names
}

func newDriver(a *api, lib uintptr) (*Driver, error) {
	d := &Driver{api: a, lib: lib}
	if err := d.check("cuInit", a.cuInit(0)); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoDriver, err)
	}
	var v int32
	if err := d.check("cuDriverGetVersion", a.cuDriverGetVersion(&v)); err != nil {
		return nil, err
	}
	d.version = int(v)
	return d, nil
}

// Version is the driver's CUDA version, e.g. 13000 for 13.0.
func (d *Driver) Version() int { return d.version }

// Close marks the driver closed. The library itself stays loaded (libcuda
// must not be unloaded while contexts or pinned memory may live); contexts,
// streams and allocations should be released first.
func (d *Driver) Close() error {
	d.closed.Store(true)
	return nil
}

var errClosed = errors.New("cuda: driver closed")

func (d *Driver) usable() error {
	if d == nil || d.api == nil {
		return ErrNoDriver
	}
	if d.closed.Load() {
		return errClosed
	}
	return nil
}

// check turns a CUresult into nil or an *Error.
func (d *Driver) check(call string, r int32) error {
	if r == CodeSuccess {
		return nil
	}
	e := &Error{Call: call, Code: int(r)}
	var s *byte
	if d.api.cuGetErrorName != nil && d.api.cuGetErrorName(r, &s) == 0 {
		e.Name = cString(s)
	}
	s = nil
	if d.api.cuGetErrorString != nil && d.api.cuGetErrorString(r, &s) == 0 {
		e.Description = cString(s)
	}
	return e
}

// cString copies a NUL-terminated C string (static driver memory).
func cString(p *byte) string {
	if p == nil {
		return ""
	}
	n := 0
	for *(*byte)(unsafe.Add(unsafe.Pointer(p), n)) != 0 {
		n++
		if n > 4096 {
			break
		}
	}
	return string(unsafe.Slice(p, n))
}

// bufString is the text before the first NUL.
func bufString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// Devices lists the devices the driver sees, in CUDA ordinal order.
func (d *Driver) Devices() ([]Device, error) {
	if err := d.usable(); err != nil {
		return nil, err
	}
	var n int32
	if err := d.check("cuDeviceGetCount", d.api.cuDeviceGetCount(&n)); err != nil {
		return nil, err
	}
	devs := make([]Device, 0, n)
	for i := range int(n) {
		dev, err := d.device(i)
		if err != nil {
			return nil, err
		}
		devs = append(devs, dev)
	}
	return devs, nil
}

func (d *Driver) device(ordinal int) (Device, error) {
	a := d.api
	var h int32
	if err := d.check("cuDeviceGet", a.cuDeviceGet(&h, int32(ordinal))); err != nil {
		return Device{}, fmt.Errorf("device %d: %w", ordinal, err)
	}
	dev := Device{Ordinal: ordinal}
	name := make([]byte, 256)
	if err := d.check("cuDeviceGetName", a.cuDeviceGetName(&name[0], int32(len(name)), h)); err != nil {
		return Device{}, err
	}
	dev.Name = bufString(name)
	var u [16]byte
	if err := d.check("cuDeviceGetUuid_v2", a.cuDeviceGetUuid_v2(&u, h)); err != nil {
		return Device{}, err
	}
	dev.UUID = FormatUUID(u)
	if err := d.check("cuDeviceTotalMem_v2", a.cuDeviceTotalMem_v2(&dev.TotalMem, h)); err != nil {
		return Device{}, err
	}
	bus := make([]byte, 64)
	if err := d.check("cuDeviceGetPCIBusId", a.cuDeviceGetPCIBusId(&bus[0], int32(len(bus)), h)); err != nil {
		return Device{}, err
	}
	dev.PCIBusID = bufString(bus)
	var major, minor int32
	if err := d.check("cuDeviceGetAttribute", a.cuDeviceGetAttribute(&major, attrComputeCapabilityMajor, h)); err != nil {
		return Device{}, err
	}
	if err := d.check("cuDeviceGetAttribute", a.cuDeviceGetAttribute(&minor, attrComputeCapabilityMinor, h)); err != nil {
		return Device{}, err
	}
	dev.Major, dev.Minor = int(major), int(minor)
	return dev, nil
}

const (
	attrComputeCapabilityMajor = 75
	attrComputeCapabilityMinor = 76
)

// Find resolves id: a CUDA ordinal ("0", "1", ...), a UUID with or without
// the "GPU-" prefix (any case), or a PCI bus id ("0000:00:06.0", NVML's
// "00000000:00:06.0" too).
func (d *Driver) Find(id string) (Device, error) {
	devs, err := d.Devices()
	if err != nil {
		return Device{}, err
	}
	return FindDevice(devs, id)
}

// Context is a device's primary context, retained. It is safe for concurrent use.
type Context struct {
	d        *Driver
	dev      Device
	cudev    int32
	ctx      uintptr
	mu       sync.Mutex
	released bool
}

// Context retains dev's primary context (the one PyTorch uses too).
func (d *Driver) Context(dev Device) (*Context, error) {
	if err := d.usable(); err != nil {
		return nil, err
	}
	var h int32
	if err := d.check("cuDeviceGet", d.api.cuDeviceGet(&h, int32(dev.Ordinal))); err != nil {
		return nil, fmt.Errorf("device %d: %w", dev.Ordinal, err)
	}
	c := &Context{d: d, dev: dev, cudev: h}
	if err := d.check("cuDevicePrimaryCtxRetain", d.api.cuDevicePrimaryCtxRetain(&c.ctx, h)); err != nil {
		return nil, fmt.Errorf("device %d (%s): %w", dev.Ordinal, dev.UUID, err)
	}
	return c, nil
}

// Device is the device this context belongs to.
func (c *Context) Device() Device { return c.dev }

// Release releases the primary context. Free allocations, destroy streams
// and unregister host memory first. A second Release is a no-op.
func (c *Context) Release() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.released {
		return nil
	}
	c.released = true
	return c.d.check("cuDevicePrimaryCtxRelease_v2", c.d.api.cuDevicePrimaryCtxRelease(c.cudev))
}

// Do runs f on a locked OS thread with the context current.
func (c *Context) Do(f func() error) error {
	c.mu.Lock()
	released := c.released
	c.mu.Unlock()
	if released {
		return errors.New("cuda: context released")
	}
	if err := c.d.usable(); err != nil {
		return err
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := c.d.check("cuCtxSetCurrent", c.d.api.cuCtxSetCurrent(c.ctx)); err != nil {
		return err
	}
	return f()
}

// call runs one entry point under Do and checks its result.
func (c *Context) call(name string, f func() int32) error {
	return c.Do(func() error { return c.d.check(name, f()) })
}

// MemInfo is the device's free and total memory as this context sees it.
func (c *Context) MemInfo() (free, total uint64, err error) {
	err = c.call("cuMemGetInfo_v2", func() int32 { return c.d.api.cuMemGetInfo_v2(&free, &total) })
	return free, total, err
}

// Synchronize waits for all work in the context.
func (c *Context) Synchronize() error {
	return c.call("cuCtxSynchronize", c.d.api.cuCtxSynchronize)
}

// Alloc allocates device memory with cuMemAlloc_v2 (exportable by IPCHandle).
func (c *Context) Alloc(bytes uint64) (DevicePtr, error) {
	var p uint64
	err := c.call("cuMemAlloc_v2", func() int32 { return c.d.api.cuMemAlloc_v2(&p, bytes) })
	return DevicePtr(p), err
}

// Free frees memory from Alloc.
func (c *Context) Free(p DevicePtr) error {
	return c.call("cuMemFree_v2", func() int32 { return c.d.api.cuMemFree_v2(uint64(p)) })
}

// AddressRange is the base and size of the allocation holding p.
func (c *Context) AddressRange(p DevicePtr) (base DevicePtr, size uint64, err error) {
	var b uint64
	err = c.call("cuMemGetAddressRange_v2", func() int32 { return c.d.api.cuMemGetAddressRange_v2(&b, &size, uint64(p)) })
	return DevicePtr(b), size, err
}

// Memset sets n bytes at p to v (synchronous with respect to the host for
// pageable semantics; use for tests and scrubbing).
func (c *Context) Memset(p DevicePtr, v byte, n uint64) error {
	return c.call("cuMemsetD8_v2", func() int32 { return c.d.api.cuMemsetD8_v2(uint64(p), v, n) })
}

// Host registration flags.
const (
	HostRegisterPortable  = 1
	HostRegisterDeviceMap = 2
	HostRegisterReadOnly  = 8 // required for PROT_READ mappings
)

// RegisterHost pins an existing host mapping (cuMemHostRegister_v2, PORTABLE).
// b should be an mmap'ed region (memfd/tmpfs), never Go heap memory. Call
// UnregisterHost before the mapping is unmapped.
func (c *Context) RegisterHost(b []byte) error {
	return c.RegisterHostFlags(b, HostRegisterPortable)
}

// RegisterHostFlags is RegisterHost with explicit CU_MEMHOSTREGISTER_* flags
// (add HostRegisterReadOnly for a PROT_READ mapping).
func (c *Context) RegisterHostFlags(b []byte, flags uint32) error {
	if len(b) == 0 {
		return nil
	}
	return c.call("cuMemHostRegister_v2", func() int32 {
		return c.d.api.cuMemHostRegister_v2(unsafe.Pointer(unsafe.SliceData(b)), uint64(len(b)), flags)
	})
}

// UnregisterHost unpins a mapping registered with RegisterHost (same start).
func (c *Context) UnregisterHost(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	return c.call("cuMemHostUnregister", func() int32 {
		return c.d.api.cuMemHostUnregister(unsafe.Pointer(unsafe.SliceData(b)))
	})
}

// CopyHtoD copies src to dst synchronously.
func (c *Context) CopyHtoD(dst DevicePtr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	return c.call("cuMemcpyHtoD_v2", func() int32 {
		return c.d.api.cuMemcpyHtoD_v2(uint64(dst), unsafe.Pointer(unsafe.SliceData(src)), uint64(len(src)))
	})
}

// CopyDtoH copies len(dst) bytes from src synchronously (for checks).
func (c *Context) CopyDtoH(dst []byte, src DevicePtr) error {
	if len(dst) == 0 {
		return nil
	}
	return c.call("cuMemcpyDtoH_v2", func() int32 {
		return c.d.api.cuMemcpyDtoH_v2(unsafe.Pointer(unsafe.SliceData(dst)), uint64(src), uint64(len(dst)))
	})
}

// IPCHandle exports the allocation holding p (cuIpcGetMemHandle). p must come
// from Alloc. An interior pointer yields the base allocation's handle:
// importers get the base, so send offsets separately. Publish a handle only
// after the copies into it are synchronized.
func (c *Context) IPCHandle(p DevicePtr) (IPCHandle, error) {
	var h IPCHandle
	err := c.call("cuIpcGetMemHandle", func() int32 { return c.d.api.cuIpcGetMemHandle(&h, uint64(p)) })
	return h, err
}

// IPCOpen maps another process's exported allocation into this context
// (cuIpcOpenMemHandle_v2, LAZY_ENABLE_PEER_ACCESS). It fails in the
// exporting process itself. Close with IPCClose.
func (c *Context) IPCOpen(h IPCHandle) (DevicePtr, error) {
	var p uint64
	err := c.call("cuIpcOpenMemHandle_v2", func() int32 {
		return c.d.api.cuIpcOpenMemHandle_v2(&p, ipcHandleArg{R: h}, 1)
	})
	return DevicePtr(p), err
}

// IPCClose unmaps memory from IPCOpen.
func (c *Context) IPCClose(p DevicePtr) error {
	return c.call("cuIpcCloseMemHandle", func() int32 { return c.d.api.cuIpcCloseMemHandle(uint64(p)) })
}

// Stream is a CUDA stream (CU_STREAM_NON_BLOCKING) in a context. It is safe
// for concurrent use; copies are ordered in the order they were enqueued.
type Stream struct {
	c       *Context
	s       uintptr
	mu      sync.Mutex
	pending [][]byte // host buffers kept referenced until Synchronize
}

// NewStream creates a non-blocking stream.
func (c *Context) NewStream() (*Stream, error) {
	var s uintptr
	if err := c.call("cuStreamCreate", func() int32 { return c.d.api.cuStreamCreate(&s, 1) }); err != nil {
		return nil, err
	}
	return &Stream{c: c, s: s}, nil
}

// CopyHtoD enqueues an asynchronous copy (cuMemcpyHtoDAsync_v2). src must
// stay valid and unchanged until Synchronize returns; it runs at full speed
// only when pinned (RegisterHost).
func (s *Stream) CopyHtoD(dst DevicePtr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.c.call("cuMemcpyHtoDAsync_v2", func() int32 {
		return s.c.d.api.cuMemcpyHtoDAsync_v2(uint64(dst), unsafe.Pointer(unsafe.SliceData(src)), uint64(len(src)), s.s)
	})
	if err == nil {
		s.pending = append(s.pending, src)
	}
	return err
}

// CopyDtoD enqueues an asynchronous device-to-device copy.
func (s *Stream) CopyDtoD(dst, src DevicePtr, n uint64) error {
	if n == 0 {
		return nil
	}
	return s.c.call("cuMemcpyDtoDAsync_v2", func() int32 {
		return s.c.d.api.cuMemcpyDtoDAsync_v2(uint64(dst), uint64(src), n, s.s)
	})
}

// Synchronize waits until everything enqueued on the stream has finished.
func (s *Stream) Synchronize() error {
	s.mu.Lock()
	n := len(s.pending)
	s.mu.Unlock()
	err := s.c.call("cuStreamSynchronize", func() int32 { return s.c.d.api.cuStreamSynchronize(s.s) })
	if err == nil {
		s.mu.Lock()
		// Drop only what was enqueued before this synchronize.
		s.pending = append(s.pending[:0], s.pending[n:]...)
		s.mu.Unlock()
	}
	return err
}

// Destroy destroys the stream (work already enqueued still completes).
func (s *Stream) Destroy() error {
	err := s.c.call("cuStreamDestroy_v2", func() int32 { return s.c.d.api.cuStreamDestroy_v2(s.s) })
	s.mu.Lock()
	s.pending = nil
	s.mu.Unlock()
	return err
}

// ParseOrdinal reports whether id is a plain decimal CUDA ordinal.
func parseOrdinal(id string) (int, bool) {
	if id == "" || strings.TrimLeft(id, "0123456789") != "" {
		return 0, false
	}
	n, err := strconv.Atoi(id)
	if err != nil {
		return 0, false
	}
	return n, true
}
