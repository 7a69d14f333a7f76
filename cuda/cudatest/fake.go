// Package cudatest is a fake CUDA driver for tests: a *cuda.Driver whose
// entry points run in Go instead of libcuda, so code that uses package cuda
// can be tested on machines without a GPU.
//
// The fake models what weightfs relies on, faithfully rather than as a stub:
//
//   - devices with UUIDs, names, PCI bus ids and total memory (default: two
//     H200s);
//   - primary contexts, retained and released, and one current context per
//     OS thread (cuCtxSetCurrent); calls that need a context fail with
//     CUDA_ERROR_INVALID_CONTEXT on a thread without one;
//   - device allocations that hold real bytes (allocated lazily in pages, so
//     large allocations cost little), cuMemGetInfo that reflects them at the
//     driver's 2 MiB granularity, and out-of-memory past a device's memory
//     or a limit set by the test;
//   - streams whose asynchronous copies run when the stream is synchronized
//     (cuStreamSynchronize, cuCtxSynchronize, cuStreamDestroy, cuMemFree),
//     so a caller that reads or exports before synchronizing sees stale
//     bytes, as it may on a GPU. Synchronous copies first finish the work of
//     blocking streams (flags 0), not that of non-blocking ones;
//   - pinned host ranges (cuMemHostRegister/Unregister, with
//     CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED and _NOT_REGISTERED);
//   - IPC handles that encode the allocation they export (DecodeIPCHandle);
//   - the driver's error names and descriptions.
//
// Tests inject failures (Inject), hold calls until they let them go (Hold),
// cap memory (SetMemoryLimit), look inside
// (Allocations, Read, Pinned, Streams, Stats, Calls) and check for leaks
// (CheckClean). A Fake is safe for concurrent use.
package cudatest

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"os"
	"reflect"
	"sort"
	"sync"
	"sync/atomic"
	"unsafe"

	"github.com/weightfs/weightfs/cuda"
)

// Device configures one fake device. Zero fields take an H200's values.
type Device struct {
	Name     string // default "NVIDIA H200"
	UUID     string // "GPU-…"; default derived from the ordinal
	PCIBusID string // default "0000:<ordinal-derived bus>:00.0"
	TotalMem uint64 // default 150754820096 (an H200's 141 GiB)
	// MemLimit, if set, is the most device memory allocations may take
	// (see SetMemoryLimit).
	MemLimit     uint64
	Major, Minor int // compute capability; default 9.0
}

// H200TotalMem is an H200's memory as cuDeviceTotalMem_v2 reports it.
const H200TotalMem = 150754820096

// Options configure a Fake.
type Options struct {
	// Devices are the fake's devices in CUDA ordinal order (nil: two H200s;
	// an empty non-nil slice: no device).
	Devices []Device
	// DriverVersion is cuDriverGetVersion's answer (default 13000).
	DriverVersion int
	// InitError, if set, is what cuInit returns (e.g. cuda.CodeNoDevice).
	InitError int
	// StrictIPCBase makes cuIpcGetMemHandle of an interior pointer fail with
	// CUDA_ERROR_INVALID_VALUE. By default it returns the handle of the
	// allocation holding the pointer, as the real driver does (measured).
	StrictIPCBase bool
	// AllowSelfIPCOpen lets cuIpcOpenMemHandle_v2 open a handle exported by
	// this same fake, standing in for another process. The real driver
	// refuses to open a handle in the exporting process
	// (CUDA_ERROR_INVALID_CONTEXT), and so does the fake by default.
	AllowSelfIPCOpen bool
}

// Granularity is the fake's allocation granularity: cuMemGetInfo and the
// memory limit count each allocation rounded up to it, and device pointers
// are aligned to it.
const Granularity = 2 << 20

// pageSize is the unit in which device bytes are materialised.
const pageSize = 64 << 10

// Allocation is a live cuMemAlloc_v2 allocation.
type Allocation struct {
	Device int // CUDA ordinal
	Ptr    cuda.DevicePtr
	Size   uint64
}

// PinnedRange is a host range registered with cuMemHostRegister_v2.
type PinnedRange struct {
	Addr  uintptr
	Size  uint64
	Flags uint32
}

// Stats count the bytes the fake's copies moved.
type Stats struct {
	HtoDBytes       uint64 // host to device, sync and async
	HtoDPinnedBytes uint64 // of which from pinned host memory
	DtoHBytes       uint64
	DtoDBytes       uint64
}

// Fault makes a call fail: after the next After calls of Call (an entry
// point's symbol, e.g. "cuMemAlloc_v2") have run as usual, the following
// Times calls (0: every one) return Code without doing anything.
type Fault struct {
	Call  string
	Code  int
	After int
	Times int
}

// Fake is a fake CUDA driver. Make one with New.
type Fake struct {
	opts Options
	id   uint64 // tells this fake's IPC handles from another's

	mu          sync.Mutex
	devs        []*device
	initialized bool
	current     map[int]uintptr // OS thread → current context
	allocs      map[uint64]*alloc
	maps        map[uint64]*ipcMapping // IPC-opened pointer → mapping
	pinned      map[uintptr]*PinnedRange
	streams     map[uintptr]*stream
	nextStream  uintptr
	nextAlloc   uint64
	faults      []*fault
	calls       map[string]int
	stats       Stats
	impls       map[string]any

	gateMu sync.Mutex // apart from mu: a held call must not block the others
	gates  map[string]*Gate
}

