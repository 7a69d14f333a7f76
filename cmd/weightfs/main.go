// Command weightfs keeps model weights resident in memory and mounts them as
// read-only Hugging Face model folders.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/weightfs/weightfs/store"
)

// version is stamped at link time by `make build` (-X main.version=…).
var version string

func main() {
	os.Exit(run(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}

// statusError ends a command with its own exit status and, unless error is
// nil, says why: 2 for a mistake on the command line (usagef); 130 (128 +
// SIGINT, the shell's own for Ctrl-C) for a load Ctrl-C stopped waiting for.
type statusError struct {
	error
	status int
}

func (e statusError) Unwrap() error { return e.error }

func usagef(format string, args ...any) error {
	return statusError{fmt.Errorf(format, args...), 2}
}

// run executes the command line args and returns the exit status: 0, 1 for
// a failure, 2 for a mistake on the command line, 130 for a load that
// Ctrl-C (or ctx) stopped waiting for. An error is one line on stderr, a
// JSON record with --log-format json.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	a := &app{stdout: stdout, stderr: stderr}
	root := a.commands()
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	status, se := 1, statusError{}
	switch {
	case err == nil:
		return 0
	case errors.As(err, &se) && se.error == nil:
		return se.status
	case errors.As(err, &se):
		status = se.status
	case !a.started:
		status = 2
	}
	msg, attrs := explain(err)
	if a.logFormat == "json" || jsonLogsAsked(args) {
		slog.New(slog.NewJSONHandler(stderr, nil)).Error(msg, append(attrs, "exit", status)...)
	} else {
		fmt.Fprintf(stderr, "weightfs: %s\n", strings.Join(strings.Fields(msg), " "))
	}
	return status
}

// jsonLogsAsked finds --log-format json in args whose parsing failed.
func jsonLogsAsked(args []string) bool {
	s := " " + strings.Join(args, " ") + " "
	return strings.Contains(s, " --log-format=json ") || strings.Contains(s, " --log-format json ")
}

// explain words an error for the person who ran the command, naming the
// daemon's flag that refused a load.
func explain(err error) (string, []any) {
	var be *store.BudgetError
	if !errors.As(err, &be) {
		return err.Error(), nil
	}
	flag := map[string]string{store.TierHost: "--host-memory", store.TierGPU: "--gpu-memory", store.TierSystem: "--memory-reserve"}[be.Tier]
	return be.Explain(flag), []any{"flag", flag, "tier", be.Tier, "gpu", be.GPU, "need", be.Need, "free", be.Free, "budget", be.Budget, "reserve", be.Reserve, "cgroup", be.Cgroup}
}
