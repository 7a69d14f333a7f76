package store

import (
	"context"
	"errors"
	"fmt"
	"runtime"

	"github.com/zeebo/xxh3"

	"github.com/weightfs/weightfs/cuda"
)

// What a committed version does after its commit, off the critical path of
// a push (docs/ARCHITECTURE.md, "Readiness"): one goroutine per version
// first fills the host images of its files from the GPU slabs their tensors
// were written to (a push's device-written tensors; nothing for a load),
// then computes each file's XXH3-64. The version owns the goroutine: freeing
// the version cancels it and waits for it before any memory goes.

// hostFill is the part of one file's host image that is copied from the
// slabs after the commit.
type hostFill struct {
	file *File
	from []slabRuns
}

// slabRuns are runs (file offset src, slab offset dst) to copy from one slab.
type slabRuns struct {
	r    *replica
	runs []copyRun
}

// background is a version's goroutine.
type background struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// ErrFillFailed: a file's host image could not be filled from the GPU after
// its version was committed; the file's bytes are not served.
var ErrFillFailed = errors.New("host image not filled")

// hashChunk is how much is hashed between checks of the context, so that
// freeing a version does not wait for a whole file's checksum.
const hashChunk = 64 << 20

// checksumWorkers is how many files are checksummed at once in the whole
// store: half the CPUs, so loads and readers keep the rest (CI has 2).
func checksumWorkers() int { return max(1, runtime.GOMAXPROCS(0)/2) }

// prepareBackground gives every file of v its readiness and checksum states
// before v becomes visible; fills are the files whose host image is not
// complete yet.
func (v *Version) prepareBackground(fills []hostFill) {
	for _, f := range v.files {
		f.summed = make(chan struct{})
	}
	for _, fl := range fills {
		fl.file.ready = make(chan struct{})
	}
}

// startBackground starts v's goroutine; s.mu is held and v is numbered.
func (s *Store) startBackground(v *Version, fills []hostFill) {
	ctx, cancel := context.WithCancel(context.Background())
	bg := &background{cancel: cancel, done: make(chan struct{})}
	v.bg = bg
	if s.snapshotWanted(v) {
		v.snapped = make(chan struct{})
	}
	go func() {
		defer close(bg.done)
		if v.snapped != nil {
			defer close(v.snapped)
		}
		for _, fl := range fills {
			err := s.fill(ctx, v, fl)
			fl.file.setReady(err)
			if err != nil && ctx.Err() == nil {
				s.log.Error("fill host image from GPU", "model", v.model, "version", v.Name(), "file", fl.file.path, "err", err)
			}
		}
		for _, f := range v.files {
			f.computeSum(ctx, s.sums)
		}
		if ctx.Err() == nil {
			s.requestSave() // the manifest with the checksums
		}
		if v.snapped != nil {
			if ctx.Err() != nil {
				v.snapErr = fmt.Errorf("snapshot of %s: %w", v.Name(), ctx.Err())
			} else {
				v.snapErr = s.writeSnapshot(ctx, v)
			}
		}
	}()
}

// stopBackground cancels v's goroutine and waits for it: after it returns
// nothing of v's is read or written in the background.
func (v *Version) stopBackground() {
	if v.bg == nil {
		return
	}
	v.bg.cancel()
	<-v.bg.done
}

// fill copies fl's runs device to host in chunks, into the unpinned host
// image. Pinning it first (cuMemHostRegister of tens of GB) would hold the
// driver for seconds, stalling the next push's allocations and commit
// (measured on the H200: staging 2.6-3.8 s instead of 0.05 s while a 16 GB
// image was being pinned), and its unregistering would slow every free.
func (s *Store) fill(ctx context.Context, v *Version, fl hostFill) error {
	f := fl.file
	if err := f.buf.Allocate(); err != nil {
		return fmt.Errorf("%s: %w: %w", f.path, ErrFillFailed, err)
	}
	img := f.Bytes()
	for _, src := range fl.from {
		for _, r := range src.runs {
			for off := int64(0); off < r.n; off += cuda.DefaultChunk {
				if err := ctx.Err(); err != nil {
					return fmt.Errorf("%s: %w: %w", f.path, ErrFillFailed, err)
				}
				n := min(cuda.DefaultChunk, r.n-off)
				dst := img[r.src+off : r.src+off+n]
				if err := src.r.gpu.ctx.CopyDtoH(dst, src.r.slab.Ptr+cuda.DevicePtr(r.dst+off)); err != nil {
					return fmt.Errorf("%s: %w: copy from GPU %s: %w", f.path, ErrFillFailed, src.r.gpu.UUID(), err)
				}
			}
		}
	}
	return nil
}

