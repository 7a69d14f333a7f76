package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/control"
	"github.com/weightfs/weightfs/store/report"
)

// app is one run of the command line: its streams and global flags.
type app struct {
	stdout, stderr io.Writer
	socket         string
	json           bool
	logFormat      string
	started        bool // a command's own code ran: errors before it are usage errors
}

func (a *app) commands() *cobra.Command {
	root := &cobra.Command{
		Use:   "weightfs",
		Short: "Keep LLM weights resident in memory and mount them read-only",
		Long: `weightfs keeps LLM weights resident in host memory (and GPU memory with --gpu)
and mounts them with FUSE as read-only Hugging Face model folders.
"weightfs mount" runs the daemon; the other commands talk to it over its control socket.`,
		Version:       control.BuildOf(version).String(),
		SilenceErrors: true,
		SilenceUsage:  true,
		PersistentPreRunE: func(*cobra.Command, []string) error {
			if a.logFormat != "text" && a.logFormat != "json" {
				return usagef("--log-format %q: want text or json", a.logFormat)
			}
			a.started = true
			return nil
		},
	}
	root.SuggestionsMinimumDistance = 2
	// The root runs only to refuse what is no command: show no "weightfs [flags]".
	root.SetUsageTemplate(strings.Replace(root.UsageTemplate(), "{{if .Runnable}}", "{{if and .Runnable .HasParent}}", 1))
	root.SetOut(a.stdout)
	root.SetErr(a.stderr)
	root.SetVersionTemplate("{{.Version}}")
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		if c.HasParent() {
			return usagef("%s: %v (see weightfs %[1]s --help)", strings.TrimPrefix(c.CommandPath(), "weightfs "), err)
		}
		return usagef("%v (see weightfs --help)", err)
	})
	pf := root.PersistentFlags()
	pf.StringVar(&a.socket, "socket", control.DefaultSocket(), "the daemon's control socket ($WEIGHTFS_SOCKET)")
	pf.BoolVar(&a.json, "json", false, "print JSON for scripts")
	pf.StringVar(&a.logFormat, "log-format", "text", "log and error format: text or json")
	root.SetHelpCommand(&cobra.Command{
		Use: "help [COMMAND]", Short: "Help about any command", ValidArgsFunction: cobra.NoFileCompletions,
		RunE: func(_ *cobra.Command, args []string) error {
			if c, _, _ := root.Find(args); c != root || len(args) == 0 {
				return c.Help()
			}
			return unknownCommand(root, args)
		},
	})
	root.AddCommand(a.mountCommand(), a.loadCommand(), a.unloadCommand(), a.rollbackCommand(), a.cancelCommand(),
		a.listCommand(), a.statusCommand(), a.verifyCommand(), a.watchCommand())
	root.InitDefaultCompletionCmd()
	completion, _, _ := root.Find([]string{"completion"})
	for _, c := range []*cobra.Command{root, completion} {
		c.Args, c.ValidArgsFunction = unknownCommand, cobra.NoFileCompletions
		c.RunE = func(c *cobra.Command, _ []string) error { // no subcommand: help on stderr
			c.SetOut(a.stderr)
			c.HelpFunc()(c, nil)
			return statusError{nil, 2}
		}
	}
	return root
}

// unknownCommand refuses a first argument that names no subcommand of c,
// with the nearest names.
func unknownCommand(c *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	msg := fmt.Sprintf("unknown command %q", args[0])
	if c.HasParent() {
		msg = c.Name() + ": " + msg
	}
	if s := c.SuggestionsFor(args[0]); len(s) > 0 {
		msg += fmt.Sprintf(" (did you mean %q?)", strings.Join(s, `" or "`))
	}
	return usagef("%s; run %s --help", msg, c.CommandPath())
}

// nargs checks the number of positional arguments.
func nargs(lo, hi int) cobra.PositionalArgs {
	return func(c *cobra.Command, args []string) error {
		if len(args) < lo || len(args) > hi {
			return usagef("usage: %s", c.UseLine())
		}
		return nil
	}
}

// completeModels completes a model name from the running daemon.
func (a *app) completeModels(c *cobra.Command, args []string, _ string) ([]string, cobra.ShellCompDirective) {
	var names []string
	if l, err := a.client().List(c.Context()); err == nil && len(args) == 0 {
		for _, m := range l.Models {
			names = append(names, m.Name)
		}
	}
	return names, cobra.ShellCompDirectiveNoFileComp
}

func (a *app) client() *control.Client { return control.NewClient(a.socket) }

// logger is the log of the daemon and the commands: JSON records on stderr
// with --log-format json, slog's text format otherwise.
func (a *app) logger() *slog.Logger {
	if a.logFormat == "json" {
		return slog.New(slog.NewJSONHandler(a.stderr, nil))
	}
	return slog.New(slog.NewTextHandler(a.stderr, nil))
}

