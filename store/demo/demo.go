// Package demo generates a small built-in LLaMA-architecture model: a
// Hugging Face model folder (config, byte-level BPE tokenizer, two BF16
// safetensors shards and their index) that transformers loads with
// AutoModelForCausalLM / AutoTokenizer. The weights are random but
// deterministic: every call produces the same bytes.
package demo

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"

	"github.com/weightfs/weightfs/store/safetensors"
)

// The model's dimensions.
const (
	HiddenSize        = 256
	IntermediateSize  = 688
	NumLayers         = 4
	NumHeads          = 8
	NumKVHeads        = 4
	HeadDim           = HiddenSize / NumHeads
	VocabSize         = 384
	MaxPositions      = 2048
	RMSNormEps        = 1e-5
	RopeTheta         = 10000.0
	UnkTokenID        = 0
	BOSTokenID        = 1
	EOSTokenID        = 2
	byteTokenOffset   = 3 // token id of byte b is byteTokenOffset+b
	numShards         = 2
	initStd           = 0.02
	seedHi, seedLo    = 0x7765696768746673, 0x64656d6f2d763031 // "weightfs", "demo-v01"
	indexFileName     = "model.safetensors.index.json"
	shardNameTemplate = "model-%05d-of-%05d.safetensors"
)

// Special tokens.
const (
	UnkToken = "<unk>"
	BOSToken = "<s>"
	EOSToken = "</s>"
)

// Files lists the file names Write creates, sorted.
func Files() []string {
	names := []string{
		"config.json",
		"generation_config.json",
		indexFileName,
		"special_tokens_map.json",
		"tokenizer.json",
		"tokenizer_config.json",
	}
	for i := range numShards {
		names = append(names, shardName(i))
	}
	slices.Sort(names)
	return names
}

func shardName(i int) string { return fmt.Sprintf(shardNameTemplate, i+1, numShards) }

// Write writes the demo model folder into dir, creating dir if missing.
// Existing files of the same names are replaced.
func Write(dir string) error {
	files, err := Build()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, name := range Files() {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, files[name], 0o644); err != nil {
			return err
		}
		if err := os.Chmod(p, 0o644); err != nil { // whatever the umask: a model anyone may read
			return err
		}
	}
	return nil
}

// Build returns the contents of every file of the demo model, by name.
func Build() (map[string][]byte, error) {
	files := make(map[string][]byte)
	var err error
	put := func(name string, v any) {
		if err != nil {
			return
		}
		files[name], err = marshal(v)
	}
	put("config.json", config())
	put("generation_config.json", generationConfig())
	put("tokenizer.json", tokenizer())
	put("tokenizer_config.json", tokenizerConfig())
	put("special_tokens_map.json", specialTokensMap())
	if err != nil {
		return nil, err
	}

	params := Parameters()
	tensors := generate(params)
	weightMap := make(map[string]string, len(params))
	var total int64
	for s := range numShards {
		var shard []safetensors.Tensor
		for i, p := range params {
			if p.Shard == s {
				shard = append(shard, tensors[i])
				weightMap[p.Name] = shardName(s)
				total += int64(len(tensors[i].Data))
			}
		}
		var buf bytes.Buffer
		if err := safetensors.Write(&buf, shard, map[string]string{"format": "pt"}); err != nil {
			return nil, fmt.Errorf("demo: writing %s: %w", shardName(s), err)
		}
		files[shardName(s)] = buf.Bytes()
	}
	put(indexFileName, map[string]any{
		"metadata":   map[string]any{"total_size": total},
		"weight_map": weightMap,
	})
	if err != nil {
		return nil, err
	}
	return files, nil
}

// Parameter is one weight of the demo model.
type Parameter struct {
	Name  string
	Shape []int64
	Norm  bool // an RMSNorm weight: all ones
	Shard int  // 0-based shard index
}

// Parameters lists the model's weights in generation order, with the
// LLaMA parameter names and shapes ([out, in] for linear layers).
func Parameters() []Parameter {
	const h, m, kv, v = HiddenSize, IntermediateSize, NumKVHeads * HeadDim, VocabSize
	ps := []Parameter{{Name: "model.embed_tokens.weight", Shape: []int64{v, h}}}
	for i := range NumLayers {
		shard := i * numShards / NumLayers
		pre := fmt.Sprintf("model.layers.%d.", i)
		ps = append(ps,
			Parameter{Name: pre + "input_layernorm.weight", Shape: []int64{h}, Norm: true, Shard: shard},
			Parameter{Name: pre + "self_attn.q_proj.weight", Shape: []int64{NumHeads * HeadDim, h}, Shard: shard},
			Parameter{Name: pre + "self_attn.k_proj.weight", Shape: []int64{kv, h}, Shard: shard},
			Parameter{Name: pre + "self_attn.v_proj.weight", Shape: []int64{kv, h}, Shard: shard},
			Parameter{Name: pre + "self_attn.o_proj.weight", Shape: []int64{h, NumHeads * HeadDim}, Shard: shard},
			Parameter{Name: pre + "post_attention_layernorm.weight", Shape: []int64{h}, Norm: true, Shard: shard},
			Parameter{Name: pre + "mlp.gate_proj.weight", Shape: []int64{m, h}, Shard: shard},
			Parameter{Name: pre + "mlp.up_proj.weight", Shape: []int64{m, h}, Shard: shard},
			Parameter{Name: pre + "mlp.down_proj.weight", Shape: []int64{h, m}, Shard: shard},
		)
	}
	ps = append(ps,
		Parameter{Name: "model.norm.weight", Shape: []int64{h}, Norm: true, Shard: numShards - 1},
		Parameter{Name: "lm_head.weight", Shape: []int64{v, h}, Shard: numShards - 1},
	)
	return ps
}

