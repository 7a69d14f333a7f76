package demo_test

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/weightfs/weightfs/store/demo"
)

func ExampleWrite() {
	dir, err := os.MkdirTemp("", "weightfs-demo")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	if err := demo.Write(filepath.Join(dir, "demo-llama")); err != nil {
		panic(err)
	}
	for _, name := range demo.Files() {
		fmt.Println(name)
	}
	// Output:
	// config.json
	// generation_config.json
	// model-00001-of-00002.safetensors
	// model-00002-of-00002.safetensors
	// model.safetensors.index.json
	// special_tokens_map.json
	// tokenizer.json
	// tokenizer_config.json
}