type device struct {
	ordinal int
	cfg     Device
	uuid    [16]byte
	nextVA  uint64
	used    uint64 // granularity-rounded bytes of live allocations
	ctxRefs int    // primary context retain count
}

type alloc struct {
	id    uint64
	dev   int
	base  uint64
	size  uint64
	pages map[uint64][]byte
}

type ipcMapping struct {
	ptr    uint64
	dev    int
	target *alloc
	refs   int
}

type stream struct {
	handle uintptr
	dev    int
	flags  uint32
	queue  []op
	err    int32 // sticky error of a queued operation
}

type op struct {
	kind     int // opHtoD, opDtoD
	dst, src uint64
	host     unsafe.Pointer
	n        uint64
}

const (
	opHtoD = iota
	opDtoD
)

type fault struct {
	Fault
	skip, left int
}

var fakeIDs atomic.Uint64

// H200 is the default configuration of device ordinal i.
func H200(i int) Device {
	return Device{
		Name:     "NVIDIA H200",
		UUID:     fmt.Sprintf("GPU-c0da0000-%04x-4000-8000-00000000%04x", i, i),
		PCIBusID: fmt.Sprintf("0000:%02x:00.0", 0x18+0x10*i),
		TotalMem: H200TotalMem,
		Major:    9,
	}
}

// New makes a fake driver. It panics on a device UUID that is not one.
func New(opts Options) *Fake {
	if opts.Devices == nil {
		opts.Devices = []Device{H200(0), H200(1)}
	}
	if opts.DriverVersion == 0 {
		opts.DriverVersion = 13000
	}
	f := &Fake{opts: opts, id: fakeIDs.Add(1), current: map[int]uintptr{},
		allocs: map[uint64]*alloc{}, maps: map[uint64]*ipcMapping{}, pinned: map[uintptr]*PinnedRange{},
		streams: map[uintptr]*stream{}, nextStream: 0x5000, calls: map[string]int{}}
	for i, d := range opts.Devices {
		def := H200(i)
		if d.Name == "" {
			d.Name = def.Name
		}
		if d.UUID == "" {
			d.UUID = def.UUID
		}
		if d.PCIBusID == "" {
			d.PCIBusID = def.PCIBusID
		}
		if d.TotalMem == 0 {
			d.TotalMem = def.TotalMem
		}
		if d.Major == 0 && d.Minor == 0 {
			d.Major = def.Major
		}
		u := cuda.NormalizeUUID(d.UUID)
		raw, err := hex.DecodeString(stripDashes(u))
		if u == "" || err != nil || len(raw) != 16 {
			panic(fmt.Sprintf("cudatest: device %d: %q is not a GPU UUID", i, d.UUID))
		}
		d.UUID = u
		dev := &device{ordinal: i, cfg: d, nextVA: 0x7000_0000_0000 + uint64(i)<<40}
		copy(dev.uuid[:], raw)
		f.devs = append(f.devs, dev)
	}
	f.impls = f.entryPoints()
	return f
}

func stripDashes(u string) string {
	out := make([]byte, 0, 32)
	for i := len("GPU-"); i < len(u); i++ {
		if u[i] != '-' {
			out = append(out, u[i])
		}
	}
	return string(out)
}

// Driver opens a *cuda.Driver on the fake through cuda.OpenWith. Each call
// opens another Driver over the same devices; it fails as cuda.Open would
// when cuInit fails (Options.InitError, or a Fault on "cuInit").
func (f *Fake) Driver() (*cuda.Driver, error) { return cuda.OpenWith(f.Bind) }

// Bind is the fake's cuda.Binder: it sets fn to the fake's implementation of
// the entry point name. An entry point the fake does not model is bound to a
// function that returns CUDA_ERROR_NOT_SUPPORTED, so nothing is left nil.
func (f *Fake) Bind(name string, fn any) error {
	dst := reflect.ValueOf(fn)
	if !dst.IsValid() || dst.Kind() != reflect.Pointer || dst.IsNil() || dst.Elem().Kind() != reflect.Func {
		return fmt.Errorf("cudatest: bind %s: want a pointer to a func variable, got %T", name, fn)
	}
	dst = dst.Elem()
	want := dst.Type()
	impl, ok := f.impls[name]
	if !ok {
		if want.NumOut() != 1 || want.Out(0).Kind() != reflect.Int32 {
			return fmt.Errorf("cudatest: bind %s: %v does not return a CUresult", name, want)
		}
		ret := []reflect.Value{reflect.ValueOf(int32(cuda.CodeNotSupported)).Convert(want.Out(0))}
		dst.Set(reflect.MakeFunc(want, func([]reflect.Value) []reflect.Value {
			f.mu.Lock()
			f.calls[name]++
			f.mu.Unlock()
			return ret
		}))
		return nil
	}
	iv := reflect.ValueOf(impl)
	it := iv.Type()
	if it.AssignableTo(want) {
		dst.Set(reflect.MakeFunc(want, func(args []reflect.Value) []reflect.Value {
			f.wait(name)
			return iv.Call(args)
		}))
		return nil
	}
	// Same shape, other named types (a by-value struct): convert each value.
	same := it.NumIn() == want.NumIn() && it.NumOut() == want.NumOut()
	for i := 0; same && i < it.NumIn(); i++ {
		same = want.In(i).Kind() == it.In(i).Kind() && want.In(i).ConvertibleTo(it.In(i))
	}
	for i := 0; same && i < it.NumOut(); i++ {
		same = want.Out(i).Kind() == it.Out(i).Kind() && it.Out(i).ConvertibleTo(want.Out(i))
	}
	if !same {
		return fmt.Errorf("cudatest: bind %s: the fake implements %v, the caller wants %v", name, it, want)
	}
	dst.Set(reflect.MakeFunc(want, func(args []reflect.Value) []reflect.Value {
		f.wait(name)
		in := make([]reflect.Value, len(args))
		for i, a := range args {
			in[i] = a.Convert(it.In(i))
		}
		out := iv.Call(in)
		for i, o := range out {
			out[i] = o.Convert(want.Out(i))
		}
		return out
	}))
	return nil
}

