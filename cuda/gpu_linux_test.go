package cuda

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// GPU tests: they skip without a driver and otherwise use CUDA device 0
// (or $WEIGHTFS_TEST_GPU, any id Find takes).

func openGPU(t *testing.T) (*Driver, Device, *Context) {
	t.Helper()
	d, err := Open()
	if err != nil {
		t.Skip("no CUDA driver: ", err)
	}
	t.Cleanup(func() { d.Close() })
	id := os.Getenv("WEIGHTFS_TEST_GPU")
	if id == "" {
		id = "0"
	}
	dev, err := d.Find(id)
	if err != nil {
		t.Skip("no CUDA device: ", err)
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
	return d, dev, c
}

func TestGPUDevices(t *testing.T) {
	d, dev, c := openGPU(t)
	devs, err := d.Devices()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("CUDA driver %d, %d device(s)", d.Version(), len(devs))
	for _, x := range devs {
		t.Logf("device %d: %s %q sm_%d%d, %d MiB, bus %s", x.Ordinal, x.UUID, x.Name, x.Major, x.Minor, x.TotalMem>>20, x.PCIBusID)
		if NormalizeUUID(x.UUID) != x.UUID || x.Name == "" || x.TotalMem == 0 || x.PCIBusID == "" {
			t.Errorf("device %d looks wrong: %+v", x.Ordinal, x)
		}
	}
	for _, id := range []string{
		strconv.Itoa(dev.Ordinal),
		dev.UUID,
		strings.ToUpper(strings.TrimPrefix(dev.UUID, "GPU-")),
		dev.PCIBusID,
		"0000" + dev.PCIBusID, // NVML's 8-digit domain
	} {
		got, err := d.Find(id)
		if err != nil || got != dev {
			t.Errorf("Find(%q) = %+v, %v; want %+v", id, got, err, dev)
		}
	}
	if _, err := d.Find("99"); err == nil || !strings.Contains(err.Error(), `"99"`) {
		t.Errorf("Find(99) = %v", err)
	}
	free, total, err := c.MemInfo()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("MemInfo: free %d MiB of %d MiB", free>>20, total>>20)
	if free == 0 || free > total || total > dev.TotalMem {
		t.Errorf("MemInfo free %d total %d (device total %d)", free, total, dev.TotalMem)
	}
}

// mmapShared maps n bytes of shared anonymous memory (shmem, like a memfd).
func mmapShared(t *testing.T, n int) []byte {
	t.Helper()
	b, err := syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED|syscall.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Munmap(b) })
	return b
}

func TestGPUCopyRoundTrip(t *testing.T) {
	_, dev, c := openGPU(t)
	const (
		devBytes  = 1 << 30
		hostBytes = 256 << 20
		offset    = 3<<20 + 256 // a rule-aligned offset inside the slab
		chunk     = 16 << 20
	)
	slab, err := c.NewSlab(devBytes)
	if err != nil {
		t.Fatal(err)
	}
	freed := false
	defer func() {
		if !freed {
			slab.Free()
		}
	}()

	host := mmapShared(t, hostBytes)
	rng := rand.NewChaCha8([32]byte{1, 2, 3})
	rng.Read(host)

	t0 := time.Now()
	if err := c.RegisterHost(host); err != nil {
		t.Fatal(err)
	}
	t.Logf("RegisterHost(256 MiB): %v", time.Since(t0))
	registered := true
	defer func() {
		if registered {
			c.UnregisterHost(host)
		}
	}()

	var streams []*Stream
	for range 2 {
		s, err := c.NewStream()
		if err != nil {
			t.Fatal(err)
		}
		defer s.Destroy()
		streams = append(streams, s)
	}
	// Warm up once, then time a second pass.
	for pass := range 2 {
		t0 = time.Now()
		if err := slab.Upload(offset, host, streams, chunk); err != nil {
			t.Fatal(err)
		}
		if err := SynchronizeAll(streams); err != nil {
			t.Fatal(err)
		}
		el := time.Since(t0)
		t.Logf("pass %d: HtoD 256 MiB in %d-MiB chunks on 2 streams: %v, %.1f GB/s", pass, chunk>>20, el, float64(hostBytes)/el.Seconds()/1e9)
	}

	back := make([]byte, hostBytes)
	if err := c.CopyDtoH(back, slab.Ptr+offset); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, host) {
		i := 0
		for i < len(back) && back[i] == host[i] {
			i++
		}
		t.Fatalf("device copy differs from host at byte %d", i)
	}

	base, size, err := c.AddressRange(slab.Ptr + offset)
	if err != nil || base != slab.Ptr || size < devBytes {
		t.Errorf("AddressRange = %#x, %d, %v; want %#x, >= %d", base, size, err, slab.Ptr, devBytes)
	}

	h, err := slab.IPCHandle()
	if err != nil {
		t.Fatal(err)
	}
	if h.IsZero() {
		t.Fatal("IPC handle is all zero")
	}
	hi, err := c.IPCHandle(slab.Ptr + offset)
	if err != nil || hi != h {
		t.Errorf("interior pointer handle differs from base handle (err %v)", err)
	}
	t.Logf("IPC handle %x...", h[:16])

	// Another process opens the handle and checks the bytes at offset.
	sum := sha256.Sum256(host[:4<<20])
	cmd := exec.Command(os.Args[0], "-test.run=^TestGPUIPCChild$", "-test.v")
	cmd.Env = append(os.Environ(),
		"WEIGHTFS_IPC_CHILD=1",
		"WEIGHTFS_IPC_GPU="+dev.UUID,
		"WEIGHTFS_IPC_HANDLE="+hex.EncodeToString(h[:]),
		fmt.Sprintf("WEIGHTFS_IPC_RANGE=%d:%d", offset, 4<<20),
		"WEIGHTFS_IPC_SHA256="+hex.EncodeToString(sum[:]),
	)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "IPC child OK") {
		t.Errorf("IPC child: %v\n%s", err, out)
	} else {
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "IPC child") {
				t.Log(strings.TrimSpace(l))
			}
		}
	}

	if err := slab.Free(); err != nil {
		t.Fatal(err)
	}
	freed = true
	t0 = time.Now()
	if err := c.UnregisterHost(host); err != nil {
		t.Fatal(err)
	}
	registered = false
	t.Logf("UnregisterHost: %v", time.Since(t0))
}

