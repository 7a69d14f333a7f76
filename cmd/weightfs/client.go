package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/pflag"

	"github.com/weightfs/weightfs/store"
)

// client talks to a running daemon over its control socket.
type client struct {
	socket string
	http   *http.Client
}

func newClient(socket string) *client {
	return &client{socket: socket, http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}}
}

// explain turns a failed connection into one line a person can act on.
func (c *client) explain(err error) error {
	switch {
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("permission denied on the control socket %s (it is 0600: run as the daemon's user or root)", c.socket)
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("no weightfs daemon at %s: is `weightfs mount` running? (--socket or WEIGHTFS_SOCKET name another socket)", c.socket)
	}
	return fmt.Errorf("control socket %s: %w", c.socket, err)
}

func (c *client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://weightfs"+path, rd)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, c.explain(err)
	}
	return resp, nil
}

// call sends a request and decodes a JSON answer into out; a non-2xx answer
// becomes its error message.
func (c *client) call(ctx context.Context, method, path string, body, out any) error {
	resp, err := c.do(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		var e ErrorJSON
		if json.NewDecoder(resp.Body).Decode(&e) == nil && e.Error != "" {
			return errors.New(e.Error)
		}
		return fmt.Errorf("daemon answered %s", resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// clientFlags are the flags every client subcommand takes.
type clientFlags struct {
	fl     *pflag.FlagSet
	socket string
	json   bool
}

func newClientFlags(name, usage string, stderr io.Writer) *clientFlags {
	cf := &clientFlags{fl: pflag.NewFlagSet("weightfs "+name, pflag.ContinueOnError)}
	cf.fl.StringVar(&cf.socket, "socket", defaultSocket(), "the daemon's control socket")
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
	abs, err := filepath.Abs(path) // the daemon's working directory is not ours
	if err != nil {
		return usagef("load: %v", err)
	}
	ctx, stop := signalContext()
	defer stop()
	resp, err := newClient(cf.socket).do(ctx, http.MethodPost, "/v1/load", LoadRequest{Name: name, Path: abs})
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var bar *progressbar.ProgressBar
	if !cf.json && isTerminal(stderr) {
		bar = progressbar.NewOptions64(-1, progressbar.OptionSetWriter(stderr),
			progressbar.OptionSetDescription("loading "+name), progressbar.OptionShowBytes(true),
			progressbar.OptionShowTotalBytes(true), progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish())
		defer bar.Finish()
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var ev LoadEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return fmt.Errorf("load %s: bad answer from the daemon: %w", name, err)
		}
		switch {
		case ev.Error != "":
			return errors.New(ev.Error)
		case ev.Version != nil:
			if bar != nil {
				bar.Finish()
			}
			if cf.json {
				return printJSON(stdout, map[string]any{"version": ev.Version})
			}
			v := ev.Version
			fmt.Fprintf(stdout, "loaded %s: %d files, %s in %.2fs (%s/s), on %s\n", v.Name, v.Files,
				store.HumanBytes(v.Bytes), v.LoadSeconds, store.HumanBytes(int64(v.LoadRate)), strings.Join(v.Residency, ", "))
			if v.GPUError != "" {
				fmt.Fprintf(stderr, "weightfs: %s is host-only: %s\n", v.Name, v.GPUError)
			}
			return nil
		case bar != nil:
			bar.ChangeMax64(ev.Total)
			bar.Set64(ev.Done)
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("load %s: %w", name, err)
	}
	return fmt.Errorf("load %s: the daemon closed the connection without an answer", name)
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
	var out UnloadJSON
	req := map[string]any{"name": cf.fl.Arg(0), "version": *version}
	if err := newClient(cf.socket).call(context.Background(), http.MethodPost, "/v1/unload", req, &out); err != nil {
		return err
	}
	if cf.json {
		return printJSON(stdout, out)
	}
	for _, v := range out.Unloaded {
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
	var out ListJSON
	if err := newClient(cf.socket).call(context.Background(), http.MethodGet, "/v1/models", nil, &out); err != nil {
		return err
	}
	if cf.json {
		return printJSON(stdout, out)
	}
	printVersions(stdout, out.Models, out.Draining)
	return nil
}

func printVersions(w io.Writer, models []ModelJSON, draining []VersionJSON) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VERSION\tSTATE\tFILES\tSIZE\tRESIDENT ON\tOPEN\tLOADED\tLOAD RATE\tSOURCE")
	row := func(v VersionJSON) {
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
	var st StatusJSON
	if err := newClient(cf.socket).call(context.Background(), http.MethodGet, "/v1/status", nil, &st); err != nil {
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
	var out VerifyJSON
	req := map[string]any{"name": cf.fl.Arg(0), "version": *version}
	if err := newClient(cf.socket).call(context.Background(), http.MethodPost, "/v1/verify", req, &out); err != nil {
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