// Gate holds the calls of one entry point (Hold) until Release.
type Gate struct {
	arrived, released chan struct{}
	arrive, release   sync.Once
}

// Arrived is closed when the first held call arrives.
func (g *Gate) Arrived() <-chan struct{} { return g.arrived }

// Release lets the held calls, and every later one, run. It may be called
// more than once.
func (g *Gate) Release() { g.release.Do(func() { close(g.released) }) }

// Hold makes every call of entry point name (e.g. "cuMemcpyDtoH_v2") wait,
// before it does anything, until the returned gate is released: a test can
// so prove that something does not wait for that call, or act while it is
// in flight. A held call blocks only its caller.
func (f *Fake) Hold(name string) *Gate {
	g := &Gate{arrived: make(chan struct{}), released: make(chan struct{})}
	f.gateMu.Lock()
	defer f.gateMu.Unlock()
	if f.gates == nil {
		f.gates = map[string]*Gate{}
	}
	f.gates[name] = g
	return g
}

// wait blocks a call of name while a gate holds it.
func (f *Fake) wait(name string) {
	f.gateMu.Lock()
	g := f.gates[name]
	f.gateMu.Unlock()
	if g == nil {
		return
	}
	g.arrive.Do(func() { close(g.arrived) })
	<-g.released
}

// Modelled reports whether the fake implements entry point name (others
// return CUDA_ERROR_NOT_SUPPORTED).
func (f *Fake) Modelled(name string) bool {
	_, ok := f.impls[name]
	return ok
}

// Inject adds a fault. Faults apply in the order they were added.
func (f *Fake) Inject(ft Fault) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.faults = append(f.faults, &fault{Fault: ft, skip: ft.After, left: ft.Times})
}

// ClearFaults removes every fault.
func (f *Fake) ClearFaults() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.faults = nil
}

// Calls is how many times entry point name was called (failed calls too).
func (f *Fake) Calls(name string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls[name]
}

// SetMemoryLimit caps what allocations may take on device ordinal (0: the
// device's total memory). cuMemGetInfo reports the free memory under the cap
// and cuMemAlloc_v2 fails with CUDA_ERROR_OUT_OF_MEMORY past it. Live
// allocations are kept even when they exceed a new, lower cap.
func (f *Fake) SetMemoryLimit(ordinal int, limit uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.devs[ordinal].cfg.MemLimit = limit
}

// Devices is the fake's device configuration, defaults filled in.
func (f *Fake) Devices() []Device {
	out := make([]Device, len(f.devs))
	for i, d := range f.devs {
		out[i] = d.cfg
	}
	return out
}

// Allocations lists the live device allocations in address order.
func (f *Fake) Allocations() []Allocation {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]Allocation, 0, len(f.allocs))
	for _, a := range f.allocs {
		out = append(out, Allocation{Device: a.dev, Ptr: cuda.DevicePtr(a.base), Size: a.size})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ptr < out[j].Ptr })
	return out
}

// AllocatedBytes is the sum of the sizes of live allocations on device
// ordinal (as requested, not rounded to Granularity).
func (f *Fake) AllocatedBytes(ordinal int) uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	var n uint64
	for _, a := range f.allocs {
		if a.dev == ordinal {
			n += a.size
		}
	}
	return n
}

// Pinned lists the registered host ranges in address order.
func (f *Fake) Pinned() []PinnedRange {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make([]PinnedRange, 0, len(f.pinned))
	for _, p := range f.pinned {
		out = append(out, *p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Addr < out[j].Addr })
	return out
}

// IsPinned reports whether all of b lies in one registered host range.
func (f *Fake) IsPinned(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pinnedLocked(uintptr(unsafe.Pointer(unsafe.SliceData(b))), uint64(len(b)))
}

func (f *Fake) pinnedLocked(p uintptr, n uint64) bool {
	for _, r := range f.pinned {
		if p >= r.Addr && uint64(p-r.Addr)+n <= r.Size {
			return true
		}
	}
	return false
}

// Streams is the number of streams not destroyed yet.
func (f *Fake) Streams() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.streams)
}

// RetainedContexts maps each device ordinal whose primary context is
// retained to its retain count.
func (f *Fake) RetainedContexts() map[int]int {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[int]int{}
	for _, d := range f.devs {
		if d.ctxRefs > 0 {
			out[d.ordinal] = d.ctxRefs
		}
	}
	return out
}

// Stats are the bytes copied so far.
func (f *Fake) Stats() Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stats
}

// Read returns n bytes of device memory at p as they are now: work still
// queued on a stream is not included. p may point into an allocation or an
// IPC mapping.
func (f *Fake) Read(p cuda.DevicePtr, n uint64) ([]byte, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a, off, ok := f.resolve(uint64(p), n)
	if !ok {
		return nil, fmt.Errorf("cudatest: [%#x, +%d) is not device memory", uint64(p), n)
	}
	b := make([]byte, n)
	a.read(off, b)
	return b, nil
}

