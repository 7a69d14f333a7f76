package store

import (
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/weightfs/weightfs/cuda"
)

// GPUs are the devices every weights file is replicated to, with their
// primary contexts and copy streams.
type GPUs struct {
	list []*GPU
}

// GPU is one device weights are made resident on.
type GPU struct {
	dev     cuda.Device
	ctx     *cuda.Context
	streams []*cuda.Stream
	mu      sync.Mutex // one upload at a time per device: streams are shared
}

// UUID is the device's "GPU-…" UUID.
func (g *GPU) UUID() string { return g.dev.UUID }

// Device describes the device.
func (g *GPU) Device() cuda.Device { return g.dev }

// MemInfo is the device's free and total memory.
func (g *GPU) MemInfo() (free, total uint64, err error) { return g.ctx.MemInfo() }

// copyStreams is how many streams share one device's uploads.
const copyStreams = 2

// OpenGPUs resolves ids (CUDA ordinals or UUIDs) and prepares each device. An
// id that names no device is ErrInvalid; the caller names its flag.
func OpenGPUs(driver *cuda.Driver, ids []string) (*GPUs, error) {
	g := &GPUs{}
	seen := map[string]bool{}
	for _, id := range ids {
		dev, err := driver.Find(id)
		if err != nil {
			g.Close()
			return nil, errorf(ErrInvalid, "GPU %q: %w", id, err)
		}
		if seen[dev.UUID] {
			continue
		}
		seen[dev.UUID] = true
		ctx, err := driver.Context(dev)
		if err != nil {
			g.Close()
			return nil, fmt.Errorf("GPU %s: %w", dev.UUID, err)
		}
		gpu := &GPU{dev: dev, ctx: ctx}
		g.list = append(g.list, gpu)
		for range copyStreams {
			s, err := ctx.NewStream()
			if err != nil {
				g.Close()
				return nil, fmt.Errorf("GPU %s: %w", dev.UUID, err)
			}
			gpu.streams = append(gpu.streams, s)
		}
	}
	return g, nil
}

// List is the devices in the order they were given.
func (g *GPUs) List() []*GPU {
	if g == nil {
		return nil
	}
	return g.list
}

// Close destroys the streams and releases the contexts. Slabs must have
// been freed first (Store.Close does).
func (g *GPUs) Close() error {
	if g == nil {
		return nil
	}
	var errs []error
	for _, gpu := range g.list {
		for _, s := range gpu.streams {
			errs = append(errs, s.Destroy())
		}
		errs = append(errs, gpu.ctx.Release())
	}
	g.list = nil
	return errors.Join(errs...)
}

// slabGranularity rounds slab allocations: an importer opens a handle to a
// 2 MiB-multiple allocation in ~0.2 ms, to any other size in ~25 ms (H200,
// measured; docs/BENCHMARKS.md).
const slabGranularity = 2 << 20

func slabAllocSize(need int64) int64 { return alignUp(need, slabGranularity) }

// replica is a weights file's copy on one GPU.
type replica struct {
	gpu    *GPU
	slab   *cuda.Slab
	handle cuda.IPCHandle
	size   int64
}

// Residency lists where the file is: "host" (or "compressed", "snapshot"),
// then each GPU's UUID.
func (f *File) Residency() []string {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := []string{f.tier()}
	for _, r := range f.replicas {
		out = append(out, r.gpu.UUID())
	}
	return out
}

// pin registers the host image with the driver so copies run at full PCIe
// speed. One registration (portable) serves every device.
func (f *File) pin(g *GPUs) error {
	if len(g.list) == 0 || f.Size() == 0 || f.pinned != nil {
		return nil
	}
	ctx := g.list[0].ctx
	if err := ctx.RegisterHost(f.Bytes()); err != nil {
		return fmt.Errorf("pin host image of %s: %w", f.path, err)
	}
	f.pinned = ctx
	return nil
}

