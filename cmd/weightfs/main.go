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
  weightfs mount MOUNTPOINT [--model NAME=PATH]... [--gpu ID]... [--demo] [flags]
  weightfs load NAME PATH          load a model folder as the next version of NAME
  weightfs unload NAME [--version N]
  weightfs ls                      models and versions
  weightfs status                  memory, GPUs, versions, loads in progress
  weightfs verify NAME [--version N]  compare what is served with its source
  weightfs help

Client commands take --socket PATH (default: $WEIGHTFS_SOCKET, /run/weightfs/weightfs.sock
for root) and --json. Run "weightfs COMMAND --help" for a command's flags.
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
	case "load":
		err = runLoad(args[1:], stdout, stderr)
	case "unload":
		err = runUnload(args[1:], stdout, stderr)
	case "ls", "list":
		err = runList(args[1:], stdout, stderr)
	case "status":
		err = runStatus(args[1:], stdout, stderr)
	case "verify":
		err = runVerify(args[1:], stdout, stderr)
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