// Write stores b in device memory at p at once (a test's setup).
func (f *Fake) Write(p cuda.DevicePtr, b []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	a, off, ok := f.resolve(uint64(p), uint64(len(b)))
	if !ok {
		return fmt.Errorf("cudatest: [%#x, +%d) is not device memory", uint64(p), len(b))
	}
	a.write(off, b)
	return nil
}

// IPCHandleInfo is what a fake IPC handle encodes.
type IPCHandleInfo struct {
	PID    int            // the exporting process
	Device int            // CUDA ordinal of the allocation
	Ptr    cuda.DevicePtr // the allocation's base
	Size   uint64         // the allocation's size
}

var handleMagic = [8]byte{'w', 'f', 's', 'f', 'a', 'k', 'e', '1'}

// DecodeIPCHandle decodes a handle made by a Fake's cuIpcGetMemHandle.
func DecodeIPCHandle(h cuda.IPCHandle) (IPCHandleInfo, bool) {
	if [8]byte(h[:8]) != handleMagic {
		return IPCHandleInfo{}, false
	}
	le := binary.LittleEndian
	return IPCHandleInfo{
		PID:    int(le.Uint32(h[8:])),
		Device: int(le.Uint32(h[12:])),
		Ptr:    cuda.DevicePtr(le.Uint64(h[16:])),
		Size:   le.Uint64(h[24:]),
	}, true
}

// HandleAllocation is the live allocation of this fake that h exports.
func (f *Fake) HandleAllocation(h cuda.IPCHandle) (Allocation, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	a := f.handleTarget(h)
	if a == nil {
		return Allocation{}, false
	}
	return Allocation{Device: a.dev, Ptr: cuda.DevicePtr(a.base), Size: a.size}, true
}

func (f *Fake) encodeHandle(a *alloc) cuda.IPCHandle {
	var h cuda.IPCHandle
	le := binary.LittleEndian
	copy(h[:], handleMagic[:])
	le.PutUint32(h[8:], uint32(os.Getpid()))
	le.PutUint32(h[12:], uint32(a.dev))
	le.PutUint64(h[16:], a.base)
	le.PutUint64(h[24:], a.size)
	le.PutUint64(h[32:], a.id)
	le.PutUint64(h[40:], f.id)
	return h
}

// handleTarget is the live allocation h exports, or nil.
func (f *Fake) handleTarget(h cuda.IPCHandle) *alloc {
	info, ok := DecodeIPCHandle(h)
	if !ok || binary.LittleEndian.Uint64(h[40:]) != f.id {
		return nil
	}
	a := f.allocs[uint64(info.Ptr)]
	if a == nil || a.id != binary.LittleEndian.Uint64(h[32:]) {
		return nil
	}
	return a
}

// TB is the part of testing.TB that CheckClean uses.
type TB interface {
	Helper()
	Errorf(format string, args ...any)
}

// Leaks describes what is still held: device allocations, pinned host
// ranges, streams and IPC mappings. Retained contexts are not counted (see
// RetainedContexts): callers often keep them for the process's life.
func (f *Fake) Leaks() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	for _, a := range f.allocs {
		out = append(out, fmt.Sprintf("device allocation of %d bytes at %#x on device %d (%s)",
			a.size, a.base, a.dev, f.devs[a.dev].cfg.UUID))
	}
	for _, p := range f.pinned {
		out = append(out, fmt.Sprintf("pinned host range of %d bytes at %#x", p.Size, p.Addr))
	}
	for _, s := range f.streams {
		out = append(out, fmt.Sprintf("stream %#x on device %d", s.handle, s.dev))
	}
	for _, m := range f.maps {
		out = append(out, fmt.Sprintf("IPC mapping at %#x of %d bytes on device %d", m.ptr, m.target.size, m.dev))
	}
	sort.Strings(out)
	return out
}

// CheckClean fails t for everything Leaks reports.
func (f *Fake) CheckClean(t TB) {
	t.Helper()
	for _, l := range f.Leaks() {
		t.Errorf("cudatest: leaked %s", l)
	}
}

// ---- device memory ----

func (a *alloc) write(off uint64, src []byte) {
	for len(src) > 0 {
		pg, po := off/pageSize, off%pageSize
		p := a.pages[pg]
		if p == nil {
			p = make([]byte, pageSize)
			a.pages[pg] = p
		}
		n := copy(p[po:], src)
		src = src[n:]
		off += uint64(n)
	}
}

func (a *alloc) read(off uint64, dst []byte) {
	for len(dst) > 0 {
		pg, po := off/pageSize, off%pageSize
		n := min(uint64(len(dst)), pageSize-po)
		if p := a.pages[pg]; p != nil {
			copy(dst[:n], p[po:])
		} else {
			clear(dst[:n])
		}
		dst = dst[n:]
		off += n
	}
}

func (a *alloc) fill(off uint64, v byte, n uint64) {
	buf := make([]byte, min(n, pageSize))
	for i := range buf {
		buf[i] = v
	}
	for n > 0 {
		k := min(n, uint64(len(buf)))
		a.write(off, buf[:k])
		off += k
		n -= k
	}
}

// resolve finds the allocation (or IPC mapping's target) holding [p, p+n).
func (f *Fake) resolve(p, n uint64) (*alloc, uint64, bool) {
	for _, a := range f.allocs {
		if p >= a.base && p-a.base < a.size && n <= a.size-(p-a.base) {
			return a, p - a.base, true
		}
	}
	for _, m := range f.maps {
		if p >= m.ptr && p-m.ptr < m.target.size && n <= m.target.size-(p-m.ptr) {
			return m.target, p - m.ptr, true
		}
	}
	return nil, 0, false
}