// setReady ends the file's fill with err (nil: the host image is complete).
func (f *File) setReady(err error) {
	f.readyErr = err
	close(f.ready)
}

// Ready says, without waiting, whether the file's host image is complete
// (done, err nil), its fill failed (done, err wraps ErrFillFailed), or it is
// still being filled (not done).
func (f *File) Ready() (done bool, err error) {
	if f.ready == nil {
		return true, nil
	}
	select {
	case <-f.ready:
		return true, f.readyErr
	default:
		return false, nil
	}
}

// WaitReady waits until the file's host image is complete: at once for a
// loaded file or a pushed file with nothing to fill from the GPU. It
// returns an error wrapping ErrFillFailed if the fill failed, or ctx's error
// if ctx ends first.
func (f *File) WaitReady(ctx context.Context) error {
	if f.ready == nil {
		return nil
	}
	select {
	case <-f.ready:
		return f.readyErr
	default:
	}
	select {
	case <-f.ready:
		return f.readyErr
	case <-ctx.Done():
		return fmt.Errorf("wait for the host image of %s: %w", f.path, context.Cause(ctx))
	}
}

// computeSum records the XXH3-64 of the host image once it is ready, taking
// one of the store's checksum slots (sem).
func (f *File) computeSum(ctx context.Context, sem chan struct{}) {
	defer close(f.summed)
	if f.knownSum {
		return
	}
	if err := f.WaitReady(ctx); err != nil {
		f.sumErr = err
		return
	}
	select {
	case sem <- struct{}{}:
	case <-ctx.Done():
		f.sumErr = fmt.Errorf("checksum of %s: %w", f.path, ctx.Err())
		return
	}
	defer func() { <-sem }()
	sum, err := hashImage(ctx, f.Bytes())
	if err != nil {
		f.sumErr = fmt.Errorf("checksum of %s: %w", f.path, err)
		return
	}
	f.sum = sum
}

// hashImage is xxh3.Hash(b), in chunks so that ctx can stop it.
// checkImage is hashImage compared with a recorded XXH3 (where names the
// record): adoption of a pushed file, a snapshot's load and a restore trust
// a recorded checksum instead of a source.
func checkImage(ctx context.Context, b []byte, want uint64, where string) (uint64, error) {
	got, err := hashImage(ctx, b)
	if err != nil {
		return 0, err
	}
	if got != want {
		return got, fmt.Errorf("checksum mismatch: the XXH3 of its bytes is %s, %s says %s",
			FormatChecksum(got), where, FormatChecksum(want))
	}
	return got, nil
}

func hashImage(ctx context.Context, b []byte) (uint64, error) {
	h := xxh3.New()
	for off := 0; off < len(b); off += hashChunk {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		h.Write(b[off:min(off+hashChunk, len(b))])
	}
	return h.Sum64(), nil
}

// Checksum is the XXH3-64 of the file's bytes, once computed (ok false
// before, and for a file whose fill failed or whose version was freed
// first). Every committed version's files are checksummed in the
// background after they are ready.
func (f *File) Checksum() (sum uint64, ok bool) {
	if f.summed == nil {
		return 0, false
	}
	select {
	case <-f.summed:
		return f.sum, f.sumErr == nil
	default:
		return 0, false
	}
}

// WaitChecksum waits for the file's checksum. It fails if the file is not
// part of a committed version, if its fill failed (wrapping ErrFillFailed),
// if the version was freed first, or with ctx's error.
func (f *File) WaitChecksum(ctx context.Context) (uint64, error) {
	if f.summed == nil {
		return 0, fmt.Errorf("checksum of %s: not committed", f.path)
	}
	select {
	case <-f.summed:
	case <-ctx.Done():
		return 0, fmt.Errorf("wait for the checksum of %s: %w", f.path, context.Cause(ctx))
	}
	if f.sumErr != nil {
		return 0, f.sumErr
	}
	return f.sum, nil
}

// requestSave asks Run to rewrite the state manifest soon (requests made
// while one is pending are one write): for callers that must not wait for
// the JSON and its fsync.
func (s *Store) requestSave() {
	if s.state == nil {
		return
	}
	select {
	case s.saveCh <- struct{}{}:
	default:
	}
}
