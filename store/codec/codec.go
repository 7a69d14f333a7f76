// Package codec compresses model weights for the compressed tier held in
// RAM and for snapshots on disk.
//
// A buffer is cut into blocks (1 MiB by default) that are coded
// independently, so a stream restores in parallel across cores and any
// block decodes alone. Each block is stored as the smallest of: its byte
// planes entropy-coded with huff0 (for a dtype with a known element size:
// plane j holds byte j of every element, and BF16 and F32 elements are first
// rotated left by one bit so that the whole exponent, which carries about
// 2.6 bits of information in 8, lands in one plane); zstd of the raw bytes;
// or the raw bytes. Every header carries a CRC32-C, and every block the
// CRC32-C of its raw bytes, so a corrupted stream is detected and the error
// names the block. docs/CODEC.md describes the stream format.
//
// A Codec is safe for concurrent use; it keeps per-goroutine scratch space
// in a pool and one zstd encoder and decoder.
package codec

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/huff0"
	"github.com/klauspost/compress/zstd"
)

// Options configure a Codec. The zero value is the default.
type Options struct {
	// BlockSize is the raw bytes per block: 0 means DefaultBlockSize; it
	// is rounded down to a multiple of 8 (so blocks hold whole elements of
	// every dtype) and kept within [MinBlockSize, MaxBlockSize].
	BlockSize int
	// ZstdLevel is the level of the zstd candidate; 0 means
	// zstd.SpeedFastest (its decode speed hardly depends on the level).
	ZstdLevel zstd.EncoderLevel
	// NoZstd skips the zstd candidate: blocks are byte planes or raw.
	// Encoding is about twice as fast; weights lose little.
	NoZstd bool
	// Concurrency bounds the concurrent zstd calls; 0 means GOMAXPROCS.
	Concurrency int
}

// Codec encodes and decodes streams. Make one with New; Close it when done.
type Codec struct {
	blockSize int
	noZstd    bool

	enc     *zstd.Encoder
	dec     *zstd.Decoder
	initErr error

	workers sync.Pool // *worker
}

// worker is the scratch space of one goroutine.
type worker struct {
	cs     huff0.Scratch // compression
	ds     *huff0.Scratch
	planes []byte
	zbuf   []byte
}

// New returns a Codec with the given options.
func New(opts Options) *Codec {
	bs := opts.BlockSize
	if bs == 0 {
		bs = DefaultBlockSize
	}
	bs = min(max(bs&^7, MinBlockSize), MaxBlockSize)
	conc := opts.Concurrency
	if conc <= 0 {
		conc = runtime.GOMAXPROCS(0)
	}
	level := opts.ZstdLevel
	if level == 0 {
		level = zstd.SpeedFastest
	}
	c := &Codec{blockSize: bs, noZstd: opts.NoZstd}
	var err1, err2 error
	if !opts.NoZstd {
		c.enc, err1 = zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(conc),
			zstd.WithEncoderCRC(false), zstd.WithZeroFrames(true), zstd.WithWindowSize(windowFor(bs)))
	}
	c.dec, err2 = zstd.NewReader(nil, zstd.WithDecoderConcurrency(conc), zstd.WithDecoderMaxMemory(MaxBlockSize),
		zstd.WithDecodeAllCapLimit(true), zstd.WithDecoderLowmem(true))
	if err := errors.Join(err1, err2); err != nil {
		c.initErr = fmt.Errorf("codec: setting up zstd: %w", err)
	}
	c.workers.New = func() any { return &worker{} }
	return c
}

// windowFor returns the smallest zstd window (a power of two, at least
// 1 KiB) that holds a block.
func windowFor(bs int) int {
	w := 1 << 10
	for w < bs {
		w <<= 1
	}
	return w
}

// BlockSize returns the raw bytes per block this Codec writes.
func (c *Codec) BlockSize() int { return c.blockSize }

// Close releases the zstd encoder and decoder; the Codec must not be used
// after.
func (c *Codec) Close() {
	if c.enc != nil {
		c.enc.Close()
	}
	if c.dec != nil {
		c.dec.Close()
	}
}