// replicate copies a pinned weights file to every GPU with the slab layout and
// exports its handles. Handles are taken only after the copies are complete.
func (f *File) replicate(g *GPUs) error {
	if f.header == nil {
		return nil
	}
	_, need := SlabLayout(f.header)
	size := slabAllocSize(need)
	runs := slabCopies(f.header)
	for _, gpu := range g.list {
		r, err := gpu.upload(f.Bytes(), runs, size)
		if err != nil {
			return fmt.Errorf("copy %s to GPU %s: %w", f.path, gpu.UUID(), err)
		}
		f.mu.Lock()
		f.replicas = append(f.replicas, r)
		f.mu.Unlock()
	}
	return nil
}

func (gpu *GPU) upload(image []byte, runs []copyRun, size int64) (*replica, error) {
	gpu.mu.Lock()
	defer gpu.mu.Unlock()
	slab, err := gpu.ctx.NewSlab(uint64(size))
	if err != nil {
		return nil, err
	}
	if err := gpu.copyRunsLocked(slab, image, runs); err != nil {
		slab.Free()
		return nil, err
	}
	h, err := slab.IPCHandle()
	if err != nil {
		slab.Free()
		return nil, err
	}
	return &replica{gpu: gpu, slab: slab, handle: h, size: size}, nil
}

// copyRunsLocked copies runs of image to slab over the device's streams and
// waits for them; gpu.mu is held.
func (gpu *GPU) copyRunsLocked(slab *cuda.Slab, image []byte, runs []copyRun) error {
	return gpu.copyLocked(slab, image, runs, nil)
}

// complete copies into slab, a push's slab on this device, the runs of image
// and those of the other devices' slabs (peers; this device's own runs are
// skipped), and waits for them.
func (gpu *GPU) complete(slab *cuda.Slab, image []byte, runs []copyRun, peers []slabRuns) error {
	gpu.mu.Lock()
	defer gpu.mu.Unlock()
	return gpu.copyLocked(slab, image, runs, peers)
}

// copyLocked enqueues the host runs of image, then the runs of peers'
// slabs, device to device at the same slab offsets (every slab of a file
// has the same layout), over the device's streams and waits for them; gpu.mu
// is held. Under unified addressing the driver copies between devices peer
// to peer, or through host memory where they have no peer access.
func (gpu *GPU) copyLocked(slab *cuda.Slab, image []byte, runs []copyRun, peers []slabRuns) error {
	err := func() error {
		for _, r := range runs {
			if err := slab.Upload(uint64(r.dst), image[r.src:r.src+r.n], gpu.streams, 0); err != nil {
				return err
			}
		}
		i := 0
		for _, p := range peers {
			if p.r.gpu == gpu {
				continue
			}
			for _, r := range p.runs {
				at := cuda.DevicePtr(r.dst)
				if err := gpu.streams[i%len(gpu.streams)].CopyDtoD(slab.Ptr+at, p.r.slab.Ptr+at, uint64(r.n)); err != nil {
					return fmt.Errorf("from GPU %s: %w", p.r.gpu.UUID(), err)
				}
				i++
			}
		}
		return nil
	}()
	if err != nil {
		cuda.SynchronizeAll(gpu.streams)
		return err
	}
	return cuda.SynchronizeAll(gpu.streams)
}

// freeGPU frees the file's slabs and unpins its host image.
func (f *File) freeGPU() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	var errs []error
	for _, r := range f.replicas {
		if err := r.slab.Free(); err != nil {
			errs = append(errs, fmt.Errorf("free slab of %s on %s: %w", f.path, r.gpu.UUID(), err))
		}
	}
	f.replicas = nil
	errs = append(errs, f.unpinLocked())
	return errors.Join(errs...)
}

// checkGPUMemory refuses a replication that cannot fit before anything is
// allocated: it says what is needed and what is free on each device.
func checkGPUMemory(g *GPUs, need int64, what string) error {
	var short []string
	for _, gpu := range g.list {
		free, _, err := gpu.MemInfo()
		if err != nil {
			return fmt.Errorf("GPU %s: %w", gpu.UUID(), err)
		}
		if uint64(need) > free {
			short = append(short, fmt.Sprintf("GPU %s needs %d bytes, %d free", gpu.UUID(), need, free))
		}
	}
	if len(short) > 0 {
		return errorf(ErrNoMemory, "not enough GPU memory for %s: %s", what, strings.Join(short, "; "))
	}
	return nil
}