// generate makes the BF16 data of every parameter, in order, from one
// fixed-seed PCG stream: normal(0, 0.02) for matrices, 1.0 for norms.
func generate(params []Parameter) []safetensors.Tensor {
	r := rand.New(rand.NewPCG(seedHi, seedLo))
	out := make([]safetensors.Tensor, len(params))
	for i, p := range params {
		n := int64(1)
		for _, d := range p.Shape {
			n *= d
		}
		data := make([]byte, 2*n)
		for j := range n {
			v := float32(1)
			if !p.Norm {
				v = float32(r.NormFloat64() * initStd)
			}
			binary.LittleEndian.PutUint16(data[2*j:], BFloat16(v))
		}
		out[i] = safetensors.Tensor{Name: p.Name, DType: safetensors.BF16, Shape: p.Shape, Data: data}
	}
	return out
}

// BFloat16 converts f to bfloat16 bits, rounding to nearest even. NaN stays NaN.
func BFloat16(f float32) uint16 {
	b := math.Float32bits(f)
	if math.IsNaN(float64(f)) {
		return uint16(b>>16) | 0x40 // quiet NaN, sign kept
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

func marshal(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func config() any {
	return map[string]any{
		"architectures":           []string{"LlamaForCausalLM"},
		"model_type":              "llama",
		"hidden_size":             HiddenSize,
		"intermediate_size":       IntermediateSize,
		"num_hidden_layers":       NumLayers,
		"num_attention_heads":     NumHeads,
		"num_key_value_heads":     NumKVHeads,
		"head_dim":                HeadDim,
		"hidden_act":              "silu",
		"vocab_size":              VocabSize,
		"max_position_embeddings": MaxPositions,
		"rms_norm_eps":            RMSNormEps,
		"rope_theta":              RopeTheta,
		"rope_scaling":            nil,
		"attention_bias":          false,
		"attention_dropout":       0.0,
		"mlp_bias":                false,
		"initializer_range":       initStd,
		"tie_word_embeddings":     false,
		"use_cache":               true,
		"bos_token_id":            BOSTokenID,
		"eos_token_id":            EOSTokenID,
		"dtype":                   "bfloat16",
		"torch_dtype":             "bfloat16",
	}
}

func generationConfig() any {
	return map[string]any{
		"bos_token_id": BOSTokenID,
		"eos_token_id": EOSTokenID,
	}
}

func tokenizerConfig() any {
	return map[string]any{
		"tokenizer_class":              "PreTrainedTokenizerFast",
		"bos_token":                    BOSToken,
		"eos_token":                    EOSToken,
		"unk_token":                    UnkToken,
		"model_max_length":             MaxPositions,
		"clean_up_tokenization_spaces": false,
	}
}

func specialTokensMap() any {
	return map[string]any{
		"bos_token": BOSToken,
		"eos_token": EOSToken,
		"unk_token": UnkToken,
	}
}

// byteToUnicode is GPT-2's map from bytes to printable characters, which the
// ByteLevel pre-tokenizer applies before the BPE model sees the text.
func byteToUnicode() [256]rune {
	var m [256]rune
	n := 0
	for b := range 256 {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			m[b] = rune(b)
		} else {
			m[b] = rune(256 + n)
			n++
		}
	}
	return m
}

// tokenizer returns a `tokenizers` JSON: byte-level BPE whose vocabulary is
// the three special tokens and the 256 byte characters, without merges, so
// every byte of the input is one token.
func tokenizer() any {
	specials := []string{UnkToken, BOSToken, EOSToken}
	vocab := make(map[string]int, len(specials)+256)
	var added []any
	for id, s := range specials {
		vocab[s] = id
		added = append(added, map[string]any{
			"id": id, "content": s, "single_word": false, "lstrip": false,
			"rstrip": false, "normalized": false, "special": true,
		})
	}
	for b, r := range byteToUnicode() {
		vocab[string(r)] = byteTokenOffset + b
	}
	byteLevel := map[string]any{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
	bos := map[string]any{"SpecialToken": map[string]any{"id": BOSToken, "type_id": 0}}
	seq := func(id string, typeID int) any {
		return map[string]any{"Sequence": map[string]any{"id": id, "type_id": typeID}}
	}
	return map[string]any{
		"version":       "1.0",
		"truncation":    nil,
		"padding":       nil,
		"added_tokens":  added,
		"normalizer":    nil,
		"pre_tokenizer": byteLevel,
		"post_processor": map[string]any{
			"type":   "TemplateProcessing",
			"single": []any{bos, seq("A", 0)},
			"pair":   []any{bos, seq("A", 0), map[string]any{"SpecialToken": map[string]any{"id": BOSToken, "type_id": 1}}, seq("B", 1)},
			"special_tokens": map[string]any{
				BOSToken: map[string]any{"id": BOSToken, "ids": []int{BOSTokenID}, "tokens": []string{BOSToken}},
			},
		},
		"decoder": byteLevel,
		"model": map[string]any{
			"type":                      "BPE",
			"dropout":                   nil,
			"unk_token":                 nil,
			"continuing_subword_prefix": nil,
			"end_of_word_suffix":        nil,
			"fuse_unk":                  false,
			"byte_fallback":             false,
			"ignore_merges":             false,
			"vocab":                     vocab,
			"merges":                    []string{},
		},
	}
}
