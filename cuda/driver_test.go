package cuda_test

import (
	"bytes"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/weightfs/weightfs/cuda"
	"github.com/weightfs/weightfs/cuda/cudatest"
)

// open makes a fake two-GPU driver and checks at the end that nothing leaked.
func open(t *testing.T, opts cudatest.Options) (*cudatest.Fake, *cuda.Driver) {
	t.Helper()
	f := cudatest.New(opts)
	t.Cleanup(func() { f.CheckClean(t) })
	d, err := f.Driver()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return f, d
}

func context(t *testing.T, d *cuda.Driver, id string) *cuda.Context {
	t.Helper()
	dev, err := d.Find(id)
	if err != nil {
		t.Fatal(err)
	}
	c, err := d.Context(dev)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Release(); err != nil {
			t.Error(err)
		}
	})
	return c
}

func TestOpenWithInitFails(t *testing.T) {
	f := cudatest.New(cudatest.Options{InitError: cuda.CodeNoDevice})
	_, err := f.Driver()
	if !errors.Is(err, cuda.ErrNoDriver) ||
		!strings.Contains(err.Error(), "cuInit: CUDA_ERROR_NO_DEVICE (100): no CUDA-capable device is detected") {
		t.Fatalf("Driver with cuInit failing = %v", err)
	}
}

func TestOpenWithBinderErrors(t *testing.T) {
	if _, err := cuda.OpenWith(nil); !errors.Is(err, cuda.ErrNoDriver) {
		t.Errorf("OpenWith(nil) = %v", err)
	}
	f := cudatest.New(cudatest.Options{})
	_, err := cuda.OpenWith(func(name string, fn any) error {
		if name == "cuMemAlloc_v2" {
			return errors.New("missing symbol cuMemAlloc_v2")
		}
		return f.Bind(name, fn)
	})
	if !errors.Is(err, cuda.ErrNoDriver) || !strings.Contains(err.Error(), "missing symbol cuMemAlloc_v2") {
		t.Errorf("OpenWith with a failing binder = %v", err)
	}
	_, err = cuda.OpenWith(func(string, any) error { return nil })
	if !errors.Is(err, cuda.ErrNoDriver) || !strings.Contains(err.Error(), "left cuInit unset") {
		t.Errorf("OpenWith with a binder that sets nothing = %v", err)
	}
}

func TestEntryPointsAllModelled(t *testing.T) {
	f := cudatest.New(cudatest.Options{})
	names := cuda.EntryPoints()
	if len(names) < 30 {
		t.Fatalf("EntryPoints = %v", names)
	}
	for _, n := range names {
		if !f.Modelled(n) {
			t.Errorf("the fake does not model %s", n)
		}
		if strings.HasPrefix(n, "cuMemAlloc") && n != "cuMemAlloc_v2" {
			t.Errorf("%s: bind the _v2 entry point", n)
		}
	}
}

func TestDevicesAndFind(t *testing.T) {
	f, d := open(t, cudatest.Options{})
	if d.Version() != 13000 {
		t.Errorf("Version = %d", d.Version())
	}
	devs, err := d.Devices()
	if err != nil {
		t.Fatal(err)
	}
	cfg := f.Devices()
	if len(devs) != 2 {
		t.Fatalf("Devices = %+v", devs)
	}
	want := cuda.Device{Ordinal: 1, UUID: cfg[1].UUID, Name: "NVIDIA H200", TotalMem: cudatest.H200TotalMem,
		PCIBusID: cfg[1].PCIBusID, Major: 9, Minor: 0}
	if devs[1] != want {
		t.Errorf("Devices[1] = %+v, want %+v", devs[1], want)
	}
	dev, err := d.Find(strings.ToUpper(strings.TrimPrefix(cfg[1].UUID, "GPU-")))
	if err != nil || dev.Ordinal != 1 {
		t.Errorf("Find by UUID = %+v, %v", dev, err)
	}
	if dev, err := d.Find(cfg[0].PCIBusID); err != nil || dev.Ordinal != 0 {
		t.Errorf("Find by bus id = %+v, %v", dev, err)
	}
	if _, err := d.Find("2"); err == nil {
		t.Error("Find of a third GPU succeeded")
	}
	if _, err := d.Context(cuda.Device{Ordinal: 5}); !errors.Is(err, &cuda.Error{Code: cuda.CodeInvalidDevice}) {
		t.Errorf("Context of a missing device = %v", err)
	}
	d.Close()
	if _, err := d.Devices(); err == nil {
		t.Error("Devices after Close succeeded")
	}
}