// run executes one queued operation.
func (f *Fake) run(o op) int32 {
	switch o.kind {
	case opHtoD:
		a, off, ok := f.resolve(o.dst, o.n)
		if !ok {
			return CodeIllegalAddress
		}
		a.write(off, unsafe.Slice((*byte)(o.host), o.n))
	case opDtoD:
		src, soff, ok1 := f.resolve(o.src, o.n)
		dst, doff, ok2 := f.resolve(o.dst, o.n)
		if !ok1 || !ok2 {
			return CodeIllegalAddress
		}
		tmp := make([]byte, o.n)
		src.read(soff, tmp)
		dst.write(doff, tmp)
	}
	return 0
}

// flush runs a stream's queued work.
func (f *Fake) flush(s *stream) {
	for _, o := range s.queue {
		if r := f.run(o); r != 0 && s.err == 0 {
			s.err = r
		}
	}
	s.queue = nil
}

// flushWhere runs the queued work of every stream keep selects.
func (f *Fake) flushWhere(keep func(*stream) bool) {
	for _, s := range f.streams {
		if keep(s) {
			f.flush(s)
		}
	}
}

// ---- the entry points ----

// enter counts a call, applies faults and checks cuInit was called. It
// returns a non-zero CUresult when the call must fail now.
func (f *Fake) enter(name string, needInit bool) int32 {
	f.calls[name]++
	for _, ft := range f.faults {
		if ft.Call != name {
			continue
		}
		if ft.skip > 0 {
			ft.skip--
			continue
		}
		if ft.Times == 0 {
			return int32(ft.Code)
		}
		if ft.left > 0 {
			ft.left--
			return int32(ft.Code)
		}
	}
	if needInit && !f.initialized {
		return cuda.CodeNotInitialized
	}
	return 0
}

// ctxDevice is the device of the calling thread's current context.
func (f *Fake) ctxDevice() (*device, int32) {
	c, ok := f.current[tid()]
	if !ok || c == 0 {
		return nil, cuda.CodeInvalidContext
	}
	d := f.devs[ctxOrdinal(c)]
	if d.ctxRefs == 0 {
		return nil, CodeContextIsDestroyed
	}
	return d, 0
}

const ctxBase = 0xc7000

func ctxHandle(ordinal int) uintptr { return uintptr(ctxBase + ordinal) }
func ctxOrdinal(c uintptr) int      { return int(c - ctxBase) }

func (f *Fake) validCtx(c uintptr) bool {
	return c >= ctxBase && int(c-ctxBase) < len(f.devs)
}

func (f *Fake) dev(h int32) *device {
	if h < 0 || int(h) >= len(f.devs) {
		return nil
	}
	return f.devs[h]
}

func writeCString(buf *byte, n int32, s string) int32 {
	if buf == nil || n <= 0 {
		return cuda.CodeInvalidValue
	}
	b := unsafe.Slice(buf, n)
	k := copy(b[:n-1], s)
	b[k] = 0
	return 0
}

// ipcHandleArg is CUipcMemHandle by value.
type ipcHandleArg struct{ R [64]byte }

func (f *Fake) entryPoints() map[string]any {
	return map[string]any{
		"cuInit":                       f.cuInit,
		"cuDriverGetVersion":           f.cuDriverGetVersion,
		"cuGetErrorName":               f.cuGetErrorName,
		"cuGetErrorString":             f.cuGetErrorString,
		"cuDeviceGetCount":             f.cuDeviceGetCount,
		"cuDeviceGet":                  f.cuDeviceGet,
		"cuDeviceGetName":              f.cuDeviceGetName,
		"cuDeviceGetUuid_v2":           f.cuDeviceGetUuid,
		"cuDeviceTotalMem_v2":          f.cuDeviceTotalMem,
		"cuDeviceGetPCIBusId":          f.cuDeviceGetPCIBusId,
		"cuDeviceGetAttribute":         f.cuDeviceGetAttribute,
		"cuDevicePrimaryCtxRetain":     f.cuDevicePrimaryCtxRetain,
		"cuDevicePrimaryCtxRelease_v2": f.cuDevicePrimaryCtxRelease,
		"cuCtxSetCurrent":              f.cuCtxSetCurrent,
		"cuCtxSynchronize":             f.cuCtxSynchronize,
		"cuMemGetInfo_v2":              f.cuMemGetInfo,
		"cuMemAlloc_v2":                f.cuMemAlloc,
		"cuMemFree_v2":                 f.cuMemFree,
		"cuMemGetAddressRange_v2":      f.cuMemGetAddressRange,
		"cuMemsetD8_v2":                f.cuMemsetD8,
		"cuMemHostRegister_v2":         f.cuMemHostRegister,
		"cuMemHostUnregister":          f.cuMemHostUnregister,
		"cuStreamCreate":               f.cuStreamCreate,
		"cuStreamSynchronize":          f.cuStreamSynchronize,
		"cuStreamDestroy_v2":           f.cuStreamDestroy,
		"cuMemcpyHtoDAsync_v2":         f.cuMemcpyHtoDAsync,
		"cuMemcpyHtoD_v2":              f.cuMemcpyHtoD,
		"cuMemcpyDtoH_v2":              f.cuMemcpyDtoH,
		"cuMemcpyDtoDAsync_v2":         f.cuMemcpyDtoDAsync,
		"cuIpcGetMemHandle":            f.cuIpcGetMemHandle,
		"cuIpcOpenMemHandle_v2":        f.cuIpcOpenMemHandle,
		"cuIpcCloseMemHandle":          f.cuIpcCloseMemHandle,
	}
}

