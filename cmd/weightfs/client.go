package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/pflag"

	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/control"
)

// clientFlags are the flags every client subcommand takes.
type clientFlags struct {
	fl     *pflag.FlagSet
	socket string
	json   bool
}

func newClientFlags(name, usage string, stderr io.Writer) *clientFlags {
	cf := &clientFlags{fl: pflag.NewFlagSet("weightfs "+name, pflag.ContinueOnError)}
	cf.fl.StringVar(&cf.socket, "socket", control.DefaultSocket(), "the daemon's control socket")
	cf.fl.BoolVar(&cf.json, "json", false, "print JSON for scripts")
	cf.fl.SetOutput(io.Discard)
	cf.fl.Usage = func() {
		fmt.Fprintf(stderr, "Usage: weightfs %s\n\nFlags:\n", usage)
		cf.fl.SetOutput(stderr)
		cf.fl.PrintDefaults()
	}
	return cf
}

// parse parses args and checks the number of positional arguments.
func (cf *clientFlags) parse(args []string, min, max int, usage string) error {
	if err := cf.fl.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			cf.fl.Usage()
			return err
		}
		return usagef("%s: %v", cf.fl.Name(), err)
	}
	if n := cf.fl.NArg(); n < min || n > max {
		return usagef("usage: weightfs %s", usage)
	}
	return nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func runLoad(args []string, stdout, stderr io.Writer) error {
	const usage = "load NAME PATH [--socket PATH] [--json]"
	cf := newClientFlags("load", usage, stderr)
	if err := cf.parse(args, 2, 2, usage); err != nil {
		return err
	}
	name, path := cf.fl.Arg(0), cf.fl.Arg(1)
	if err := store.ValidateModelName(name); err != nil {
		return usagef("load: %v", err)
	}
	ctx, stop := signalContext()
	defer stop()
	var bar *progressbar.ProgressBar
	var progress func(done, total int64)
	if !cf.json && isTerminal(stderr) {
		bar = progressbar.NewOptions64(-1, progressbar.OptionSetWriter(stderr),
			progressbar.OptionSetDescription("loading "+name), progressbar.OptionShowBytes(true),
			progressbar.OptionShowTotalBytes(true), progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish())
		progress = func(done, total int64) {
			bar.ChangeMax64(total)
			bar.Set64(done)
		}
	}
	v, err := control.NewClient(cf.socket).Load(ctx, name, path, progress)
	if bar != nil {
		bar.Finish()
	}
	if err != nil {
		return err
	}
	if cf.json {
		return printJSON(stdout, map[string]any{"version": v})
	}
	fmt.Fprintf(stdout, "loaded %s: %d files, %s in %.2fs (%s/s), on %s\n", v.Name, v.Files,
		store.HumanBytes(v.Bytes), v.LoadSeconds, store.HumanBytes(int64(v.LoadRate)), strings.Join(v.Residency, ", "))
	if v.GPUError != "" {
		fmt.Fprintf(stderr, "weightfs: %s is host-only: %s\n", v.Name, v.GPUError)
	}
	return nil
}

func runUnload(args []string, stdout, stderr io.Writer) error {
	const usage = "unload NAME [--version N] [--socket PATH] [--json]"
	cf := newClientFlags("unload", usage, stderr)
	version := cf.fl.Int("version", 0, "unload only this version (default: all)")
	if err := cf.parse(args, 1, 1, usage); err != nil {
		return err
	}
	if *version < 0 {
		return usagef("unload: --version %d: want a version number", *version)
	}
	gone, err := control.NewClient(cf.socket).Unload(context.Background(), cf.fl.Arg(0), *version)
	if err != nil {
		return err
	}
	if cf.json {
		return printJSON(stdout, control.Unloaded{Unloaded: gone})
	}
	for _, v := range gone {
		if v.State == store.StateDraining && (v.OpenFiles > 0 || len(v.HandleHolders) > 0) {
			fmt.Fprintf(stdout, "unloaded %s (draining: %d open files, %d processes hold GPU handles)\n",
				v.Name, v.OpenFiles, len(v.HandleHolders))
		} else {
			fmt.Fprintf(stdout, "unloaded %s\n", v.Name)
		}
	}
	return nil
}

