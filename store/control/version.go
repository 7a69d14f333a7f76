package control

import (
	"cmp"
	"fmt"
	"runtime"
	"runtime/debug"
)

// Build says which weightfs a binary is: the version stamped at link time,
// the module and the commit it was built from.
type Build struct {
	Version string `json:"version"`
	Module  string `json:"module"`
	Commit  string `json:"commit"`
	Dirty   bool   `json:"dirty"`
	Go      string `json:"go"`
}

// BuildOf describes the running binary; stamp is the version `make build`
// stamped into it ("" outside make: "dev").
func BuildOf(stamp string) Build {
	b := Build{Version: cmp.Or(stamp, "dev"), Module: "(unknown)", Go: runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH}
	if bi, ok := debug.ReadBuildInfo(); ok {
		b.Module = bi.Main.Path + " " + bi.Main.Version
		for _, kv := range bi.Settings {
			switch kv.Key {
			case "vcs.revision":
				b.Commit = kv.Value + b.Commit
			case "vcs.time":
				b.Commit += " " + kv.Value
			case "vcs.modified":
				b.Dirty = kv.Value == "true"
			}
		}
	}
	return b
}

// String is what `weightfs --version` prints.
func (b Build) String() string {
	commit := cmp.Or(b.Commit, "unknown (built without VCS stamping)")
	if b.Dirty {
		commit += " (dirty)"
	}
	return fmt.Sprintf("weightfs %s\nmodule:  %s\ncommit:  %s\ngo:      %s\n", b.Version, b.Module, commit, b.Go)
}