// Encode appends the stream coding src to dst and returns it. dtype is the
// safetensors spelling of src's element type ("BF16", "F32", ...); an
// unknown or empty dtype codes src as bytes (zstd or raw).
func (c *Codec) Encode(dst, src []byte, dtype string) ([]byte, error) {
	return c.EncodeParallel(context.Background(), dst, src, dtype, 1)
}

// EncodeParallel is Encode on workers goroutines (GOMAXPROCS when workers
// <= 0); it writes the same stream. It stops early, returning ctx's error,
// when ctx ends.
func (c *Codec) EncodeParallel(ctx context.Context, dst, src []byte, dtype string, workers int) ([]byte, error) {
	lay := layoutOf(dtype)
	return c.encodeRuns(ctx, dst, []run{{data: src, lay: lay}}, lay.code, workers)
}

// run is a range of bytes of one dtype.
type run struct {
	data []byte
	lay  layout
}

// encodeRuns appends a stream of the runs, blocks never spanning two.
func (c *Codec) encodeRuns(ctx context.Context, dst []byte, runs []run, dtype byte, workers int) ([]byte, error) {
	if c.initErr != nil {
		return dst, c.initErr
	}
	type job struct {
		raw []byte
		lay layout
		enc []byte
	}
	var jobs []job
	h := streamHeader{dtype: dtype, blockSize: uint32(c.blockSize)}
	for _, r := range runs {
		for off := 0; off < len(r.data); off += c.blockSize {
			jobs = append(jobs, job{raw: r.data[off:min(off+c.blockSize, len(r.data))], lay: r.lay})
		}
		h.rawLen += uint64(len(r.data))
	}
	if uint64(len(jobs)) > 1<<32-1 {
		return dst, fmt.Errorf("codec: %d blocks, more than one stream holds", len(jobs))
	}
	h.blocks = uint32(len(jobs))
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	start := len(dst)
	dst = h.append(dst)
	if workers == 1 || len(jobs) < 2 {
		w := c.workers.Get().(*worker)
		defer c.workers.Put(w)
		for i, j := range jobs {
			if err := ctx.Err(); err != nil {
				return dst[:start], fmt.Errorf("codec: encode stopped at block %d: %w", i, err)
			}
			dst = c.encodeBlock(dst, j.raw, j.lay, w)
		}
		return dst, nil
	}
	// Each block into its own buffer, then all in order.
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(workers, len(jobs)) {
		wg.Go(func() {
			w := c.workers.Get().(*worker)
			defer c.workers.Put(w)
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= len(jobs) {
					return
				}
				jobs[i].enc = c.encodeBlock(nil, jobs[i].raw, jobs[i].lay, w)
			}
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return dst[:start], fmt.Errorf("codec: encode stopped: %w", err)
	}
	for _, j := range jobs {
		dst = append(dst, j.enc...)
	}
	return dst, nil
}

// encodeBlock appends one block: header, then the smallest payload.
func (c *Codec) encodeBlock(dst, raw []byte, lay layout, w *worker) []byte {
	bh := blockHeader{method: methodRaw, dtype: lay.code, elemSize: 1, rawLen: uint32(len(raw)), sum: checksum(raw)}
	at := len(dst)
	dst = bh.append(dst) // rewritten below
	payload := len(dst)
	best := len(raw)
	if k := lay.planes; k > 0 && len(raw) >= k {
		var ok bool
		dst, ok = c.appendPlanes(dst, raw, lay, w, best)
		if n := len(dst) - payload; ok && n < best {
			best = n
			bh.method, bh.elemSize = methodPlanes, byte(k)
			if lay.rotate && k > 1 {
				bh.flags = flagRotate
			}
		} else {
			dst = dst[:payload]
		}
	}
	if !c.noZstd && len(raw) > 0 {
		w.zbuf = c.enc.EncodeAll(raw, w.zbuf[:0])
		if len(w.zbuf) < best {
			best = len(w.zbuf)
			bh = blockHeader{method: methodZstd, dtype: lay.code, elemSize: 1, rawLen: bh.rawLen, sum: bh.sum}
			dst = append(dst[:payload], w.zbuf...)
		}
	}
	if bh.method == methodRaw {
		dst = append(dst[:payload], raw...)
	}
	bh.encLen = uint32(len(dst) - payload)
	copy(dst[at:], bh.append(nil))
	return dst
}

// appendPlanes appends the planes payload of raw; it gives up (false) as
// soon as it reaches limit bytes.
func (c *Codec) appendPlanes(dst, raw []byte, lay layout, w *worker, limit int) ([]byte, bool) {
	k := lay.planes
	n := len(raw) / k
	planes := raw[:n]
	if k > 1 {
		if cap(w.planes) < n*k {
			w.planes = make([]byte, c.blockSize)
		}
		planes = w.planes[:n*k]
		split(planes, raw, k, lay.rotate)
	}
	w.cs.Reuse = huff0.ReusePolicyNone // every chunk carries its table
	start := len(dst)
	for j := 0; j < k; j++ {
		plane := planes[j*n : (j+1)*n]
		for off := 0; off < n; off += ChunkSize {
			chunk := plane[off:min(off+ChunkSize, n)]
			dst = appendChunk(dst, chunk, &w.cs)
			if len(dst)-start >= limit {
				return dst, false
			}
		}
	}
	return append(dst, raw[n*k:]...), true
}

// appendChunk appends one chunk of a plane: huff0, RLE or raw.
func appendChunk(dst, chunk []byte, s *huff0.Scratch) []byte {
	out, reused, err := huff0.Compress4X(chunk, s)
	switch {
	case err == nil && !reused && len(out) < len(chunk):
		dst = append(dst, chunkHuff, byte(len(out)), byte(len(out)>>8), byte(len(out)>>16))
		return append(dst, out...)
	case errors.Is(err, huff0.ErrUseRLE):
		return append(dst, chunkRLE, 1, 0, 0, chunk[0])
	}
	// Incompressible, or anything else: raw is always right.
	dst = append(dst, chunkRaw, byte(len(chunk)), byte(len(chunk)>>8), byte(len(chunk)>>16))
	return append(dst, chunk...)
}

// RawSize returns the length of the bytes src decodes to, read from its
// header (Decode checks that the blocks agree).
func RawSize(src []byte) (int64, error) {
	return RawSizeAt(bytes.NewReader(src), int64(len(src)))
}

// RawSizeAt is RawSize of the stream of size bytes that r holds, reading
// only its header.
func RawSizeAt(r io.ReaderAt, size int64) (int64, error) {
	var head [streamHeaderSize]byte
	if err := readStreamAt(r, head[:], 0, size); err != nil {
		return 0, err
	}
	h, err := parseStreamHeaderOf(head[:], size)
	if err != nil {
		return 0, err
	}
	if h.rawLen > 1<<62 {
		return 0, corrupt(-1, 16, "raw length %d too large", h.rawLen)
	}
	return int64(h.rawLen), nil
}

// Decode decodes the stream src into dst, which must be exactly RawSize(src)
// bytes, on the calling goroutine.
func (c *Codec) Decode(dst, src []byte) error {
	return c.DecodeParallel(context.Background(), dst, src, 1)
}

// DecodeParallel decodes the stream src into dst, which must be exactly
// RawSize(src) bytes, on workers goroutines (GOMAXPROCS when workers <= 0).
// It stops early, returning ctx's error, when ctx ends. On any error the
// content of dst is unspecified.
func (c *Codec) DecodeParallel(ctx context.Context, dst, src []byte, workers int) error {
	h, blocks, err := scan(src)
	if err != nil {
		return err
	}
	workers, err = decodeWorkers(h, dst, workers)
	if err != nil {
		return err
	}
	var (
		next     atomic.Int64
		mu       sync.Mutex
		firstErr error
		failed   atomic.Bool
	)
	work := func() {
		w := c.workers.Get().(*worker)
		defer c.workers.Put(w)
		for !failed.Load() {
			i := int(next.Add(1) - 1)
			if i >= len(blocks) {
				return
			}
			b := &blocks[i]
			err := ctx.Err()
			if err != nil {
				err = fmt.Errorf("codec: decode stopped at block %d: %w", i, err)
			} else {
				err = c.decodeBlock(dst[b.rawOff:b.rawOff+int64(b.rawLen)], b, w)
			}
			if err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				mu.Unlock()
				failed.Store(true)
				return
			}
		}
	}
	if workers == 1 {
		work()
		return firstErr
	}
	var wg sync.WaitGroup
	for range workers {
		wg.Go(work)
	}
	wg.Wait()
	return firstErr
}

