package codec

import (
	"context"
	"fmt"

	"github.com/weightfs/weightfs/store/safetensors"
)

// EncodeSafetensors appends to dst one stream holding the whole safetensors
// file: its header as bytes, then its tensors' data in runs of one dtype
// (consecutive tensors of a dtype coalesced), each coded for its dtype.
// Decode restores the file byte for byte. A file that does not parse is
// refused. It encodes on workers goroutines (GOMAXPROCS when workers <= 0)
// and stops early, returning ctx's error, when ctx ends.
func (c *Codec) EncodeSafetensors(ctx context.Context, dst, file []byte, workers int) ([]byte, error) {
	h, err := safetensors.Parse(file)
	if err != nil {
		return dst, fmt.Errorf("codec: %w", err)
	}
	return c.encodeRuns(ctx, dst, runsOf(file, h), 0, workers)
}

// runsOf cuts a parsed safetensors file into the runs EncodeSafetensors codes:
// the header, then maximal ranges of tensors of one dtype, then any bytes
// after the last tensor.
func runsOf(file []byte, h *safetensors.Header) []run {
	base := h.DataOffset()
	runs := []run{{data: file[:base], lay: layoutOf("")}}
	pos := base
	for _, t := range h.Tensors { // in order of Begin; they tile the data section
		if t.Size() == 0 {
			continue
		}
		begin, end := base+t.Begin, base+t.End
		if begin > pos { // a gap (Parse refuses them): bytes
			runs = append(runs, run{data: file[pos:begin], lay: layoutOf("")})
		}
		lay := layoutOf(string(t.DType))
		if last := &runs[len(runs)-1]; len(runs) > 1 && last.lay == lay && begin == pos {
			last.data = file[pos-int64(len(last.data)) : end]
		} else {
			runs = append(runs, run{data: file[begin:end], lay: lay})
		}
		pos = end
	}
	if pos < int64(len(file)) {
		runs = append(runs, run{data: file[pos:], lay: layoutOf("")})
	}
	return runs
}