func (f *Fake) cuInit(flags uint32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuInit", false); r != 0 {
		return r
	}
	if flags != 0 {
		return cuda.CodeInvalidValue
	}
	if f.opts.InitError != 0 {
		return int32(f.opts.InitError)
	}
	f.initialized = true
	return 0
}

func (f *Fake) cuDriverGetVersion(v *int32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuDriverGetVersion", false); r != 0 {
		return r
	}
	if v == nil {
		return cuda.CodeInvalidValue
	}
	*v = int32(f.opts.DriverVersion)
	return 0
}

func (f *Fake) errorText(name string, code int32, s **byte, which int) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter(name, false); r != 0 {
		return r
	}
	e, ok := errorText[code]
	if !ok || s == nil {
		return cuda.CodeInvalidValue
	}
	*s = unsafe.StringData(e[which])
	return 0
}

func (f *Fake) cuGetErrorName(code int32, s **byte) int32 {
	return f.errorText("cuGetErrorName", code, s, 0)
}

func (f *Fake) cuGetErrorString(code int32, s **byte) int32 {
	return f.errorText("cuGetErrorString", code, s, 1)
}

func (f *Fake) cuDeviceGetCount(n *int32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuDeviceGetCount", true); r != 0 {
		return r
	}
	*n = int32(len(f.devs))
	return 0
}

func (f *Fake) cuDeviceGet(dev *int32, ordinal int32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuDeviceGet", true); r != 0 {
		return r
	}
	if f.dev(ordinal) == nil {
		return cuda.CodeInvalidDevice
	}
	*dev = ordinal
	return 0
}

func (f *Fake) cuDeviceGetName(buf *byte, n int32, h int32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuDeviceGetName", true); r != 0 {
		return r
	}
	d := f.dev(h)
	if d == nil {
		return cuda.CodeInvalidDevice
	}
	return writeCString(buf, n, d.cfg.Name)
}

func (f *Fake) cuDeviceGetUuid(u *[16]byte, h int32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuDeviceGetUuid_v2", true); r != 0 {
		return r
	}
	d := f.dev(h)
	if d == nil {
		return cuda.CodeInvalidDevice
	}
	*u = d.uuid
	return 0
}

func (f *Fake) cuDeviceTotalMem(b *uint64, h int32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuDeviceTotalMem_v2", true); r != 0 {
		return r
	}
	d := f.dev(h)
	if d == nil {
		return cuda.CodeInvalidDevice
	}
	*b = d.cfg.TotalMem
	return 0
}

func (f *Fake) cuDeviceGetPCIBusId(buf *byte, n int32, h int32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuDeviceGetPCIBusId", true); r != 0 {
		return r
	}
	d := f.dev(h)
	if d == nil {
		return cuda.CodeInvalidDevice
	}
	return writeCString(buf, n, d.cfg.PCIBusID)
}

// Device attributes the fake answers.
const (
	attrComputeCapabilityMajor = 75
	attrComputeCapabilityMinor = 76
)

func (f *Fake) cuDeviceGetAttribute(v *int32, attr int32, h int32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuDeviceGetAttribute", true); r != 0 {
		return r
	}
	d := f.dev(h)
	if d == nil {
		return cuda.CodeInvalidDevice
	}
	switch attr {
	case attrComputeCapabilityMajor:
		*v = int32(d.cfg.Major)
	case attrComputeCapabilityMinor:
		*v = int32(d.cfg.Minor)
	default:
		return cuda.CodeInvalidValue
	}
	return 0
}

func (f *Fake) cuDevicePrimaryCtxRetain(c *uintptr, h int32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuDevicePrimaryCtxRetain", true); r != 0 {
		return r
	}
	d := f.dev(h)
	if d == nil {
		return cuda.CodeInvalidDevice
	}
	d.ctxRefs++
	*c = ctxHandle(d.ordinal)
	return 0
}

func (f *Fake) cuDevicePrimaryCtxRelease(h int32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuDevicePrimaryCtxRelease_v2", true); r != 0 {
		return r
	}
	d := f.dev(h)
	if d == nil {
		return cuda.CodeInvalidDevice
	}
	if d.ctxRefs == 0 {
		return cuda.CodeInvalidContext
	}
	d.ctxRefs--
	return 0
}

func (f *Fake) cuCtxSetCurrent(c uintptr) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuCtxSetCurrent", true); r != 0 {
		return r
	}
	if c == 0 {
		delete(f.current, tid())
		return 0
	}
	if !f.validCtx(c) || f.devs[ctxOrdinal(c)].ctxRefs == 0 {
		return cuda.CodeInvalidContext
	}
	f.current[tid()] = c
	return 0
}

func (f *Fake) cuCtxSynchronize() int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuCtxSynchronize", true); r != 0 {
		return r
	}
	d, r := f.ctxDevice()
	if r != 0 {
		return r
	}
	var sticky int32
	f.flushWhere(func(s *stream) bool { return s.dev == d.ordinal })
	for _, s := range f.streams {
		if s.dev == d.ordinal && s.err != 0 && sticky == 0 {
			sticky = s.err
		}
	}
	return sticky
}

