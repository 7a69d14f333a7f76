package store_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/safetensors"
)

// A model folder becomes numbered, immutable versions held in memory.
func ExampleStore_Load() {
	dir, _ := os.MkdirTemp("", "model-")
	defer os.RemoveAll(dir)
	var b bytes.Buffer
	safetensors.Write(&b, []safetensors.Tensor{
		{Name: "w", DType: safetensors.BF16, Shape: []int64{3}, Data: make([]byte, 6)},
	}, nil)
	os.WriteFile(filepath.Join(dir, "model.safetensors"), b.Bytes(), 0o644)
	os.WriteFile(filepath.Join(dir, "config.json"), []byte("{}"), 0o644)

	st := store.New(store.OpenMemfdArena(), store.Options{})
	defer st.Close()
	v, err := st.Load(context.Background(), "tiny", dir, store.LoadOptions{})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println(v.Name(), len(v.Files()), "files")
	for _, f := range v.Files() {
		fmt.Println(f.Path(), f.Kind(), f.Size())
	}
	offsets, size := store.SlabLayout(v.Files()[1].Header())
	fmt.Println("slab offsets", offsets, "size", size)
	// Output:
	// tiny@1 2 files
	// config.json plain 2
	// model.safetensors weights 4102
	// slab offsets [0] size 256
}
