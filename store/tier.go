package store

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sort"
	"time"

	"github.com/weightfs/weightfs/store/codec"
)

// Host memory tiers of a version (docs/ARCHITECTURE.md, "Tiers").
const (
	// TierCompressed: the host images are freed; each file is kept as a
	// codec stream (in the state directory's images folder, or the
	// daemon's heap without one) and restored on its next open.
	TierCompressed = "compressed"
	// TierSnapshot: a compressed pushed version whose weights files'
	// streams were dropped for the same streams in its snapshot on disk
	// (evict.go): restored from there on its next open.
	TierSnapshot = "snapshot"
)

// Tier is TierHost, TierCompressed or TierSnapshot.
func (v *Version) Tier() string {
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	if !v.use.compressed {
		return TierHost
	}
	for _, f := range v.files {
		if f.tier() == TierSnapshot {
			return TierSnapshot
		}
	}
	return TierCompressed
}

// tier is where f's bytes are: TierHost (a host image, or nothing once
// freed), TierCompressed or TierSnapshot.
func (f *File) tier() string {
	f.tmu.RLock()
	defer f.tmu.RUnlock()
	switch {
	case f.buf != nil || f.packed == nil:
		return TierHost
	case !f.packed.resident():
		return TierSnapshot
	}
	return TierCompressed
}

// CompressedBytes is the size of the version's codec streams, in memory
// or in its snapshot (0 in the host tier).
func (v *Version) CompressedBytes() int64 {
	var n int64
	for _, f := range v.files {
		f.tmu.RLock()
		if f.packed != nil {
			n += f.packed.Size()
		}
		f.tmu.RUnlock()
	}
	return n
}

// LastUsed is when the version was last opened, released or handed out
// (its commit until then): eviction takes the least recently used first.
func (v *Version) LastUsed() time.Time {
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	if v.use.lastUse.IsZero() {
		return v.loadedAt
	}
	return v.use.lastUse
}

// image is the file's host image (nil while its version is compressed).
func (f *File) image() *Buffer {
	f.tmu.RLock()
	defer f.tmu.RUnlock()
	return f.buf
}

// backgroundDone: v's fill, checksums and snapshot are over (they read
// the host images a compression frees).
func (v *Version) backgroundDone() bool {
	if v.bg == nil {
		return true
	}
	select {
	case <-v.bg.done:
		return true
	default:
		return false
	}
}

// beginMove marks v as moving between tiers if nothing uses it (nobody has
// it open, no live process holds its GPU handles, it is not draining and
// its background work is over) and it is in the host tier. It returns
// the channel to close when the move ends, or why v cannot move.
func (v *Version) beginMove() (chan struct{}, error) {
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	switch {
	case v.use.freed || v.use.draining:
		return nil, errorf(ErrNotFound, "compress %s: it is unloaded", v.Name())
	case v.use.moving != nil:
		return nil, errorf(ErrBusy, "compress %s: it is moving between tiers", v.Name())
	case v.use.compressed:
		return nil, nil
	case !v.idle():
		return nil, errorf(ErrBusy, "compress %s: it is in use (%d open files, handle holders %v)",
			v.Name(), v.use.open, v.holdersLocked())
	case !v.backgroundDone():
		return nil, errorf(ErrBusy, "compress %s: its fill, checksums or snapshot are still running", v.Name())
	}
	ch := make(chan struct{})
	v.use.moving = ch
	return ch, nil
}

func (v *Version) holdersLocked() []int {
	var pids []int
	for pid := range v.use.holders {
		pids = append(pids, pid)
	}
	sort.Ints(pids)
	return pids
}

// endMove ends a move; err is what restore waiters are told. A draining
// version that nothing uses any more is freed now.
func (s *Store) endMove(v *Version, ch chan struct{}, err error) {
	v.use.mu.Lock()
	v.use.moving = nil
	v.use.moveErr = err
	done := v.use.draining && v.idle()
	v.use.mu.Unlock()
	close(ch)
	if done {
		s.reap(v)
	}
}

// trackMove registers a tier move that Close waits for; false once the
// store is closed.
func (s *Store) trackMove() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.moves.Add(1)
	return true
}

