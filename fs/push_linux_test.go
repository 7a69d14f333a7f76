package fs

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/zeebo/xxh3"
	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/cuda"
	"github.com/weightfs/weightfs/cuda/cudatest"
	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/safetensors"
)

// gpuStore is a store over one fake GPU, closed (store, GPUs, driver) when
// the test ends.
func gpuStore(t *testing.T) (*store.Store, *cudatest.Fake) {
	t.Helper()
	fake := cudatest.New(cudatest.Options{})
	driver, err := fake.Driver()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { driver.Close() })
	gpus, err := store.OpenGPUs(driver, []string{"0"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := gpus.Close(); err != nil {
			t.Error(err)
		}
	})
	st := store.New(store.OpenMemfdArena(), store.Options{GPUs: gpus, Logger: quiet})
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("close store: %v", err)
		}
	})
	return st, fake
}

// pushOnGPU pushes model "m", one 3 MB tensor written straight into its slab
// on the GPU: its host image is filled after the commit. It returns the
// tensor's bytes.
func pushOnGPU(t *testing.T, st *store.Store, fake *cudatest.Fake) []byte {
	t.Helper()
	manifest := []store.PushTensor{{Name: "w", DType: safetensors.U8, Shape: []int64{3 << 20}}}
	p, err := st.Stage("m", manifest, nil, store.StageOptions{Writer: "test"})
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i*13 + i>>11)
	}
	ts, err := p.Tensors()
	if err != nil {
		t.Fatal(err)
	}
	gpu := st.GPUs().List()[0].UUID()
	slab, err := p.Slab(ts[0].File, gpu)
	if err != nil {
		t.Fatal(err)
	}
	if err := fake.Write(slab.Ptr+cuda.DevicePtr(ts[0].SlabOffset), data); err != nil {
		t.Fatal(err)
	}
	if err := p.MarkWritten("w", gpu); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Commit(context.Background()); err != nil {
		t.Fatal(err)
	}
	return data
}

// waitingOpens counts the goroutines waiting for a host image.
func waitingOpens() int { return goroutinesIn("(*File).WaitReady(") }

// untilWaiting polls until want opens wait in the daemon (or fails after a
// long deadline: a hang, not a timing assertion).
func untilWaiting(t *testing.T, want func(n int) bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !want(waitingOpens()) {
		if time.Now().After(deadline) {
			t.Fatalf("%d opens wait for the host image", waitingOpens())
		}
		time.Sleep(time.Millisecond)
	}
}

// mountHeldPush mounts a store over a fake GPU and pushes to it with every
// device-to-host copy held by gate (released when the test ends): the
// weights file's host image is not filled until gate is released.
func mountHeldPush(t *testing.T) (srv *Server, gate *cudatest.Gate, data []byte) {
	t.Helper()
	st, fake := gpuStore(t)
	srv = mountStore(t, st, Options{})
	gate = fake.Hold("cuMemcpyDtoH_v2")
	t.Cleanup(gate.Release) // before the store closes: it waits for the fill
	return srv, gate, pushOnGPU(t, st, fake)
}

