// Command weightfs keeps model weights resident in memory and mounts them as
// read-only Hugging Face model folders.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/pflag"
)

const usage = `weightfs keeps LLM weights resident in memory and mounts them read-only.

Usage:
  weightfs mount MOUNTPOINT [--model NAME=PATH]... [--demo] [flags]
  weightfs help

Run "weightfs mount --help" for the mount flags.
`

// usageError is a mistake on the command line: one line, exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "mount":
		err = runMount(args[1:], stdout, stderr)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		err = usagef("unknown command %q (try: weightfs help)", args[0])
	}
	var ue *usageError
	switch {
	case err == nil:
		return 0
	case errors.Is(err, pflag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "weightfs: %v\n", err)
		return 2
	default:
		fmt.Fprintf(stderr, "weightfs: %v\n", err)
		return 1
	}
}