// Compress moves a version (number > 0) that nobody uses to the compressed
// tier: every file is encoded (byte planes for weights, zstd or raw for
// the rest), the encoding checked by its raw size, then the host images
// are freed. GPU replicas stay (their slabs do not depend on the host
// image; the image is unpinned). A version in use is ErrBusy; one already
// compressed is left as it is.
func (s *Store) Compress(ctx context.Context, name string, number int) (*Version, error) {
	if err := checkVersionRequest("compress", name, number); err != nil {
		return nil, err
	}
	v := s.Version(name, number)
	if v == nil {
		return nil, errorf(ErrNotFound, "compress %s@%d: no such version", name, number)
	}
	return v, s.compress(ctx, v, "requested")
}

// compress moves v to the compressed tier; reason is logged.
func (s *Store) compress(ctx context.Context, v *Version, reason string) error {
	ch, err := v.beginMove()
	if err != nil || ch == nil {
		return err
	}
	if !s.trackMove() {
		s.endMove(v, ch, nil)
		return errorf(ErrBusy, "compress %s: the store is closed", v.Name())
	}
	defer s.moves.Done()
	start := time.Now()
	images, packed, err := s.compressFiles(ctx, v)
	s.endMove(v, ch, nil)
	if err != nil {
		return err
	}
	s.moveCompress.Add(1)
	// The manifest names the streams before the images go: a crash in
	// between finds one or the other.
	s.saveState()
	var freed int64
	var errs []error
	for i, b := range images {
		freed += b.Cost()
		if err := b.Close(); err != nil {
			errs = append(errs, fmt.Errorf("free the host image of %s/%s: %w", v.Name(), v.files[i].path, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		s.log.Error("compress: freeing host images", "version", v.Name(), "err", err)
	}
	s.log.Info("evicted", "version", v.Name(), "from", TierHost, "to", TierCompressed, "bytes_freed", freed,
		"compressed_bytes", packed, "seconds", time.Since(start).Seconds(), "reason", reason)
	return nil
}

// compressFiles encodes v's files and, if nothing opened v meanwhile,
// swaps their host images for the streams. It returns the host images,
// unpinned, for the caller to free, and the streams' size.
func (s *Store) compressFiles(ctx context.Context, v *Version) (images []*Buffer, packed int64, err error) {
	c := codec.New(codec.Options{})
	defer c.Close()
	workers := runtime.GOMAXPROCS(0)
	streams := make([]*packedStream, 0, len(v.files))
	keep := false
	defer func() {
		if keep {
			return
		}
		for _, p := range streams {
			p.close()
		}
	}()
	var buf []byte // one file's stream at a time, kept where newPacked puts it
	for _, f := range v.files {
		img := f.buf.Bytes() // v is moving: nothing swaps f.buf but us
		if bound := encodeBound(len(img)); cap(buf) < bound {
			buf = make([]byte, 0, bound)
		}
		var st []byte
		if f.kind == Weights {
			st, err = c.EncodeSafetensors(ctx, buf[:0], img, workers)
		} else {
			st, err = c.EncodeParallel(ctx, buf[:0], img, "", workers)
		}
		if err != nil {
			return nil, 0, fmt.Errorf("compress %s/%s: %w", v.Name(), f.path, err)
		}
		if n, err := codec.RawSize(st); err != nil || n != int64(len(img)) {
			return nil, 0, fmt.Errorf("compress %s/%s: the stream decodes to %d bytes, want %d (%v)", v.Name(), f.path, n, len(img), err)
		}
		p, err := s.arena.newPacked(f.path, st)
		if err != nil {
			return nil, 0, fmt.Errorf("compress %s/%s: %w", v.Name(), f.path, err)
		}
		streams = append(streams, p)
		packed += p.Size()
	}
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	if !v.unused() {
		// Opened (or handed out) while encoding: it stays in the host tier.
		return nil, 0, errorf(ErrBusy, "compress %s: it was opened while being compressed", v.Name())
	}
	keep = true
	for i, f := range v.files {
		if err := f.unpin(); err != nil {
			s.log.Error("compress: unpin a host image", "version", v.Name(), "err", err)
		}
		f.tmu.Lock()
		images = append(images, f.buf)
		f.buf, f.packed, f.rawSize = nil, streams[i], f.buf.Size()
		f.tmu.Unlock()
	}
	v.use.compressed = true
	return images, packed, nil
}

// unpin unregisters the host image from the driver before it is freed;
// the replicas stay.
func (f *File) unpin() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.unpinLocked()
}

// unpinLocked unregisters the host image if it is pinned; f.mu is held.
func (f *File) unpinLocked() error {
	if f.pinned == nil {
		return nil
	}
	err := f.pinned.UnregisterHost(f.Bytes())
	f.pinned = nil
	if err != nil {
		return fmt.Errorf("unpin %s: %w", f.path, err)
	}
	return nil
}

// EnsureHost brings a compressed version back to the host tier: the whole
// version is restored (decoded on every core, each file's XXH3 checked
// against the recorded one) before it returns. Concurrent callers wait for
// one restore; ctx ends only the wait. The caller holds the version
// (Acquire), so it cannot be compressed again meanwhile.
func (v *Version) EnsureHost(ctx context.Context) error {
	v.use.mu.Lock()
	v.use.lastUse = time.Now()
	v.use.mu.Unlock()
	for {
		v.use.mu.Lock()
		ch, started := v.use.moving, false
		if ch == nil && !v.use.compressed {
			v.use.mu.Unlock()
			return nil
		}
		if ch == nil {
			ch, started = make(chan struct{}), true
			v.use.moving = ch
		}
		v.use.mu.Unlock()
		if started {
			s := v.store
			if !s.trackMove() {
				s.endMove(v, ch, errorf(ErrBusy, "restore %s: the store is closed", v.Name()))
			} else {
				// The restore goes on if this caller gives up: others
				// may wait for it, and it ends by itself.
				go func() {
					defer s.moves.Done()
					s.endMove(v, ch, s.restore(v))
				}()
			}
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("wait for the restore of %s: %w", v.Name(), ctx.Err())
		}
		v.use.mu.Lock()
		compressed, err := v.use.compressed, v.use.moveErr
		v.use.mu.Unlock()
		if !compressed {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// restore decodes every file of v into new host images and swaps them in;
// on any failure v stays compressed and nothing is kept.
func (s *Store) restore(v *Version) error {
	start := time.Now()
	ctx := context.Background()
	var need int64
	for _, f := range v.files {
		need += s.arena.Cost(f.rawSize)
	}
	release, err := s.reserveEvicting(ctx, v.model, v.source, need, 0)
	if err != nil {
		err = fmt.Errorf("restore %s from the compressed tier: %w", v.Name(), err)
		s.log.Error("restore", "version", v.Name(), "err", err)
		return err
	}
	defer release()
	c := codec.New(codec.Options{})
	defer c.Close()
	bufs := make([]*Buffer, 0, len(v.files))
	closeAll := func() {
		for _, b := range bufs {
			b.Close()
		}
	}
	for _, f := range v.files {
		b, err := s.arena.NewBuffer(f.path, f.rawSize)
		if err != nil {
			closeAll()
			err = fmt.Errorf("restore %s/%s: %w", v.Name(), f.path, err)
			s.log.Error("restore", "version", v.Name(), "err", err)
			return err
		}
		bufs = append(bufs, b)
		if err := f.decodeInto(ctx, c, b); err != nil {
			closeAll()
			err = fmt.Errorf("restore %s/%s: %w", v.Name(), f.path, err)
			s.log.Error("restore", "version", v.Name(), "err", err)
			return err
		}
	}
	from := v.Tier()
	var old []*packedStream
	v.use.mu.Lock()
	for i, f := range v.files {
		f.tmu.Lock()
		old = append(old, f.packed)
		f.buf, f.packed = bufs[i], nil
		f.tmu.Unlock()
	}
	v.use.compressed = false
	v.use.mu.Unlock()
	if from == TierSnapshot {
		s.restoreSnapshot.Add(1)
	} else {
		s.moveRestore.Add(1)
	}
	s.saveState() // before the streams go: a crash in between finds the images
	var errs []error
	for i, p := range old {
		if err := p.close(); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", v.files[i].path, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		s.log.Error("restore: freeing compressed streams", "version", v.Name(), "err", err)
	}
	s.log.Info("restored", "version", v.Name(), "from", from, "to", TierHost, "bytes", v.bytes,
		"seconds", time.Since(start).Seconds())
	return nil
}

// decodeInto decodes f's stream into b and checks it against f's recorded
// XXH3 (a file without one is checked by the codec's block checksums only).
func (f *File) decodeInto(ctx context.Context, c *codec.Codec, b *Buffer) error {
	f.tmu.RLock()
	p := f.packed // v is moving: nothing swaps it but us
	f.tmu.RUnlock()
	if err := p.decode(ctx, c, b.Bytes()); err != nil {
		return fmt.Errorf("decode: %w", err)
	}
	want, ok := f.Checksum()
	if !ok && f.knownSum {
		// Recorded by the daemon that compressed it (an adopted version):
		// its background may not have published it yet.
		want, ok = f.sum, true
	}
	if !ok {
		return nil
	}
	_, err := checkImage(ctx, b.Bytes(), want, "the recorded checksum")
	return err
}

// reserveEvicting is reserve that, with Options.CompressIdle, evicts
// before it gives up with the refusal, least recently used first and
// retrying after each: when GPU memory is refused (the budget, or a
// device's free memory) it frees the GPU replicas of idle non-current
// versions (evict.go); when host memory is refused (the budget or the
// system) it moves idle versions to the compressed tier, then compressed
// pushed versions whose snapshot is on disk to the snapshot tier, then
// takes compressed non-current versions that can be re-loaded from their
// unchanged source off the mount. Nothing open or held is touched.
func (s *Store) reserveEvicting(ctx context.Context, name, dir string, host, gpu int64) (func(), error) {
	tried := map[*Version]bool{}
	for {
		release, err := s.reserve(name, dir, host, gpu)
		if !s.compressIdle {
			return release, err
		}
		var be *BudgetError
		switch {
		case err == nil:
			// Admitted by the budgets; the devices may still be short
			// (other processes' memory): the caller's own check says so
			// if nothing can be freed.
			if !s.evictForGPU(name, gpu) {
				return release, nil
			}
			release()
		case !errors.As(err, &be):
			return nil, err
		case be.Tier == TierGPU:
			if !s.evictGPUOne(fmt.Sprintf("%s of GPU memory for %s (GPU budget)", HumanBytes(gpu), name)) {
				return nil, err
			}
		default:
			// Compressing every idle version comes first; moving
			// compressed pushed ones to their snapshots, second (they
			// stay on the mount); dropping compressed ones that can be
			// re-loaded, last.
			reason := fmt.Sprintf("%s of host memory for %s (%s budget)", HumanBytes(host), name, be.Tier)
			if !s.evictOne(ctx, tried, reason) && !s.snapshotOne(reason) && !s.dropOne(reason) {
				return nil, err
			}
		}
	}
}

// evictOne compresses the least recently used idle version not in tried;
// false when there is none left to try.
func (s *Store) evictOne(ctx context.Context, tried map[*Version]bool, reason string) bool {
	for {
		var cands []*Version
		for _, m := range s.Models() {
			for _, v := range m.Versions() {
				if !tried[v] && v.evictable() {
					cands = append(cands, v)
				}
			}
		}
		if len(cands) == 0 {
			return false
		}
		slices.SortStableFunc(cands, func(a, b *Version) int { return a.LastUsed().Compare(b.LastUsed()) })
		v := cands[0]
		tried[v] = true
		if err := s.compress(ctx, v, "memory pressure: "+reason); err != nil {
			s.log.Info("eviction skipped a version", "version", v.Name(), "err", err)
			continue
		}
		return true
	}
}

// evictable: v is in the host tier and nothing uses it (a quick check;
// beginMove decides).
func (v *Version) evictable() bool {
	v.use.mu.Lock()
	defer v.use.mu.Unlock()
	return !v.use.compressed && v.use.moving == nil && !v.use.draining && !v.use.freed && v.idle() && v.backgroundDone()
}