func runList(args []string, stdout, stderr io.Writer) error {
	const usage = "ls [--socket PATH] [--json]"
	cf := newClientFlags("ls", usage, stderr)
	if err := cf.parse(args, 0, 0, usage); err != nil {
		return err
	}
	out, err := control.NewClient(cf.socket).List(context.Background())
	if err != nil {
		return err
	}
	if cf.json {
		return printJSON(stdout, out)
	}
	printVersions(stdout, out.Models, out.Draining)
	return nil
}

func printVersions(w io.Writer, models []control.Model, draining []control.Version) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VERSION\tSTATE\tFILES\tSIZE\tRESIDENT ON\tOPEN\tLOADED\tLOAD RATE\tSOURCE")
	row := func(v control.Version) {
		name := v.Name
		if v.Current {
			name += " *"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%d\t%s\t%s/s\t%s\n", name, v.State, v.Files, store.HumanBytes(v.Bytes),
			strings.Join(v.Residency, ","), v.OpenFiles, v.LoadedAt, store.HumanBytes(int64(v.LoadRate)), v.Source)
	}
	for _, m := range models {
		for _, v := range m.Versions {
			row(v)
		}
	}
	for _, v := range draining {
		row(v)
	}
	tw.Flush()
}

func runStatus(args []string, stdout, stderr io.Writer) error {
	const usage = "status [--socket PATH] [--json]"
	cf := newClientFlags("status", usage, stderr)
	if err := cf.parse(args, 0, 0, usage); err != nil {
		return err
	}
	st, err := control.NewClient(cf.socket).Status(context.Background())
	if err != nil {
		return err
	}
	if cf.json {
		return printJSON(stdout, st)
	}
	mode := st.ReadMode
	if st.CachedReason != "" {
		mode += " (" + st.CachedReason + ")"
	}
	budget := "no budget"
	if st.Host.Budget > 0 {
		budget = "budget " + store.HumanBytes(st.Host.Budget)
	}
	fmt.Fprintf(stdout, "mount:  %s, reads: %s\n", st.Mountpoint, mode)
	fmt.Fprintf(stdout, "host:   %s resident (%s), %s, host images in %s\n",
		store.HumanBytes(st.Host.Bytes), budget, store.HumanBytes(st.Host.Reserved)+" reserved by loads", st.Host.Arena)
	for _, g := range st.GPUs {
		fmt.Fprintf(stdout, "GPU %d:  %s %s: %s used by weightfs, %s free of %s\n", g.Index, g.Name, g.UUID,
			store.HumanBytes(g.Bytes), store.HumanBytes(int64(g.Free)), store.HumanBytes(int64(g.Total)))
	}
	fmt.Fprintf(stdout, "reads reaching the daemon: %d; GPU handle requests: %d (%d refused)\n\n",
		st.DaemonReads, st.HandleRequests, st.HandleDenials)
	printVersions(stdout, st.Models, st.Draining)
	for _, l := range st.Loads {
		fmt.Fprintf(stdout, "loading %s from %s: %s of %s\n", l.Name, l.Source, store.HumanBytes(l.Done), store.HumanBytes(l.Total))
	}
	return nil
}

// errVerifyFailed makes `weightfs verify` exit 1 after its report.
var errVerifyFailed = errors.New("verify: the source differs from what is served")

func runVerify(args []string, stdout, stderr io.Writer) error {
	const usage = "verify NAME [--version N] [--socket PATH] [--json]"
	cf := newClientFlags("verify", usage, stderr)
	version := cf.fl.Int("version", 0, "verify this version (default: the current one)")
	if err := cf.parse(args, 1, 1, usage); err != nil {
		return err
	}
	out, err := control.NewClient(cf.socket).Verify(context.Background(), cf.fl.Arg(0), *version)
	if err != nil {
		return err
	}
	if cf.json {
		if err := printJSON(stdout, out); err != nil {
			return err
		}
	} else {
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "FILE\tRESULT\tSHA-256\n")
		for _, f := range out.Files {
			result := "ok"
			if !f.OK {
				result = "DIFFERS: " + f.Problem
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Path, result, f.SHA256)
		}
		tw.Flush()
	}
	if !out.OK {
		return fmt.Errorf("verify %s: %w", out.Version, errVerifyFailed)
	}
	if !cf.json {
		fmt.Fprintf(stdout, "%s: every file equals its source\n", out.Version)
	}
	return nil
}

// signalContext ends on SIGINT/SIGTERM, so Ctrl-C on `weightfs load` stops the load.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
}