// TestGPUIPCChild is run by TestGPUCopyRoundTrip in a child process.
func TestGPUIPCChild(t *testing.T) {
	if os.Getenv("WEIGHTFS_IPC_CHILD") != "1" {
		t.Skip("helper process for TestGPUCopyRoundTrip")
	}
	d, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	dev, err := d.Find(os.Getenv("WEIGHTFS_IPC_GPU"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := d.Context(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Release()
	var h IPCHandle
	if b, err := hex.DecodeString(os.Getenv("WEIGHTFS_IPC_HANDLE")); err != nil || len(b) != len(h) {
		t.Fatalf("bad handle: %v", err)
	} else {
		copy(h[:], b)
	}
	var off, n uint64
	if _, err := fmt.Sscanf(os.Getenv("WEIGHTFS_IPC_RANGE"), "%d:%d", &off, &n); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	p, err := c.IPCOpen(h)
	if err != nil {
		t.Fatal(err)
	}
	opened := time.Since(t0)
	buf := make([]byte, n)
	if err := c.CopyDtoH(buf, p+DevicePtr(off)); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(buf)
	if got := hex.EncodeToString(sum[:]); got != os.Getenv("WEIGHTFS_IPC_SHA256") {
		t.Fatalf("IPC child: sha256 %s, want %s", got, os.Getenv("WEIGHTFS_IPC_SHA256"))
	}
	if err := c.IPCClose(p); err != nil {
		t.Fatal(err)
	}
	fmt.Printf("IPC child OK: opened in %v, %d bytes at offset %d match\n", opened, n, off)
}

func TestGPUOutOfMemory(t *testing.T) {
	_, _, c := openGPU(t)
	free, total, err := c.MemInfo()
	if err != nil {
		t.Fatal(err)
	}
	p, err := c.Alloc(free + 1<<30)
	if err == nil {
		c.Free(p)
		t.Fatalf("Alloc(free %d + 1 GiB) of %d total succeeded", free, total)
	}
	var ce *Error
	if !errors.As(err, &ce) || ce.Name != "CUDA_ERROR_OUT_OF_MEMORY" || !IsOutOfMemory(err) {
		t.Fatalf("Alloc(free + 1 GiB) = %v, want CUDA_ERROR_OUT_OF_MEMORY", err)
	}
	t.Logf("as expected: %v", err)
}

func TestGPUMonitor(t *testing.T) {
	_, dev, c := openGPU(t)
	m, err := OpenMonitor()
	if err != nil {
		t.Skip("no NVML: ", err)
	}
	defer m.Close()
	p, err := c.Alloc(1 << 30)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Free(p)
	used, err := m.ProcessMemory(dev.UUID, os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("NVML: this process uses %d MiB on %s", used>>20, dev.UUID)
	if used < 1<<30 {
		t.Logf("warning: NVML reports %d bytes for this pid (PID namespace differs from the driver's?)", used)
	}
}

// TestGPUCopyDtoDAcrossDevices checks what a push's commit relies on: under
// unified addressing, Stream.CopyDtoD on the destination device's stream
// copies from another device's allocation (store/gpu.go, copyLocked). It
// needs two devices.
func TestGPUCopyDtoDAcrossDevices(t *testing.T) {
	d, _, src := openGPU(t)
	devs, err := d.Devices()
	if err != nil {
		t.Fatal(err)
	}
	var other *Device
	for i := range devs {
		if devs[i].UUID != src.Device().UUID {
			other = &devs[i]
			break
		}
	}
	if other == nil {
		t.Skip("needs two CUDA devices")
	}
	dst, err := d.Context(*other)
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Release()
	const n = 64 << 20
	a, err := src.NewSlab(n)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Free()
	b, err := dst.NewSlab(n)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Free()
	want := make([]byte, n)
	rand.NewChaCha8([32]byte{7}).Read(want)
	if err := src.CopyHtoD(a.Ptr, want); err != nil {
		t.Fatal(err)
	}
	s, err := dst.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Destroy()
	const off = 3<<20 + 256
	t0 := time.Now()
	if err := s.CopyDtoD(b.Ptr+off, a.Ptr+off, n-off); err != nil {
		t.Fatal(err)
	}
	if err := s.Synchronize(); err != nil {
		t.Fatal(err)
	}
	t.Logf("CopyDtoD of %d MiB from %s to %s: %v", (n-off)>>20, src.Device().UUID, other.UUID, time.Since(t0))
	got := make([]byte, n-off)
	if err := dst.CopyDtoH(got, b.Ptr+off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want[off:]) {
		t.Fatal("the copy across devices holds other bytes")
	}
}
