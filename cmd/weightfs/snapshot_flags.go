package main

import "github.com/weightfs/weightfs/store"

// modelNames are the names of the --model specs.
func modelNames(models []store.ModelSpec) []string {
	names := make([]string, len(models))
	for i, m := range models {
		names[i] = m.Name
	}
	return names
}