// DecodePrefixAt decodes the first len(dst) raw bytes of the stream of
// size bytes that r holds into dst, on the calling goroutine, reading only
// the stream header and the blocks that hold them: a file's header is read
// without reading, let alone decoding, the whole file. Each block read is
// checked (its header and its sum); the rest of the stream is not.
func (c *Codec) DecodePrefixAt(dst []byte, r io.ReaderAt, size int64) error {
	var head [streamHeaderSize]byte
	if err := readStreamAt(r, head[:], 0, size); err != nil {
		return err
	}
	h, err := parseStreamHeaderOf(head[:], size)
	if err != nil {
		return err
	}
	n := int64(len(dst))
	if uint64(n) > h.rawLen {
		return fmt.Errorf("codec: a prefix of %d bytes asked of a stream of %d", n, h.rawLen)
	}
	w := c.workers.Get().(*worker)
	defer c.workers.Put(w)
	off, raw := int64(streamHeaderSize), int64(0)
	var bh [blockHeaderSize]byte
	for i := 0; i < int(h.blocks) && raw < n; i++ {
		if err := readStreamAt(r, bh[:], off, size); err != nil {
			return err
		}
		hdr, start, err := blockAt(bh[:], i, off, size)
		if err != nil {
			return err
		}
		b := block{blockHeader: hdr, index: i, off: off, payload: make([]byte, hdr.encLen), rawOff: raw}
		if err := readStreamAt(r, b.payload, start, size); err != nil {
			return err
		}
		end := raw + int64(hdr.rawLen)
		out := dst[raw:min(end, n)]
		if end > n { // the last block needed holds more than the prefix
			out = make([]byte, hdr.rawLen)
		}
		if err := c.decodeBlock(out, &b, w); err != nil {
			return err
		}
		copy(dst[raw:], out)
		raw, off = end, start+int64(hdr.encLen)
	}
	if raw < n {
		return corrupt(-1, off, "the blocks hold %d raw bytes, the header says %d", raw, h.rawLen)
	}
	return nil
}

