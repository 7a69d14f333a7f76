//go:build amd64 || arm64

package cuda

import (
	"fmt"

	"github.com/ebitengine/purego"
)

// OpenLibrary is Open with an explicit library name or path: it dlopens the
// library and hands OpenWith a binder that resolves each symbol with purego.
func OpenLibrary(name string) (*Driver, error) {
	lib, err := purego.Dlopen(name, purego.RTLD_NOW|purego.RTLD_GLOBAL)
	if err != nil {
		return nil, fmt.Errorf("%w: dlopen %s: %v", ErrNoDriver, name, err)
	}
	d, err := openWith(func(sym string, fn any) error { return bind(lib, sym, fn) }, lib)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return d, nil
}

// bind resolves one symbol and registers fn for it; a missing symbol (or a
// purego panic) becomes an error.
func bind(lib uintptr, name string, fn any) (err error) {
	sym, err := purego.Dlsym(lib, name)
	if err != nil {
		return fmt.Errorf("missing symbol %s: %v", name, err)
	}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("binding %s: %v", name, r)
		}
	}()
	purego.RegisterFunc(fn, sym)
	return nil
}