// TestMountOpenWaitsForHostFill: a reader that opens a pushed file before
// its host image is filled waits, then reads the whole file; its checksum
// attribute is that of those bytes.
func TestMountOpenWaitsForHostFill(t *testing.T) {
	srv, gate, data := mountHeldPush(t)
	path := filepath.Join(srv.Mountpoint(), "m@1", weightsFile)

	type result struct {
		b   []byte
		err error
	}
	read := make(chan result, 1)
	go func() {
		b, err := os.ReadFile(path)
		read <- result{b, err}
	}()
	untilWaiting(t, func(n int) bool { return n > 0 })
	select {
	case r := <-read:
		t.Fatalf("read returned (%d bytes, %v) while the host image is being filled", len(r.b), r.err)
	default:
	}
	gate.Release()
	r := <-read
	if r.err != nil {
		t.Fatal(r.err)
	}
	h, err := safetensors.Parse(r.b)
	if err != nil {
		t.Fatalf("the file read after the fill: %v", err)
	}
	if got := r.b[h.DataOffset():]; !bytes.Equal(got, data) {
		t.Error("the file read after the fill does not hold the tensor written on the GPU")
	}
	buf := make([]byte, 64)
	n, err := unix.Getxattr(path, XXH3Xattr, buf)
	if want := store.FormatChecksum(xxh3.Hash(r.b)); err != nil || string(buf[:n]) != want {
		t.Errorf("%s = %q, %v; want %q", XXH3Xattr, buf[:n], err, want)
	}
	// Other files had nothing to fill: their checksum too.
	idx := filepath.Join(srv.Mountpoint(), "m@1")
	entries, err := os.ReadDir(idx)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(idx, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		n, err := unix.Getxattr(filepath.Join(idx, e.Name()), XXH3Xattr, buf)
		if want := store.FormatChecksum(xxh3.Hash(b)); err != nil || string(buf[:n]) != want {
			t.Errorf("%s %s = %q, %v; want %q", e.Name(), XXH3Xattr, buf[:n], err, want)
		}
	}
}

// TestMountOpenInterrupted kills a reader whose open waits for the host
// image: the kernel interrupts the open, the daemon answers it and nothing
// waits any more; a later open reads the filled file.
func TestMountOpenInterrupted(t *testing.T) {
	srv, gate, data := mountHeldPush(t)
	path := filepath.Join(srv.Mountpoint(), "m@1", weightsFile)

	cat := exec.Command("cat", path)
	if err := cat.Start(); err != nil {
		t.Fatal(err)
	}
	untilWaiting(t, func(n int) bool { return n > 0 })
	cat.Process.Signal(syscall.SIGTERM)
	if err := cat.Wait(); err == nil {
		t.Fatal("cat should have died of SIGTERM")
	}
	untilWaiting(t, func(n int) bool { return n == 0 })
	gate.Release()
	b, err := os.ReadFile(path)
	if err != nil || !bytes.HasSuffix(b, data) {
		t.Fatalf("read after the fill: %d bytes, %v", len(b), err)
	}
}

// TestMountFillFailed: a file whose host image could not be filled answers
// EIO to opens and to its checksum attribute; the other files serve.
func TestMountFillFailed(t *testing.T) {
	st, fake := gpuStore(t)
	srv := mountStore(t, st, Options{})
	fake.Inject(cudatest.Fault{Call: "cuMemcpyDtoH_v2", Code: cudatest.CodeIllegalAddress})
	pushOnGPU(t, st, fake)
	path := filepath.Join(srv.Mountpoint(), "m@1", weightsFile)
	if _, err := os.ReadFile(path); !errors.Is(err, syscall.EIO) {
		t.Errorf("read of a file whose fill failed: %v, want EIO", err)
	}
	if _, err := unix.Getxattr(path, XXH3Xattr, make([]byte, 64)); !errors.Is(err, syscall.EIO) {
		t.Errorf("%s of a file whose fill failed: %v, want EIO", XXH3Xattr, err)
	}
	// The CUDA manifest does not need the host image.
	if _, err := unix.Getxattr(path, CUDAXattr, make([]byte, 4096)); err != nil {
		t.Errorf("%s of a file whose fill failed: %v", CUDAXattr, err)
	}
}

