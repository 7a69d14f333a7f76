package cudatest_test

import (
	"fmt"
	"runtime"
	"strings"
	"testing"

	"github.com/weightfs/weightfs/cuda"
	"github.com/weightfs/weightfs/cuda/cudatest"
)

// recorder is a cudatest.TB that keeps what CheckClean reports.
type recorder struct{ errs []string }

func (r *recorder) Helper() {}
func (r *recorder) Errorf(format string, args ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, args...))
}

func TestRawEntryPoints(t *testing.T) {
	f := cudatest.New(cudatest.Options{})
	var (
		cuInit          func(uint32) int32
		cuMemAlloc      func(*uint64, uint64) int32
		cuCtxSetCurrent func(uintptr) int32
		cuRetain        func(*uintptr, int32) int32
		cuRelease       func(int32) int32
		cuGetErrorName  func(int32, **byte) int32
		cuFuture        func(int32, *uint64) int32
	)
	for name, fn := range map[string]any{"cuInit": &cuInit, "cuMemAlloc_v2": &cuMemAlloc, "cuCtxSetCurrent": &cuCtxSetCurrent,
		"cuDevicePrimaryCtxRetain": &cuRetain, "cuDevicePrimaryCtxRelease_v2": &cuRelease, "cuGetErrorName": &cuGetErrorName,
		"cuMemCreate": &cuFuture} {
		if err := f.Bind(name, fn); err != nil {
			t.Fatal(err)
		}
	}
	var p uint64
	if r := cuMemAlloc(&p, 1); r != cuda.CodeNotInitialized {
		t.Errorf("cuMemAlloc before cuInit = %d", r)
	}
	if r := cuInit(0); r != 0 {
		t.Fatal(r)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if r := cuMemAlloc(&p, 1); r != cuda.CodeInvalidContext {
		t.Errorf("cuMemAlloc without a current context = %d, want 201", r)
	}
	var ctx uintptr
	if r := cuRetain(&ctx, 1); r != 0 {
		t.Fatal(r)
	}
	if r := cuCtxSetCurrent(ctx + 100); r != cuda.CodeInvalidContext {
		t.Errorf("cuCtxSetCurrent(bogus) = %d", r)
	}
	if r := cuCtxSetCurrent(ctx); r != 0 {
		t.Fatal(r)
	}
	done := make(chan int32)
	go func() { // another OS thread has no current context
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var q uint64
		done <- cuMemAlloc(&q, 1)
	}()
	if r := <-done; r != cuda.CodeInvalidContext {
		t.Errorf("cuMemAlloc on another thread = %d, want 201", r)
	}
	cuRelease(1)
	if r := cuMemAlloc(&p, 1); r != cudatest.CodeContextIsDestroyed {
		t.Errorf("cuMemAlloc in a released context = %d", r)
	}
	if r := cuRelease(1); r != cuda.CodeInvalidContext {
		t.Errorf("release of an unretained context = %d", r)
	}
	if r := cuCtxSetCurrent(0); r != 0 {
		t.Error(r)
	}
	var s *byte
	if r := cuGetErrorName(12345, &s); r != cuda.CodeInvalidValue {
		t.Errorf("name of an unknown code: %d", r)
	}
	if r := cuFuture(0, nil); r != cuda.CodeNotSupported || f.Modelled("cuMemCreate") || f.Calls("cuMemCreate") != 1 {
		t.Errorf("an entry point the fake does not model returned %d", r)
	}
}

func TestBindErrors(t *testing.T) {
	f := cudatest.New(cudatest.Options{})
	var wrong func(int) int
	var str func() string
	for _, c := range []struct {
		name string
		fn   any
	}{{"cuInit", 5}, {"cuInit", nil}, {"cuInit", &wrong}, {"cuSomethingNew", &str}} {
		if err := f.Bind(c.name, c.fn); err == nil {
			t.Errorf("Bind(%s, %T) succeeded", c.name, c.fn)
		}
	}
}

func TestCheckCleanReportsLeaks(t *testing.T) {
	f := cudatest.New(cudatest.Options{})
	d, err := f.Driver()
	if err != nil {
		t.Fatal(err)
	}
	dev, _ := d.Find("0")
	c, _ := d.Context(dev)
	defer c.Release()
	p, _ := c.Alloc(1 << 20)
	s, _ := c.NewStream()
	buf := make([]byte, 4096)
	c.RegisterHost(buf)
	var r recorder
	f.CheckClean(&r)
	if len(r.errs) != 3 {
		t.Fatalf("CheckClean reported %q", r.errs)
	}
	for _, want := range []string{"device allocation of 1048576 bytes", "pinned host range of 4096 bytes", "stream"} {
		if !strings.Contains(strings.Join(r.errs, "\n"), want) {
			t.Errorf("no %q in %q", want, r.errs)
		}
	}
	c.Free(p)
	s.Destroy()
	c.UnregisterHost(buf)
	r = recorder{}
	f.CheckClean(&r)
	if len(r.errs) != 0 {
		t.Errorf("after cleaning up: %q", r.errs)
	}
}

func TestErrorName(t *testing.T) {
	if got := cudatest.ErrorName(712); got != "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED" {
		t.Errorf("ErrorName(712) = %q", got)
	}
	if got := cudatest.ErrorName(424242); got != "" {
		t.Errorf("ErrorName(unknown) = %q", got)
	}
}

func TestNoDevices(t *testing.T) {
	f := cudatest.New(cudatest.Options{Devices: []cudatest.Device{}})
	d, err := f.Driver()
	if err != nil {
		t.Fatal(err)
	}
	if devs, err := d.Devices(); err != nil || len(devs) != 0 {
		t.Errorf("Devices = %v, %v", devs, err)
	}
}

func TestBadUUIDPanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error("New with a bad UUID did not panic")
		}
	}()
	cudatest.New(cudatest.Options{Devices: []cudatest.Device{{UUID: "not-a-uuid"}}})
}

func TestStreamErrors(t *testing.T) {
	f := cudatest.New(cudatest.Options{})
	defer f.CheckClean(t)
	var (
		cuInit    func(uint32) int32
		cuSync    func(uintptr) int32
		cuDestroy func(uintptr) int32
	)
	f.Bind("cuInit", &cuInit)
	f.Bind("cuStreamSynchronize", &cuSync)
	f.Bind("cuStreamDestroy_v2", &cuDestroy)
	cuInit(0)
	if r := cuSync(0x999); r != cuda.CodeInvalidHandle {
		t.Errorf("sync of an unknown stream = %d", r)
	}
	if r := cuDestroy(0); r != cuda.CodeInvalidHandle {
		t.Errorf("destroy of the legacy stream = %d", r)
	}
	if r := cuSync(0); r != 0 {
		t.Errorf("sync of the legacy stream = %d", r)
	}
}

func TestHold(t *testing.T) {
	f := cudatest.New(cudatest.Options{})
	d, err := f.Driver()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	devs, err := d.Devices()
	if err != nil {
		t.Fatal(err)
	}
	ctx, err := d.Context(devs[0])
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Release()
	p, err := ctx.Alloc(4)
	if err != nil {
		t.Fatal(err)
	}
	defer ctx.Free(p)
	g := f.Hold("cuMemcpyDtoH_v2")
	done := make(chan error, 1)
	go func() { done <- ctx.CopyDtoH(make([]byte, 4), p) }()
	<-g.Arrived()
	// Other calls go on while one is held.
	if _, _, err := ctx.MemInfo(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		t.Fatalf("the held copy returned (%v) before Release", err)
	default:
	}
	g.Release()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	g.Release() // twice is fine
}
