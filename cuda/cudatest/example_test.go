package cudatest_test

import (
	"fmt"

	"github.com/weightfs/weightfs/cuda"
	"github.com/weightfs/weightfs/cuda/cudatest"
)

// A fake two-GPU driver: allocate a slab, upload through streams, read the
// bytes back, inject an out-of-memory failure and check nothing leaked.
func Example() {
	fake := cudatest.New(cudatest.Options{}) // two H200s
	driver, err := fake.Driver()
	if err != nil {
		fmt.Println(err)
		return
	}
	dev, _ := driver.Find("1")
	ctx, _ := driver.Context(dev)
	defer ctx.Release()

	slab, _ := ctx.NewSlab(4 << 20)
	stream, _ := ctx.NewStream()
	slab.Upload(256, []byte("weights"), []*cuda.Stream{stream}, 0)
	stream.Synchronize()
	b, _ := fake.Read(slab.Ptr+256, 7)
	fmt.Printf("%s on %s\n", b, dev.Name)

	h, _ := slab.IPCHandle()
	info, _ := cudatest.DecodeIPCHandle(h)
	fmt.Println("handle exports", info.Size, "bytes on device", info.Device)

	fake.Inject(cudatest.Fault{Call: "cuMemAlloc_v2", Code: cuda.CodeOutOfMemory, Times: 1})
	_, err = ctx.NewSlab(1 << 20)
	fmt.Println(cuda.IsOutOfMemory(err))

	slab.Free()
	stream.Destroy()
	fmt.Println("leaks:", len(fake.Leaks()))
	// Output:
	// weights on NVIDIA H200
	// handle exports 4194304 bytes on device 1
	// true
	// leaks: 0
}