// TestOpenCancelled is the node-level wait: a request whose context ends
// gets EINTR and leaves the version unused.
func TestOpenCancelled(t *testing.T) {
	st, fake := gpuStore(t)
	gate := fake.Hold("cuMemcpyDtoH_v2")
	defer gate.Release()
	pushOnGPU(t, st, fake)
	root := nodeTree(t, st, Options{})
	node, _ := lookupPath(t, root, "m@1/"+weightsFile)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, errno := node.(*fileNode).Open(ctx, syscall.O_RDONLY); errno != syscall.EINTR {
		t.Errorf("open with an ended request: %v, want EINTR", errno)
	}
	if _, errno := node.(*fileNode).Getxattr(ctx, XXH3Xattr, make([]byte, 64)); errno != syscall.EINTR {
		t.Errorf("getxattr %s with an ended request: %v, want EINTR", XXH3Xattr, errno)
	}
	if n := st.Version("m", 1).OpenFiles(); n != 0 {
		t.Errorf("%d open files after an interrupted open", n)
	}
}

// TestMountDirectHeaderRead: an O_DIRECT descriptor of a pushed file opens
// and reads the header at once while the host image is filling; its read of
// tensor bytes waits for the fill and then sees the tensor written on the
// GPU.
func TestMountDirectHeaderRead(t *testing.T) {
	srv, gate, data := mountHeldPush(t)
	path := filepath.Join(srv.Mountpoint(), "m@1", weightsFile)
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err) // an open that waited would never get here: the fill is held
	}
	defer unix.Close(fd)
	prefix := make([]byte, 8)
	if n, err := unix.Pread(fd, prefix, 0); err != nil || n != 8 {
		t.Fatalf("read the header's length: %d, %v", n, err)
	}
	hlen := int64(binary.LittleEndian.Uint64(prefix))
	header := make([]byte, 8+hlen)
	if n, err := unix.Pread(fd, header, 0); err != nil || int64(n) != 8+hlen {
		t.Fatalf("read the header: %d, %v", n, err)
	}
	if h, err := safetensors.ReadHeader(bytes.NewReader(header), 8+hlen+int64(len(data))); err != nil || h.DataOffset() != 8+hlen {
		t.Fatalf("the header read before the fill: %v", err)
	}
	tensor := make(chan []byte, 1)
	go func() {
		b := make([]byte, len(data))
		n, err := unix.Pread(fd, b, 8+hlen)
		if err != nil {
			t.Error(err)
		}
		tensor <- b[:max(n, 0)]
	}()
	untilWaiting(t, func(n int) bool { return n > 0 })
	select {
	case b := <-tensor:
		t.Fatalf("a read of tensor bytes returned %d bytes before the fill", len(b))
	default:
	}
	gate.Release()
	if b := <-tensor; !bytes.Equal(b, data) {
		t.Errorf("tensor bytes read after the fill differ (%d bytes)", len(b))
	}
}

// TestMountReleaseIoctl: a process that got a version's handles and then
// releases them (§3.1) no longer keeps the version once it is unloaded.
func TestMountReleaseIoctl(t *testing.T) {
	st, fake := gpuStore(t)
	srv := mountStore(t, st, Options{})
	pushOnGPU(t, st, fake)
	v := st.Version("m", 1)
	path := filepath.Join(srv.Mountpoint(), "m@1", weightsFile)
	buf := make([]byte, 16384)
	if _, err := unix.Getxattr(path, CUDAXattr, buf); err != nil {
		t.Fatalf("get the handles: %v", err)
	}
	if hh := v.HandleHolders(); len(hh) != 1 || hh[0] != os.Getpid() {
		t.Fatalf("handle holders %v, want this process", hh)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), IoctlRelease, 0); errno != 0 {
		t.Fatalf("release ioctl: %v", errno)
	}
	f.Close()
	if hh := v.HandleHolders(); len(hh) != 0 {
		t.Errorf("handle holders %v after the release", hh)
	}
	if _, err := st.Unload("m", 0); err != nil {
		t.Fatal(err)
	}
	// The kernel sends the file's RELEASE after close returns: the version
	// is freed when it arrives (a deadline against a hang, not a timing).
	for deadline := time.Now().Add(10 * time.Second); len(st.Draining()) != 0; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("draining %d versions: nothing holds m@1 any more", len(st.Draining()))
		}
	}
}