func (d *device) capacity() uint64 {
	c := d.cfg.TotalMem
	if d.cfg.MemLimit > 0 {
		c = min(c, d.cfg.MemLimit)
	}
	return c
}

func (f *Fake) cuMemGetInfo(free, total *uint64) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuMemGetInfo_v2", true); r != 0 {
		return r
	}
	d, r := f.ctxDevice()
	if r != 0 {
		return r
	}
	c := d.capacity()
	*free = 0
	if d.used < c {
		*free = c - d.used
	}
	*total = d.cfg.TotalMem
	return 0
}

func roundUp(n, a uint64) uint64 { return (n + a - 1) / a * a }

func (f *Fake) cuMemAlloc(p *uint64, n uint64) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuMemAlloc_v2", true); r != 0 {
		return r
	}
	d, r := f.ctxDevice()
	if r != 0 {
		return r
	}
	if n == 0 || p == nil {
		return cuda.CodeInvalidValue
	}
	rounded := roundUp(n, Granularity)
	if c := d.capacity(); d.used > c || rounded > c-d.used {
		return cuda.CodeOutOfMemory
	}
	f.nextAlloc++
	a := &alloc{id: f.nextAlloc, dev: d.ordinal, base: d.nextVA, size: n, pages: map[uint64][]byte{}}
	d.nextVA += rounded
	d.used += rounded
	f.allocs[a.base] = a
	*p = a.base
	return 0
}

func (f *Fake) cuMemFree(p uint64) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuMemFree_v2", true); r != 0 {
		return r
	}
	if _, r := f.ctxDevice(); r != 0 {
		return r
	}
	if p == 0 {
		return 0
	}
	a := f.allocs[p]
	if a == nil {
		return cuda.CodeInvalidValue
	}
	// cuMemFree synchronizes: queued work that touches the memory completes.
	f.flushWhere(func(*stream) bool { return true })
	delete(f.allocs, p)
	f.devs[a.dev].used -= roundUp(a.size, Granularity)
	return 0
}

func (f *Fake) cuMemGetAddressRange(base, size *uint64, p uint64) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuMemGetAddressRange_v2", true); r != 0 {
		return r
	}
	if _, r := f.ctxDevice(); r != 0 {
		return r
	}
	var b, n uint64
	if a, off, ok := f.resolve(p, 0); ok {
		b, n = p-off, a.size
	} else {
		return CodeNotFound
	}
	if base != nil {
		*base = b
	}
	if size != nil {
		*size = n
	}
	return 0
}

func (f *Fake) cuMemsetD8(p uint64, v uint8, n uint64) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuMemsetD8_v2", true); r != 0 {
		return r
	}
	d, r := f.ctxDevice()
	if r != 0 {
		return r
	}
	a, off, ok := f.resolve(p, n)
	if !ok {
		return cuda.CodeInvalidValue
	}
	f.flushWhere(func(s *stream) bool { return s.dev == d.ordinal && s.flags == 0 })
	a.fill(off, v, n)
	return 0
}

func (f *Fake) cuMemHostRegister(p unsafe.Pointer, n uint64, flags uint32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuMemHostRegister_v2", true); r != 0 {
		return r
	}
	if _, r := f.ctxDevice(); r != 0 {
		return r
	}
	if p == nil || n == 0 || flags&^0xf != 0 {
		return cuda.CodeInvalidValue
	}
	addr := uintptr(p)
	for _, r := range f.pinned {
		if addr < r.Addr+uintptr(r.Size) && r.Addr < addr+uintptr(n) {
			return cuda.CodeHostMemoryAlready
		}
	}
	f.pinned[addr] = &PinnedRange{Addr: addr, Size: n, Flags: flags}
	return 0
}

func (f *Fake) cuMemHostUnregister(p unsafe.Pointer) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuMemHostUnregister", true); r != 0 {
		return r
	}
	if _, r := f.ctxDevice(); r != 0 {
		return r
	}
	if f.pinned[uintptr(p)] == nil {
		return cuda.CodeHostMemoryNotRegistered
	}
	delete(f.pinned, uintptr(p))
	return 0
}

func (f *Fake) cuStreamCreate(s *uintptr, flags uint32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuStreamCreate", true); r != 0 {
		return r
	}
	d, r := f.ctxDevice()
	if r != 0 {
		return r
	}
	if flags > 1 || s == nil {
		return cuda.CodeInvalidValue
	}
	f.nextStream += 0x10
	f.streams[f.nextStream] = &stream{handle: f.nextStream, dev: d.ordinal, flags: flags}
	*s = f.nextStream
	return 0
}

// stream resolves a stream handle; 0 is the legacy default stream (nil).
func (f *Fake) stream(h uintptr) (*stream, int32) {
	if h == 0 {
		return nil, 0
	}
	s := f.streams[h]
	if s == nil {
		return nil, cuda.CodeInvalidHandle
	}
	return s, 0
}

func (f *Fake) cuStreamSynchronize(h uintptr) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuStreamSynchronize", true); r != 0 {
		return r
	}
	s, r := f.stream(h)
	if r != 0 {
		return r
	}
	if s == nil {
		f.flushWhere(func(s *stream) bool { return s.flags == 0 })
		return 0
	}
	f.flush(s)
	return s.err
}

func (f *Fake) cuStreamDestroy(h uintptr) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuStreamDestroy_v2", true); r != 0 {
		return r
	}
	s, r := f.stream(h)
	if r != 0 {
		return r
	}
	if s == nil {
		return cuda.CodeInvalidHandle
	}
	f.flush(s) // work already enqueued still completes
	delete(f.streams, h)
	return 0
}

