package codec

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
)

// readChunk is how much DecodeReader reads at a time.
const readChunk = 4 << 20

// DecodeReader decodes the stream of size bytes that r yields into dst,
// which must be exactly the stream's raw length. Each block is decoded on
// one of workers goroutines (GOMAXPROCS when workers <= 0) as soon as its
// bytes are read, so reading a stream from a disk and decoding it overlap.
// It checks what DecodeParallel checks and fails as it does (ErrCorrupt,
// naming the block and the byte); r ending early is a truncated stream,
// another error of r's is returned wrapped. It stops early, returning ctx's
// error, when ctx ends. On any error the content of dst is unspecified.
func (c *Codec) DecodeReader(ctx context.Context, dst []byte, r io.Reader, size int64, workers int) error {
	if size < 0 {
		return fmt.Errorf("codec: negative stream size %d", size)
	}
	src := make([]byte, size)
	var avail int64
	// readTo reads until the first n bytes of the stream are there.
	readTo := func(n int64) error {
		for avail < n {
			end := min(size, max(n, avail+readChunk))
			m, err := io.ReadFull(r, src[avail:end])
			avail += int64(m)
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return truncated(-1, avail, "the reader ended before the %d bytes of the stream", size)
			}
			if err != nil {
				return fmt.Errorf("codec: read the stream at byte %d: %w", avail, err)
			}
		}
		return nil
	}
	if err := readTo(min(size, streamHeaderSize)); err != nil {
		return err
	}
	h, err := parseStreamHeader(src)
	if err != nil {
		return err
	}
	if workers, err = decodeWorkers(h, dst, workers); err != nil {
		return err
	}
	var (
		mu       sync.Mutex
		firstErr error
		failed   atomic.Bool
		wg       sync.WaitGroup
	)
	setErr := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
		failed.Store(true)
	}
	jobs := make(chan *block, 2*workers)
	for range workers {
		wg.Go(func() {
			w := c.workers.Get().(*worker)
			defer c.workers.Put(w)
			for b := range jobs {
				if failed.Load() {
					continue
				}
				if err := ctx.Err(); err != nil {
					setErr(fmt.Errorf("codec: decode stopped at block %d: %w", b.index, err))
				} else if err := c.decodeBlock(dst[b.rawOff:b.rawOff+int64(b.rawLen)], b, w); err != nil {
					setErr(err)
				}
			}
		})
	}
	err = c.feed(ctx, h, src, readTo, jobs, &failed)
	close(jobs)
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return err
}

// feed reads block after block of the stream src (whose header h is read)
// and hands each to jobs once its payload is there.
func (c *Codec) feed(ctx context.Context, h streamHeader, src []byte, readTo func(int64) error, jobs chan<- *block, failed *atomic.Bool) error {
	size := int64(len(src))
	off := int64(streamHeaderSize)
	var raw uint64
	for i := 0; i < int(h.blocks); i++ {
		if failed.Load() {
			return nil // a worker's error is returned
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("codec: decode stopped at block %d: %w", i, err)
		}
		if err := readTo(min(size, off+blockHeaderSize)); err != nil {
			return err
		}
		bh, start, err := blockAt(src[off:], i, off, size)
		if err != nil {
			return err
		}
		if raw+uint64(bh.rawLen) > h.rawLen {
			return corrupt(i, off+4, "the blocks hold more than the %d raw bytes the header says", h.rawLen)
		}
		if err := readTo(start + int64(bh.encLen)); err != nil {
			return err
		}
		jobs <- &block{blockHeader: bh, index: i, off: off, payload: src[start : start+int64(bh.encLen)], rawOff: int64(raw)}
		raw += uint64(bh.rawLen)
		off = start + int64(bh.encLen)
	}
	if raw != h.rawLen {
		return corrupt(-1, off, "blocks hold %d raw bytes, the header says %d", raw, h.rawLen)
	}
	if off != size {
		return corrupt(-1, off, "%d trailing bytes after the last block", size-off)
	}
	return nil
}

// decodeWorkers checks that dst fits the stream h and returns how many
// goroutines decode it: workers (GOMAXPROCS when <= 0), at most one per
// block, at least one.
func decodeWorkers(h streamHeader, dst []byte, workers int) (int, error) {
	if uint64(len(dst)) != h.rawLen {
		return 0, fmt.Errorf("codec: destination is %d bytes, the stream holds %d", len(dst), h.rawLen)
	}
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	return max(min(workers, int(h.blocks)), 1), nil
}