// readStreamAt reads len(p) bytes of a stream of size bytes at off.
func readStreamAt(r io.ReaderAt, p []byte, off, size int64) error {
	if off+int64(len(p)) > size {
		return truncated(-1, size, "%d bytes wanted at byte %d", len(p), off)
	}
	got, err := r.ReadAt(p, off)
	switch {
	case got == len(p):
		return nil
	case err == nil || errors.Is(err, io.EOF):
		return truncated(-1, off+int64(got), "the reader ended before the %d bytes of the stream", size)
	}
	return fmt.Errorf("codec: read the stream at byte %d: %w", off, err)
}

// decodeBlock decodes block b into dst (its raw length) and checks its sum.
func (c *Codec) decodeBlock(dst []byte, b *block, w *worker) error {
	payloadOff := b.off + blockHeaderSize
	switch b.method {
	case methodRaw:
		copy(dst, b.payload)
	case methodZstd:
		if c.dec == nil {
			return c.initErr
		}
		out, err := c.dec.DecodeAll(b.payload, dst[:0:len(dst)])
		if err != nil {
			return &CorruptError{Block: b.index, Offset: payloadOff, Problem: "bad zstd payload", Err: err}
		}
		if len(out) != len(dst) {
			return corrupt(b.index, payloadOff, "zstd payload decodes to %d bytes, want %d", len(out), len(dst))
		}
		if len(out) > 0 && &out[0] != &dst[0] {
			copy(dst, out)
		}
	case methodPlanes:
		if err := c.decodePlanes(dst, b, w); err != nil {
			return err
		}
	}
	if checksum(dst) != b.sum {
		return corrupt(b.index, b.off+12, "checksum mismatch")
	}
	return nil
}

