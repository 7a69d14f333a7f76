package demo

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"testing"

	nlp "github.com/nlpodyssey/safetensors"
	"github.com/weightfs/weightfs/store/safetensors"
)

func TestWriteDeterministic(t *testing.T) {
	a, b := t.TempDir(), filepath.Join(t.TempDir(), "nested", "dir")
	if err := Write(a); err != nil {
		t.Fatal(err)
	}
	if err := Write(b); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(a)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if !slices.Equal(names, Files()) || !slices.IsSorted(Files()) {
		t.Errorf("wrote %q, Files says %q", names, Files())
	}
	for _, name := range Files() {
		x, err := os.ReadFile(filepath.Join(a, name))
		if err != nil {
			t.Fatal(err)
		}
		y, err := os.ReadFile(filepath.Join(b, name))
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(x, y) {
			t.Errorf("%s differs between two writes", name)
		}
		if filepath.Ext(name) == ".json" && !json.Valid(x) {
			t.Errorf("%s is not valid JSON", name)
		}
	}
}

func readJSON(t *testing.T, files map[string][]byte, name string, v any) {
	t.Helper()
	if err := json.Unmarshal(files[name], v); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

func TestShardsAndIndex(t *testing.T) {
	files, err := Build()
	if err != nil {
		t.Fatal(err)
	}
	var index struct {
		Metadata struct {
			TotalSize int64 `json:"total_size"`
		} `json:"metadata"`
		WeightMap map[string]string `json:"weight_map"`
	}
	readJSON(t, files, indexFileName, &index)
	var cfg struct {
		Architectures []string `json:"architectures"`
		ModelType     string   `json:"model_type"`
		Hidden        int64    `json:"hidden_size"`
		Intermediate  int64    `json:"intermediate_size"`
		Layers        int      `json:"num_hidden_layers"`
		Heads         int64    `json:"num_attention_heads"`
		KVHeads       int64    `json:"num_key_value_heads"`
		HeadDim       int64    `json:"head_dim"`
		Vocab         int64    `json:"vocab_size"`
		DType         string   `json:"dtype"`
		TorchDType    string   `json:"torch_dtype"`
		Tie           bool     `json:"tie_word_embeddings"`
		BOS           int      `json:"bos_token_id"`
		EOS           int      `json:"eos_token_id"`
	}
	readJSON(t, files, "config.json", &cfg)
	if cfg.ModelType != "llama" || !slices.Equal(cfg.Architectures, []string{"LlamaForCausalLM"}) ||
		cfg.DType != "bfloat16" || cfg.TorchDType != "bfloat16" || cfg.Tie || cfg.BOS != BOSTokenID || cfg.EOS != EOSTokenID {
		t.Errorf("config: %+v", cfg)
	}
	kv := cfg.KVHeads * cfg.Hidden / cfg.Heads
	wantShapes := map[string][]int64{
		"model.embed_tokens.weight": {cfg.Vocab, cfg.Hidden},
		"model.norm.weight":         {cfg.Hidden},
		"lm_head.weight":            {cfg.Vocab, cfg.Hidden},
	}
	for i := range cfg.Layers {
		p := fmt.Sprintf("model.layers.%d.", i)
		wantShapes[p+"self_attn.q_proj.weight"] = []int64{cfg.Hidden, cfg.Hidden}
		wantShapes[p+"self_attn.k_proj.weight"] = []int64{kv, cfg.Hidden}
		wantShapes[p+"self_attn.v_proj.weight"] = []int64{kv, cfg.Hidden}
		wantShapes[p+"self_attn.o_proj.weight"] = []int64{cfg.Hidden, cfg.Hidden}
		wantShapes[p+"mlp.gate_proj.weight"] = []int64{cfg.Intermediate, cfg.Hidden}
		wantShapes[p+"mlp.up_proj.weight"] = []int64{cfg.Intermediate, cfg.Hidden}
		wantShapes[p+"mlp.down_proj.weight"] = []int64{cfg.Hidden, cfg.Intermediate}
		wantShapes[p+"input_layernorm.weight"] = []int64{cfg.Hidden}
		wantShapes[p+"post_attention_layernorm.weight"] = []int64{cfg.Hidden}
	}
	if cfg.HeadDim*cfg.Heads != cfg.Hidden {
		t.Errorf("head_dim %d", cfg.HeadDim)
	}

	seen := map[string]string{}
	var total int64
	for s := range numShards {
		name := shardName(s)
		b := files[name]
		h, err := safetensors.Parse(b)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if h.Metadata["format"] != "pt" || h.DataOffset()%4096 != 0 {
			t.Errorf("%s: metadata %v, data offset %d", name, h.Metadata, h.DataOffset())
		}
		st, err := nlp.Deserialize(b)
		if err != nil {
			t.Fatalf("%s: nlpodyssey: %v", name, err)
		}
		if st.Len() != len(h.Tensors) {
			t.Errorf("%s: nlpodyssey sees %d tensors, we see %d", name, st.Len(), len(h.Tensors))
		}
		for _, x := range h.Tensors {
			seen[x.Name] = name
			total += x.Size()
			if x.DType != safetensors.BF16 {
				t.Errorf("%s: %s", x.Name, x.DType)
			}
			if want, ok := wantShapes[x.Name]; !ok || !slices.Equal(want, x.Shape) {
				t.Errorf("%s: shape %v, config says %v", x.Name, x.Shape, want)
			}
			v, ok := st.Tensor(x.Name)
			if !ok || v.DType() != nlp.BF16 || !bytes.Equal(v.Data(), b[h.DataOffset()+x.Begin:h.DataOffset()+x.End]) {
				t.Errorf("%s: nlpodyssey disagrees", x.Name)
			}
			if len(x.Shape) == 1 { // norms are ones
				for i := int64(0); i < x.Size(); i += 2 {
					if b[h.DataOffset()+x.Begin+i] != 0x80 || b[h.DataOffset()+x.Begin+i+1] != 0x3f {
						t.Fatalf("%s is not all ones", x.Name)
					}
				}
			}
		}
	}
	if len(seen) != len(wantShapes) {
		t.Errorf("shards hold %d tensors, want %d", len(seen), len(wantShapes))
	}
	if len(index.WeightMap) != len(seen) {
		t.Errorf("weight_map has %d entries, shards %d tensors", len(index.WeightMap), len(seen))
	}
	for name, shard := range seen {
		if index.WeightMap[name] != shard {
			t.Errorf("weight_map[%s] = %q, tensor is in %s", name, index.WeightMap[name], shard)
		}
	}
	if index.Metadata.TotalSize != total {
		t.Errorf("total_size %d, tensors hold %d bytes", index.Metadata.TotalSize, total)
	}
}

func TestWeightStatistics(t *testing.T) {
	tensors := generate(Parameters())
	var sum, sumSq float64
	var n int
	for _, x := range tensors {
		if len(x.Shape) != 2 {
			continue
		}
		for i := 0; i < len(x.Data); i += 2 {
			bits := uint32(x.Data[i]) | uint32(x.Data[i+1])<<8
			v := float64(math.Float32frombits(bits << 16))
			sum += v
			sumSq += v * v
			n++
		}
	}
	mean, std := sum/float64(n), math.Sqrt(sumSq/float64(n))
	if math.Abs(mean) > 1e-4 || math.Abs(std-0.02) > 2e-4 {
		t.Errorf("matrix weights: mean %g, std %g; want 0, 0.02", mean, std)
	}
}

func TestBFloat16(t *testing.T) {
	cases := []struct {
		in   float32
		want uint16
	}{
		{1, 0x3f80},
		{-2, 0xc000},
		{0, 0},
		{float32(math.Inf(1)), 0x7f80},
		{math.Float32frombits(0x3f808000), 0x3f80}, // tie, even stays
		{math.Float32frombits(0x3f818000), 0x3f82}, // tie, odd rounds up
		{math.Float32frombits(0x3f808001), 0x3f81}, // above half
		{math.Float32frombits(0x3f807fff), 0x3f80}, // below half
		{math.MaxFloat32, 0x7f80},                  // rounds to +Inf
	}
	for _, c := range cases {
		if got := BFloat16(c.in); got != c.want {
			t.Errorf("BFloat16(%g = %#x) = %#x, want %#x", c.in, math.Float32bits(c.in), got, c.want)
		}
	}
	if got := BFloat16(float32(math.NaN())); got&0x7f80 != 0x7f80 || got&0x7f == 0 {
		t.Errorf("NaN became %#x", got)
	}
}

func TestTokenizerJSON(t *testing.T) {
	files, err := Build()
	if err != nil {
		t.Fatal(err)
	}
	var tok struct {
		AddedTokens []struct {
			ID      int    `json:"id"`
			Content string `json:"content"`
			Special bool   `json:"special"`
		} `json:"added_tokens"`
		Model struct {
			Type   string         `json:"type"`
			Vocab  map[string]int `json:"vocab"`
			Merges []string       `json:"merges"`
		} `json:"model"`
	}
	readJSON(t, files, "tokenizer.json", &tok)
	if tok.Model.Type != "BPE" || len(tok.Model.Vocab) != 259 || tok.Model.Merges == nil {
		t.Fatalf("model %s with %d tokens", tok.Model.Type, len(tok.Model.Vocab))
	}
	ids := map[int]bool{}
	for _, id := range tok.Model.Vocab {
		if id < 0 || id >= VocabSize || ids[id] {
			t.Errorf("bad or repeated id %d", id)
		}
		ids[id] = true
	}
	for _, a := range tok.AddedTokens {
		if tok.Model.Vocab[a.Content] != a.ID || !a.Special {
			t.Errorf("added token %+v", a)
		}
	}
	if tok.Model.Vocab["Ġ"] != byteTokenOffset+' ' || tok.Model.Vocab["A"] != byteTokenOffset+'A' {
		t.Error("byte-level vocabulary is off")
	}
}

// TestWriteCacheReadableByAll: the demo on the mount is readable by every
// user only if its source is, folders on the way included.
func TestWriteCacheReadableByAll(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: root writes the demo under /var/cache (run as root, as CI does)")
	}
	dir, err := WriteCache()
	if err != nil {
		t.Fatal(err)
	}
	for d := dir; d != "/"; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm()&0o005 != 0o005 {
			t.Errorf("%s is %v: others cannot reach the demo", d, st.Mode().Perm())
		}
	}
	st, err := os.Stat(filepath.Join(dir, "config.json"))
	if err != nil || st.Mode().Perm()&0o004 == 0 {
		t.Errorf("config.json: %v, %v", st, err)
	}
}