// show writes v as JSON with --json, else as text for people; it returns
// err, the error of the request that got v, if there is one.
func show[T any](a *app, v T, err error, text func(io.Writer, T)) error {
	if err != nil {
		return err
	} else if !a.json {
		text(a.stdout, v)
		return nil
	}
	enc := json.NewEncoder(a.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func (a *app) loadCommand() *cobra.Command {
	return &cobra.Command{
		Use: "load NAME PATH", Short: "Load a model folder as the next version of NAME",
		Args: nargs(2, 2), ValidArgsFunction: cobra.FixedCompletions(nil, cobra.ShellCompDirectiveFilterDirs),
		RunE: func(c *cobra.Command, args []string) error {
			if err := store.ValidateModelName(args[0]); err != nil {
				return usagef("load: %v", err)
			}
			ctx, stop := signal.NotifyContext(c.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			progress, done := report.Progress(a.stderr, "loading "+args[0])
			if a.json || a.logFormat != "text" {
				progress, done = nil, func() {}
			}
			v, err := a.client().Load(ctx, args[0], args[1], progress)
			if done(); ctx.Err() != nil {
				return statusError{errors.New(report.Interrupted(args[0])), 130}
			} else if err != nil {
				return err
			} else if v.GPUError != "" {
				a.logger().Warn(v.Name+" is host-only", "err", v.GPUError)
			}
			return show(a, map[string]any{"version": v}, nil, func(w io.Writer, _ map[string]any) { report.Loaded(w, v) })
		},
	}
}

func (a *app) unloadCommand() *cobra.Command {
	var number int
	c := &cobra.Command{Use: "unload NAME", Short: "Take a model (or one version) off the mount; freed when unused",
		Args: nargs(1, 1), ValidArgsFunction: a.completeModels, RunE: func(c *cobra.Command, args []string) error {
			if number < 0 {
				return usagef("unload: --version %d: want a version number", number)
			}
			gone, err := a.client().Unload(c.Context(), args[0], number)
			return show(a, control.Unloaded{Unloaded: gone}, err, func(w io.Writer, u control.Unloaded) { report.Unloaded(w, u.Unloaded) })
		}}
	c.Flags().IntVar(&number, "version", 0, "unload only this version (default: all)")
	return c
}

func (a *app) rollbackCommand() *cobra.Command {
	var to int
	c := &cobra.Command{Use: "rollback NAME [--to N]", Short: "Point NAME at a kept version (default: the one before the current)",
		Args: nargs(1, 1), ValidArgsFunction: a.completeModels, RunE: func(c *cobra.Command, args []string) error {
			if to < 0 {
				return usagef("rollback: --to %d: want a version number", to)
			}
			v, err := a.client().Rollback(c.Context(), args[0], to)
			return show(a, map[string]any{"version": v}, err, func(w io.Writer, _ map[string]any) { report.RolledBack(w, v) })
		}}
	c.Flags().IntVar(&to, "to", 0, "make this version current (default: the newest one older than the current one)")
	return c
}

func (a *app) cancelCommand() *cobra.Command {
	return &cobra.Command{Use: "cancel NAME", Short: "Stop the loads and the push of NAME in progress in the daemon",
		Args: nargs(1, 1), ValidArgsFunction: a.completeModels, RunE: func(c *cobra.Command, args []string) error {
			out, err := a.client().Cancel(c.Context(), args[0])
			return show(a, out, err, report.Cancelled)
		}}
}

func (a *app) listCommand() *cobra.Command {
	return &cobra.Command{Use: "ls", Aliases: []string{"list"}, Short: "List models and versions", Args: nargs(0, 0),
		RunE: func(c *cobra.Command, _ []string) error {
			l, err := a.client().List(c.Context())
			return show(a, l, err, func(w io.Writer, l *control.List) {
				report.Versions(w, l.Models, l.Draining)
				report.Pushes(w, l.Pushes)
			})
		}}
}

func (a *app) statusCommand() *cobra.Command {
	return &cobra.Command{Use: "status", Short: "Show memory, GPUs, versions and loads in progress", Args: nargs(0, 0),
		RunE: func(c *cobra.Command, _ []string) error {
			st, err := a.client().Status(c.Context())
			return show(a, st, err, report.Status)
		}}
}

func (a *app) verifyCommand() *cobra.Command {
	var number int
	c := &cobra.Command{Use: "verify NAME", Short: "Re-read a version's source and compare it with what is served",
		Args: nargs(1, 1), ValidArgsFunction: a.completeModels, RunE: func(c *cobra.Command, args []string) error {
			out, err := a.client().Verify(c.Context(), args[0], number)
			if err := show(a, out, err, report.Verified); err != nil || out.OK {
				return err
			}
			return fmt.Errorf("verify %s: the source differs from what is served", out.Version)
		}}
	c.Flags().IntVar(&number, "version", 0, "verify this version (default: the current one)")
	return c
}

func (a *app) watchCommand() *cobra.Command {
	return &cobra.Command{Use: "watch NAME", Short: "Print a JSON line for the current version of NAME and each new one, until Ctrl-C",
		Args: nargs(1, 1), ValidArgsFunction: a.completeModels, RunE: func(c *cobra.Command, args []string) error {
			return a.client().Watch(c.Context(), args[0], a.stdout)
		}}
}