func (c *Codec) decodePlanes(dst []byte, b *block, w *worker) error {
	k := int(b.elemSize)
	n := len(dst) / k
	planes := dst[:n]
	if k > 1 {
		if cap(w.planes) < n*k {
			w.planes = make([]byte, max(n*k, c.blockSize))
		}
		planes = w.planes[:n*k]
	}
	p := b.payload
	pos := func() int64 { return b.off + blockHeaderSize + int64(len(b.payload)-len(p)) }
	for j := 0; j < k; j++ {
		plane := planes[j*n : (j+1)*n]
		for off := 0; off < n; off += ChunkSize {
			out := plane[off:min(off+ChunkSize, n)]
			if len(p) < chunkHeaderSize {
				return truncated(b.index, pos()+int64(len(p)), "plane %d: chunk header", j)
			}
			kind, l := p[0], int(p[1])|int(p[2])<<8|int(p[3])<<16
			if l > len(p)-chunkHeaderSize {
				return truncated(b.index, pos()+int64(len(p)), "plane %d: chunk of %d bytes from byte %d", j, l, pos()+chunkHeaderSize)
			}
			data := p[chunkHeaderSize : chunkHeaderSize+l]
			if err := w.decodeChunk(out, kind, data); err != nil {
				err.Block, err.Offset = b.index, pos()
				err.Problem = fmt.Sprintf("plane %d: %s", j, err.Problem)
				return err
			}
			p = p[chunkHeaderSize+l:]
		}
	}
	if len(p) != len(dst)-n*k {
		return corrupt(b.index, pos(), "planes payload ends with %d bytes, want %d", len(p), len(dst)-n*k)
	}
	copy(dst[n*k:], p)
	if k > 1 {
		merge(dst, planes, n, k, b.flags&flagRotate != 0)
	}
	return nil
}

// decodeChunk decodes one chunk into out (its exact length).
func (w *worker) decodeChunk(out []byte, kind byte, data []byte) *CorruptError {
	switch kind {
	case chunkRaw:
		if len(data) != len(out) {
			return &CorruptError{Problem: fmt.Sprintf("raw chunk of %d bytes, want %d", len(data), len(out))}
		}
		copy(out, data)
	case chunkRLE:
		if len(data) != 1 {
			return &CorruptError{Problem: fmt.Sprintf("RLE chunk of %d bytes, want 1", len(data))}
		}
		fill(out, data[0])
	case chunkHuff:
		s, rest, err := huff0.ReadTable(data, w.ds)
		if err != nil {
			return &CorruptError{Problem: "bad huff0 table", Err: err}
		}
		w.ds = s
		if len(rest) < 10 { // four streams and their jump table
			return &CorruptError{Problem: fmt.Sprintf("huff0 chunk of %d bytes after its table", len(rest))}
		}
		got, err := s.Decoder().Decompress4X(out[:0:len(out)], rest)
		if err != nil {
			return &CorruptError{Problem: "bad huff0 data", Err: err}
		}
		if len(got) != len(out) {
			return &CorruptError{Problem: fmt.Sprintf("huff0 chunk decodes to %d bytes, want %d", len(got), len(out))}
		}
		if len(got) > 0 && &got[0] != &out[0] {
			copy(out, got)
		}
	default:
		return &CorruptError{Problem: fmt.Sprintf("unknown chunk kind %d", kind)}
	}
	return nil
}

// fill sets every byte of b to v.
func fill(b []byte, v byte) {
	if len(b) == 0 {
		return
	}
	b[0] = v
	for n := 1; n < len(b); n *= 2 {
		copy(b[n:], b[:n])
	}
}