func TestCustomDevices(t *testing.T) {
	_, d := open(t, cudatest.Options{Devices: []cudatest.Device{
		{Name: "NVIDIA A100-SXM4-80GB", UUID: "gpu-AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE", TotalMem: 80 << 30, Major: 8},
	}, DriverVersion: 12040})
	devs, err := d.Devices()
	if err != nil || len(devs) != 1 {
		t.Fatal(devs, err)
	}
	if x := devs[0]; x.UUID != "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee" || x.Name != "NVIDIA A100-SXM4-80GB" ||
		x.TotalMem != 80<<30 || x.Major != 8 || d.Version() != 12040 {
		t.Errorf("device %+v, driver %d", x, d.Version())
	}
}

func TestMemInfoAllocAndOOM(t *testing.T) {
	f, d := open(t, cudatest.Options{})
	c := context(t, d, "0")
	free, total, err := c.MemInfo()
	if err != nil || free != cudatest.H200TotalMem || total != cudatest.H200TotalMem {
		t.Fatalf("MemInfo = %d, %d, %v", free, total, err)
	}
	p, err := c.Alloc(3 << 20)
	if err != nil {
		t.Fatal(err)
	}
	if free2, _, _ := c.MemInfo(); free-free2 != 4<<20 {
		t.Errorf("a 3 MiB allocation took %d bytes, want 4 MiB (2 MiB granularity)", free-free2)
	}
	base, size, err := c.AddressRange(p + 5)
	if err != nil || base != p || size != 3<<20 {
		t.Errorf("AddressRange = %#x, %d, %v", base, size, err)
	}
	if _, _, err := c.AddressRange(p + 3<<20); !errors.Is(err, &cuda.Error{Code: cudatest.CodeNotFound}) {
		t.Errorf("AddressRange past the end = %v", err)
	}

	f.SetMemoryLimit(0, 8<<20)
	if free, _, _ := c.MemInfo(); free != 4<<20 {
		t.Errorf("free under an 8 MiB limit = %d", free)
	}
	_, err = c.Alloc(5 << 20)
	var ce *cuda.Error
	if !errors.As(err, &ce) || ce.Name != "CUDA_ERROR_OUT_OF_MEMORY" || ce.Call != "cuMemAlloc_v2" || !cuda.IsOutOfMemory(err) {
		t.Fatalf("oversized Alloc = %v", err)
	}
	if !strings.Contains(err.Error(), "cuMemAlloc_v2: CUDA_ERROR_OUT_OF_MEMORY (2): out of memory") {
		t.Errorf("error text %q", err)
	}
	if _, err := c.Alloc(0); !errors.Is(err, &cuda.Error{Code: cuda.CodeInvalidValue}) {
		t.Errorf("Alloc(0) = %v", err)
	}
	if got := f.AllocatedBytes(0); got != 3<<20 {
		t.Errorf("AllocatedBytes = %d", got)
	}
	if err := c.Free(p); err != nil {
		t.Fatal(err)
	}
	if err := c.Free(p); !errors.Is(err, &cuda.Error{Code: cuda.CodeInvalidValue}) {
		t.Errorf("double Free = %v", err)
	}
	if len(f.Allocations()) != 0 {
		t.Errorf("allocations left: %v", f.Allocations())
	}
}

