package codec_test

import (
	"bytes"
	"context"
	"fmt"

	"github.com/weightfs/weightfs/store/codec"
	"github.com/weightfs/weightfs/store/codec/codectest"
)

// A BF16 weight is encoded into a stream, then restored in parallel into a
// buffer of the size the stream announces.
func Example() {
	c := codec.New(codec.Options{}) // 1 MiB blocks, byte planes or zstd or raw per block
	defer c.Close()

	weights, err := codectest.Tensor(codectest.Linear, "BF16", 1024, 1024, 1) // 2 MiB, trained-like
	if err != nil {
		panic(err)
	}
	stream, err := c.Encode(nil, weights, "BF16")
	if err != nil {
		panic(err)
	}

	n, err := codec.RawSize(stream)
	if err != nil {
		panic(err)
	}
	restored := make([]byte, n)
	if err := c.DecodeParallel(context.Background(), restored, stream, 0); err != nil { // 0: GOMAXPROCS goroutines
		panic(err)
	}
	blocks, _ := codec.Info(stream)
	fmt.Println("identical:", bytes.Equal(restored, weights))
	fmt.Println("blocks:", len(blocks), blocks[0].Method, blocks[0].DType)
	fmt.Println("smaller by more than 1.4x:", float64(len(weights))/float64(len(stream)) > 1.4)
	// Output:
	// identical: true
	// blocks: 2 planes BF16
	// smaller by more than 1.4x: true
}
