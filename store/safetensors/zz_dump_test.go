package safetensors

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestZZDump(t *testing.T) {
	dir := os.Getenv("DUMP")
	if dir == "" {
		t.Skip()
	}
	os.MkdirAll(dir, 0o755)
	type entry struct {
		File, Name, Err string
		OK              bool
	}
	var man []entry
	add := func(name string, b []byte) {
		f := fmt.Sprintf("%04d.st", len(man))
		os.WriteFile(filepath.Join(dir, f), b, 0o644)
		_, err := Parse(b)
		e := entry{File: f, Name: name, OK: err == nil}
		if err != nil {
			e.Err = err.Error()
		}
		man = append(man, e)
	}
	for _, c := range acceptCases() {
		add("accept/"+c.name, c.file)
	}
	for _, c := range rejectCases() {
		add("reject/"+c.name, c.file)
	}
	for _, dt := range DTypes {
		add("dtype/"+string(dt), file(`{"x":{"dtype":"`+string(dt)+`","shape":[8],"data_offsets":[0,`+strconv.Itoa(dt.Bits())+`]}}`, dt.Bits()))
	}
	probes := map[string][]byte{
		"metadata null":        file(`{"__metadata__":null}`, 0),
		"dup tensor":           file(`{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1),
		"dup metadata":         file(`{"__metadata__":{"a":"b"},"__metadata__":{"a":"b"}}`, 0),
		"dup metadata key":     file(`{"__metadata__":{"a":"b","a":"c"}}`, 0),
		"dup unknown field":    file(`{"w":{"x":1,"x":2,"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1),
		"surrogate in unknown": file(`{"w":{"x":"\ud800","dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1),
		"surrogate in md":      file(`{"__metadata__":{"a":"\ud800"}}`, 0),
		"bom":                  file("\ufeff{}", 0),
		"empty name":           file(`{"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1),
		"depth 127 md":         file(`{"w":{"x":`+strings.Repeat("[", 125)+strings.Repeat("]", 125)+`,"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1),
		"depth 128":            file(`{"w":{"x":`+strings.Repeat("[", 126)+strings.Repeat("]", 126)+`,"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1),
		"depth 128 obj":        file(`{"w":{"x":`+strings.Repeat(`{"a":`, 126)+"1"+strings.Repeat("}", 126)+`,"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1),
		"offsets float":        file(`{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1.0]}}`, 1),
		"tab padding":          file("{}\t\t", 0),
		"nul inside string":    file(`{"a\u0000":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}`, 1),
		"unknown type offsets": file(`{"w":{"dtype":"U8","shape":[1],"data_offsets":"0,1"}}`, 1),
		"huge offsets":         file(`{"w":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551615,18446744073709551615]}}`, 0),
	}
	for name, b := range probes {
		add("probe/"+name, b)
	}
	// Fuzz corpus from the cache.
	cache := filepath.Join(os.Getenv("FUZZCACHE"))
	for _, target := range []string{"FuzzParse"} {
		ents, _ := os.ReadDir(filepath.Join(cache, target))
		for _, e := range ents {
			raw, _ := os.ReadFile(filepath.Join(cache, target, e.Name()))
			lines := strings.SplitN(string(raw), "\n", 2)
			s := strings.TrimSpace(lines[1])
			s = strings.TrimSuffix(strings.TrimPrefix(s, "[]byte("), ")")
			u, err := strconv.Unquote(s)
			if err == nil {
				add("fuzz/"+e.Name(), []byte(u))
			}
		}
	}
	b, _ := json.MarshalIndent(man, "", " ")
	os.WriteFile(filepath.Join(dir, "manifest.json"), b, 0o644)
}