func TestCopiesMoveBytes(t *testing.T) {
	f, d := open(t, cudatest.Options{})
	c := context(t, d, "0")
	slab, err := c.NewSlab(10 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer slab.Free()
	s1, _ := c.NewStream()
	s2, _ := c.NewStream()
	defer s1.Destroy()
	defer s2.Destroy()
	src := make([]byte, 5<<20+3)
	for i := range src {
		src[i] = byte(i * 7)
	}
	if err := slab.Upload(1<<20, src, []*cuda.Stream{s1, s2}, 2<<20); err != nil {
		t.Fatal(err)
	}
	if n := f.Calls("cuMemcpyHtoDAsync_v2"); n != 3 {
		t.Errorf("%d async copies, want 3 chunks", n)
	}
	// Nothing has run before the streams are synchronized.
	if b, _ := f.Read(slab.Ptr+1<<20, 16); !bytes.Equal(b, make([]byte, 16)) {
		t.Errorf("bytes arrived before Synchronize: %v", b)
	}
	if err := cuda.SynchronizeAll([]*cuda.Stream{s1, s2}); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(src))
	if err := c.CopyDtoH(got, slab.Ptr+1<<20); err != nil || !bytes.Equal(got, src) {
		t.Fatalf("read back: %v (equal %v)", err, bytes.Equal(got, src))
	}
	if err := slab.Upload(6<<20, src, []*cuda.Stream{s1}, 0); err == nil {
		t.Error("Upload past the slab's end succeeded")
	}
	if err := cuda.CopyChunked(nil, slab.Ptr, src, 0); err == nil {
		t.Error("CopyChunked without streams succeeded")
	}

	// Synchronous copy, memset, device-to-device on a stream.
	if err := c.CopyHtoD(slab.Ptr, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if err := c.Memset(slab.Ptr+5, '!', 3); err != nil {
		t.Fatal(err)
	}
	if err := s1.CopyDtoD(slab.Ptr+100, slab.Ptr, 8); err != nil {
		t.Fatal(err)
	}
	if err := c.Synchronize(); err != nil {
		t.Fatal(err)
	}
	if b, _ := f.Read(slab.Ptr+100, 8); string(b) != "hello!!!" {
		t.Errorf("after DtoD: %q", b)
	}
	if st := f.Stats(); st.HtoDBytes != uint64(len(src))+5 || st.DtoDBytes != 8 || st.DtoHBytes != uint64(len(src)) {
		t.Errorf("stats %+v", st)
	}
	if err := c.CopyHtoD(slab.Ptr+10<<20-2, []byte("abc")); !errors.Is(err, &cuda.Error{Code: cuda.CodeInvalidValue}) {
		t.Errorf("copy past the allocation = %v", err)
	}
	if err := f.Write(slab.Ptr+200, []byte("xyz")); err != nil {
		t.Fatal(err)
	}
	got = make([]byte, 3)
	if err := c.CopyDtoH(got, slab.Ptr+200); err != nil || string(got) != "xyz" {
		t.Errorf("Write then CopyDtoH: %q %v", got, err)
	}
}

func TestHostRegister(t *testing.T) {
	f, d := open(t, cudatest.Options{})
	c := context(t, d, "1")
	buf := make([]byte, 1<<16)
	if err := c.RegisterHost(buf); err != nil {
		t.Fatal(err)
	}
	if !f.IsPinned(buf[100:200]) || len(f.Pinned()) != 1 || f.Pinned()[0].Flags != cuda.HostRegisterPortable {
		t.Errorf("pinned %+v", f.Pinned())
	}
	err := c.RegisterHost(buf[4096:])
	if !errors.Is(err, &cuda.Error{Code: cuda.CodeHostMemoryAlready}) ||
		!strings.Contains(err.Error(), "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED (712)") {
		t.Errorf("double register = %v", err)
	}
	if err := c.UnregisterHost(buf[1:]); !errors.Is(err, &cuda.Error{Code: cuda.CodeHostMemoryNotRegistered}) {
		t.Errorf("unregister of an unknown start = %v", err)
	}
	if err := c.UnregisterHost(buf); err != nil {
		t.Fatal(err)
	}
	if f.IsPinned(buf) {
		t.Error("still pinned")
	}
	if err := c.RegisterHost(nil); err != nil {
		t.Error(err)
	}
}

func TestIPCHandle(t *testing.T) {
	f, d := open(t, cudatest.Options{})
	c := context(t, d, "1")
	p, err := c.Alloc(4 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Free(p)
	h, err := c.IPCHandle(p)
	if err != nil || h.IsZero() {
		t.Fatal(h, err)
	}
	info, ok := cudatest.DecodeIPCHandle(h)
	if !ok || info.Ptr != p || info.Size != 4<<20 || info.Device != 1 {
		t.Errorf("handle decodes to %+v", info)
	}
	if a, ok := f.HandleAllocation(h); !ok || a.Ptr != p {
		t.Errorf("HandleAllocation = %+v %v", a, ok)
	}
	// An interior pointer gives the base allocation's handle (measured on an H200).
	if h2, err := c.IPCHandle(p + 1<<20); err != nil || h2 != h {
		t.Errorf("interior handle = %v", err)
	}
	if _, err := c.IPCHandle(0x1234); !errors.Is(err, &cuda.Error{Code: cuda.CodeInvalidValue}) {
		t.Errorf("handle of no allocation = %v", err)
	}
	// The exporting process cannot open its own handle.
	if _, err := c.IPCOpen(h); !errors.Is(err, &cuda.Error{Code: cuda.CodeInvalidContext}) {
		t.Errorf("IPCOpen in the exporter = %v", err)
	}
	if _, err := c.IPCOpen(cuda.IPCHandle{}); !errors.Is(err, &cuda.Error{Code: cuda.CodeInvalidValue}) {
		t.Errorf("IPCOpen of garbage = %v", err)
	}
}

func TestIPCOpenStandIn(t *testing.T) {
	f, d := open(t, cudatest.Options{AllowSelfIPCOpen: true, StrictIPCBase: true})
	exp := context(t, d, "0")
	imp := context(t, d, "1")
	p, err := exp.Alloc(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := exp.IPCHandle(p + 256); err == nil {
		t.Error("StrictIPCBase: interior handle succeeded")
	}
	h, _ := exp.IPCHandle(p)
	if err := exp.CopyHtoD(p, []byte("shared")); err != nil {
		t.Fatal(err)
	}
	q, err := imp.IPCOpen(h)
	if err != nil {
		t.Fatal(err)
	}
	q2, err := imp.IPCOpen(h)
	if err != nil || q2 != q {
		t.Errorf("re-open = %#x, %v; want the same pointer %#x", q2, err, q)
	}
	got := make([]byte, 6)
	if err := imp.CopyDtoH(got, q); err != nil || string(got) != "shared" {
		t.Errorf("importer reads %q, %v", got, err)
	}
	if len(f.Leaks()) != 2 {
		t.Errorf("leaks with an open mapping: %v", f.Leaks())
	}
	imp.IPCClose(q)
	imp.IPCClose(q)
	if err := imp.IPCClose(q); err == nil {
		t.Error("third close succeeded")
	}
	exp.Free(p)
	if _, err := imp.IPCOpen(h); !errors.Is(err, &cuda.Error{Code: cuda.CodeInvalidHandle}) {
		t.Errorf("open after the exporter freed = %v", err)
	}
}

func TestContextRules(t *testing.T) {
	f, d := open(t, cudatest.Options{})
	dev, _ := d.Find("0")
	c, err := d.Context(dev)
	if err != nil {
		t.Fatal(err)
	}
	if got := f.RetainedContexts(); got[0] != 1 {
		t.Errorf("retained %v", got)
	}
	if err := c.Release(); err != nil {
		t.Fatal(err)
	}
	if err := c.Release(); err != nil {
		t.Errorf("second Release = %v", err)
	}
	if _, err := c.Alloc(1); err == nil {
		t.Error("Alloc after Release succeeded")
	}
	if len(f.RetainedContexts()) != 0 {
		t.Errorf("retained %v", f.RetainedContexts())
	}
	// A context released elsewhere fails the next call on it.
	c2, _ := d.Context(dev)
	c3, _ := d.Context(dev)
	c2.Release()
	if _, err := c3.Alloc(1 << 20); err != nil {
		t.Errorf("alloc while retained once more: %v", err)
	} else {
		for _, a := range f.Allocations() {
			c3.Free(a.Ptr)
		}
	}
	c3.Release()
}

func TestFaultInjection(t *testing.T) {
	f, d := open(t, cudatest.Options{})
	c := context(t, d, "0")
	f.Inject(cudatest.Fault{Call: "cuMemAlloc_v2", Code: cuda.CodeOutOfMemory, After: 2, Times: 1})
	var ptrs []cuda.DevicePtr
	var errs []error
	for range 4 {
		p, err := c.Alloc(1)
		errs = append(errs, err)
		if err == nil {
			ptrs = append(ptrs, p)
		}
	}
	if errs[0] != nil || errs[1] != nil || !cuda.IsOutOfMemory(errs[2]) || errs[3] != nil {
		t.Errorf("errors %v, want only the third to fail", errs)
	}
	for _, p := range ptrs {
		c.Free(p)
	}
	f.Inject(cudatest.Fault{Call: "cuStreamCreate", Code: 999})
	for range 2 {
		if _, err := c.NewStream(); !errors.Is(err, &cuda.Error{Code: 999}) || !strings.Contains(err.Error(), "CUDA_ERROR_UNKNOWN") {
			t.Errorf("NewStream = %v", err)
		}
	}
	f.ClearFaults()
	s, err := c.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	s.Destroy()
	if f.Calls("cuMemAlloc_v2") != 4 || f.Calls("cuStreamCreate") != 3 {
		t.Errorf("calls %d, %d", f.Calls("cuMemAlloc_v2"), f.Calls("cuStreamCreate"))
	}
}

func TestConcurrentUse(t *testing.T) {
	f, d := open(t, cudatest.Options{})
	ctxs := []*cuda.Context{context(t, d, "0"), context(t, d, "1")}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := ctxs[g%2]
			s, err := c.NewStream()
			if err != nil {
				t.Error(err)
				return
			}
			defer s.Destroy()
			slab, err := c.NewSlab(1 << 20)
			if err != nil {
				t.Error(err)
				return
			}
			defer slab.Free()
			src := bytes.Repeat([]byte{byte(g)}, 1<<20)
			if err := slab.Upload(0, src, []*cuda.Stream{s}, 1<<18); err != nil {
				t.Error(err)
				return
			}
			if err := s.Synchronize(); err != nil {
				t.Error(err)
				return
			}
			got := make([]byte, len(src))
			if err := c.CopyDtoH(got, slab.Ptr); err != nil || !bytes.Equal(got, src) {
				t.Errorf("goroutine %d read back wrong bytes: %v", g, err)
			}
		}()
	}
	wg.Wait()
	if len(f.Allocations()) != 0 || f.Streams() != 0 {
		t.Errorf("left %v, %d streams", f.Allocations(), f.Streams())
	}
}
