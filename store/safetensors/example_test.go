package safetensors_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"github.com/weightfs/weightfs/store/safetensors"
)

func ExampleWrite() {
	weight := make([]byte, 0, 6*4)
	for i := range 6 {
		weight = binary.LittleEndian.AppendUint32(weight, math.Float32bits(float32(i)))
	}
	tensors := []safetensors.Tensor{
		{Name: "linear.weight", DType: safetensors.F32, Shape: []int64{2, 3}, Data: weight},
		{Name: "linear.bias", DType: safetensors.BF16, Shape: []int64{2}, Data: []byte{0x80, 0x3f, 0x00, 0x40}},
		{Name: "step", DType: safetensors.I64, Shape: []int64{}, Data: make([]byte, 8)},
	}
	var file bytes.Buffer
	if err := safetensors.Write(&file, tensors, map[string]string{"format": "pt"}); err != nil {
		panic(err)
	}
	h, err := safetensors.Parse(file.Bytes())
	if err != nil {
		panic(err)
	}
	fmt.Println("file size:", file.Len(), "data offset:", h.DataOffset())
	for _, t := range h.Tensors {
		fmt.Printf("%s %s %v [%d,%d]\n", t.Name, t.DType, t.Shape, t.Begin, t.End)
	}
	// Output:
	// file size: 4132 data offset: 4096
	// step I64 [] [0,8]
	// linear.weight F32 [2 3] [8,32]
	// linear.bias BF16 [2] [32,36]
}

func ExampleParse() {
	header := `{"__metadata__":{"format":"pt"},"w":{"dtype":"U8","shape":[2,2],"data_offsets":[0,4]}}`
	file := binary.LittleEndian.AppendUint64(nil, uint64(len(header)))
	file = append(file, header...)
	file = append(file, 1, 2, 3, 4)

	h, err := safetensors.Parse(file)
	if err != nil {
		panic(err)
	}
	w, _ := h.Lookup("w")
	fmt.Println(h.Metadata["format"], w.DType, w.Shape, w.Elements(), file[h.DataOffset()+w.Begin:h.DataOffset()+w.End])

	// One byte too many after the last tensor.
	_, err = safetensors.Parse(append(file, 5))
	var fe *safetensors.FormatError
	fmt.Println(errors.As(err, &fe), err)
	// Output:
	// pt U8 [2 2] 4 [1 2 3 4]
	// true invalid safetensors: data section is 5 bytes but the tensors end at 4: 1 trailing bytes
}
