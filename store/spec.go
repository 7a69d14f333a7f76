package store

import (
	"errors"
	"fmt"
	"os"
	"strings"
)

// ParseModelSpec reads a "NAME=PATH" model spec (`weightfs mount --model`):
// a valid model name and an existing folder. Its errors are ErrInvalid and
// start with the spec or the name.
func ParseModelSpec(spec string) (name, path string, err error) {
	name, path, ok := strings.Cut(spec, "=")
	if !ok || path == "" {
		return "", "", errorf(ErrInvalid, "%q: want NAME=PATH", spec)
	}
	if err := ValidateModelName(name); err != nil {
		return "", "", errorf(ErrInvalid, "%q: %w", spec, err)
	}
	if err := CheckDir(path); err != nil {
		return "", "", errorf(ErrInvalid, "%s: %w", name, err)
	}
	return name, path, nil
}

// CheckDir says whether path is a folder, in one short line:
// "PATH: no such file or directory", "PATH is not a directory".
func CheckDir(path string) error {
	st, err := os.Stat(path)
	var pe *os.PathError
	switch {
	case errors.As(err, &pe):
		return fmt.Errorf("%s: %w", pe.Path, pe.Err)
	case err != nil:
		return err
	case !st.IsDir():
		return fmt.Errorf("%s is not a directory", path)
	}
	return nil
}

// ModelSpec is one model to load at start: a name and its folder.
type ModelSpec struct{ Name, Path string }

// ParseModelSpecs reads "NAME=PATH" specs as ParseModelSpec does and refuses
// a name given twice or one of taken.
func ParseModelSpecs(specs []string, taken ...string) ([]ModelSpec, error) {
	seen := map[string]bool{}
	for _, name := range taken {
		seen[name] = true
	}
	var out []ModelSpec
	for _, s := range specs {
		name, path, err := ParseModelSpec(s)
		if err != nil {
			return nil, err
		}
		if seen[name] {
			return nil, errorf(ErrInvalid, "%s: name given twice", name)
		}
		seen[name] = true
		out = append(out, ModelSpec{Name: name, Path: path})
	}
	return out, nil
}