// enqueue runs o now on the legacy stream (after the blocking streams'
// work) or queues it on s.
func (f *Fake) enqueue(s *stream, dev int, o op) int32 {
	if s == nil {
		f.flushWhere(func(s *stream) bool { return s.dev == dev && s.flags == 0 })
		return f.run(o)
	}
	s.queue = append(s.queue, o)
	return 0
}

func (f *Fake) htod(name string, dst uint64, src unsafe.Pointer, n uint64, h uintptr, async bool) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter(name, true); r != 0 {
		return r
	}
	d, r := f.ctxDevice()
	if r != 0 {
		return r
	}
	var s *stream
	if async {
		if s, r = f.stream(h); r != 0 {
			return r
		}
	}
	if n == 0 {
		return 0
	}
	if src == nil {
		return cuda.CodeInvalidValue
	}
	if _, _, ok := f.resolve(dst, n); !ok {
		return cuda.CodeInvalidValue
	}
	f.stats.HtoDBytes += n
	if f.pinnedLocked(uintptr(src), n) {
		f.stats.HtoDPinnedBytes += n
	}
	return f.enqueue(s, d.ordinal, op{kind: opHtoD, dst: dst, host: src, n: n})
}

func (f *Fake) cuMemcpyHtoDAsync(dst uint64, src unsafe.Pointer, n uint64, h uintptr) int32 {
	return f.htod("cuMemcpyHtoDAsync_v2", dst, src, n, h, true)
}

func (f *Fake) cuMemcpyHtoD(dst uint64, src unsafe.Pointer, n uint64) int32 {
	return f.htod("cuMemcpyHtoD_v2", dst, src, n, 0, false)
}

func (f *Fake) cuMemcpyDtoH(dst unsafe.Pointer, src uint64, n uint64) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuMemcpyDtoH_v2", true); r != 0 {
		return r
	}
	d, r := f.ctxDevice()
	if r != 0 {
		return r
	}
	if n == 0 {
		return 0
	}
	if dst == nil {
		return cuda.CodeInvalidValue
	}
	f.flushWhere(func(s *stream) bool { return s.dev == d.ordinal && s.flags == 0 })
	a, off, ok := f.resolve(src, n)
	if !ok {
		return cuda.CodeInvalidValue
	}
	a.read(off, unsafe.Slice((*byte)(dst), n))
	f.stats.DtoHBytes += n
	return 0
}

func (f *Fake) cuMemcpyDtoDAsync(dst, src uint64, n uint64, h uintptr) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuMemcpyDtoDAsync_v2", true); r != 0 {
		return r
	}
	d, r := f.ctxDevice()
	if r != 0 {
		return r
	}
	s, r := f.stream(h)
	if r != 0 {
		return r
	}
	if n == 0 {
		return 0
	}
	_, _, ok1 := f.resolve(dst, n)
	_, _, ok2 := f.resolve(src, n)
	if !ok1 || !ok2 {
		return cuda.CodeInvalidValue
	}
	f.stats.DtoDBytes += n
	return f.enqueue(s, d.ordinal, op{kind: opDtoD, dst: dst, src: src, n: n})
}

func (f *Fake) cuIpcGetMemHandle(h *cuda.IPCHandle, p uint64) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuIpcGetMemHandle", true); r != 0 {
		return r
	}
	if _, r := f.ctxDevice(); r != 0 {
		return r
	}
	var a *alloc
	for _, x := range f.allocs { // cuMemAlloc memory only, not IPC mappings
		if p >= x.base && p-x.base < x.size {
			a = x
			break
		}
	}
	if a == nil || (f.opts.StrictIPCBase && p != a.base) || h == nil {
		return cuda.CodeInvalidValue
	}
	*h = f.encodeHandle(a)
	return 0
}

func (f *Fake) cuIpcOpenMemHandle(p *uint64, h ipcHandleArg, flags uint32) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuIpcOpenMemHandle_v2", true); r != 0 {
		return r
	}
	d, r := f.ctxDevice()
	if r != 0 {
		return r
	}
	if flags&^1 != 0 || p == nil {
		return cuda.CodeInvalidValue
	}
	info, ok := DecodeIPCHandle(cuda.IPCHandle(h.R))
	if !ok {
		return cuda.CodeInvalidValue
	}
	a := f.handleTarget(cuda.IPCHandle(h.R))
	if a == nil {
		return cuda.CodeInvalidHandle // the exporter freed it, or exited
	}
	if info.PID == os.Getpid() && !f.opts.AllowSelfIPCOpen {
		return cuda.CodeInvalidContext
	}
	for _, m := range f.maps {
		if m.target == a && m.dev == d.ordinal {
			m.refs++
			*p = m.ptr
			return 0
		}
	}
	m := &ipcMapping{ptr: d.nextVA, dev: d.ordinal, target: a, refs: 1}
	d.nextVA += roundUp(a.size, Granularity)
	f.maps[m.ptr] = m
	*p = m.ptr
	return 0
}

func (f *Fake) cuIpcCloseMemHandle(p uint64) int32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r := f.enter("cuIpcCloseMemHandle", true); r != 0 {
		return r
	}
	if _, r := f.ctxDevice(); r != 0 {
		return r
	}
	m := f.maps[p]
	if m == nil {
		return cuda.CodeInvalidValue
	}
	if m.refs--; m.refs == 0 {
		delete(f.maps, p)
	}
	return 0
}
