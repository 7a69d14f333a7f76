// Package report writes the control API's answers for people: what
// `weightfs load`, `unload`, `cancel`, `ls`, `status` and `verify` print without
// --json.
package report

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/control"
)

// Loaded is one line about a version just loaded.
func Loaded(w io.Writer, v *control.Version) {
	fmt.Fprintf(w, "loaded %s: %d files, %s in %.2fs (%s/s), on %s\n", v.Name, v.Files,
		store.HumanBytes(v.Bytes), v.LoadSeconds, store.HumanBytes(int64(v.LoadRate)), strings.Join(v.Residency, ", "))
}

// Unloaded is one line per version taken off the mount.
func Unloaded(w io.Writer, gone []control.Version) {
	for _, v := range gone {
		if v.State == store.StateDraining && (v.OpenFiles > 0 || len(v.HandleHolders) > 0) {
			fmt.Fprintf(w, "unloaded %s (draining: %d open files, %d processes hold GPU handles)\n",
				v.Name, v.OpenFiles, len(v.HandleHolders))
		} else {
			fmt.Fprintf(w, "unloaded %s\n", v.Name)
		}
	}
}

// RolledBack says where a model's symlink points now.
func RolledBack(w io.Writer, v *control.Version) {
	fmt.Fprintf(w, "%s -> %s\n", v.Model, v.Name)
}

// Cancelled is one line per load and push cancelled.
func Cancelled(w io.Writer, out *control.Cancelled) {
	for _, l := range out.Cancelled {
		fmt.Fprintf(w, "cancelled the load of %s from %s (%s of %s copied)\n", l.Name, l.Source,
			store.HumanBytes(l.Done), store.HumanBytes(l.Total))
	}
	for _, p := range out.Pushes {
		fmt.Fprintf(w, "cancelled the push of %s by %s (%s of %s written)\n", p.Name, p.Writer,
			store.HumanBytes(p.Done), store.HumanBytes(p.Total))
	}
}

// Pushes is the staged pushes, after the versions, when there are any.
func Pushes(w io.Writer, pushes []control.Push) {
	if len(pushes) == 0 {
		return
	}
	fmt.Fprintln(w, "\nstaged pushes:")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MODEL\tWRITER\tWRITTEN\tTENSORS\tSTARTED")
	for _, p := range pushes {
		fmt.Fprintf(tw, "%s\t%s\t%s of %s\t%d of %d\t%s\n", p.Name, p.Writer, store.HumanBytes(p.Done),
			store.HumanBytes(p.Total), p.TensorsWritten, p.Tensors, p.Started)
	}
	tw.Flush()
}

// Interrupted is what `weightfs load` says when it stops waiting for a load
// that goes on in the daemon.
func Interrupted(name string) string {
	return fmt.Sprintf("interrupted: the load of %s goes on in the daemon (weightfs status shows it); weightfs cancel %[1]s stops it", name)
}

// Versions is a table of versions, the current one of each model marked *.
func Versions(w io.Writer, models []control.Model, draining []control.Version) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VERSION\tSTATE\tFILES\tSIZE\tTIER\tRESIDENT ON\tOPEN\tLOADED\tLOAD RATE\tSOURCE")
	row := func(v control.Version) {
		name := v.Name
		if v.Current {
			name += " *"
		}
		tier := v.Tier
		if tier == store.TierCompressed || tier == store.TierSnapshot {
			tier += " " + store.HumanBytes(v.CompressedBytes)
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%d\t%s\t%s/s\t%s\n", name, v.State, v.Files, store.HumanBytes(v.Bytes),
			tier, strings.Join(v.Residency, ","), v.OpenFiles, v.LoadedAt, store.HumanBytes(int64(v.LoadRate)), v.Source)
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

// Status is the daemon's memory, GPUs, counters, versions and loads.
func Status(w io.Writer, st *control.Status) {
	mode := st.ReadMode
	if st.CachedReason != "" {
		mode += " (" + st.CachedReason + ")"
	}
	budget := "no budget"
	if st.Host.Budget > 0 {
		budget = "budget " + store.HumanBytes(st.Host.Budget)
	}
	fmt.Fprintf(w, "daemon: weightfs %s (%s)\n", st.Daemon.Version, st.Daemon.Go)
	fmt.Fprintf(w, "mount:  %s, reads: %s\n", st.Mountpoint, mode)
	fmt.Fprintf(w, "host:   %s resident (%s), %s reserved by loads, host images in %s\n",
		store.HumanBytes(st.Host.Bytes), budget, store.HumanBytes(st.Host.Reserved), st.Host.Arena)
	for _, g := range st.GPUs {
		fmt.Fprintf(w, "GPU %d:  %s %s: %s used by weightfs, %s free of %s\n", g.Index, g.Name, g.UUID,
			store.HumanBytes(g.Bytes), store.HumanBytes(int64(g.Free)), store.HumanBytes(int64(g.Total)))
	}
	fmt.Fprintf(w, "reads reaching the daemon: %d; GPU handle requests: %d (%d refused)\n\n",
		st.DaemonReads, st.HandleRequests, st.HandleDenials)
	Versions(w, st.Models, st.Draining)
	Pushes(w, st.Pushes)
	for _, l := range st.Loads {
		fmt.Fprintf(w, "loading %s from %s: %s of %s\n", l.Name, l.Source, store.HumanBytes(l.Done), store.HumanBytes(l.Total))
	}
}

// Verified is a table of files and their checks, then a verdict when every
// file matched.
func Verified(w io.Writer, out *control.Verified) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "FILE\tRESULT\tXXH3\tGPUS\tSHA-256\n")
	pushed := false
	for _, f := range out.Files {
		result := "ok"
		if !f.OK {
			result = "DIFFERS: " + f.Problem
		}
		gpus := "-"
		if len(f.GPUs) > 0 {
			gpus = fmt.Sprintf("%d ok", len(f.GPUs))
			for _, g := range f.GPUs {
				if !g.OK {
					gpus = "DIFFERS"
				}
			}
		}
		pushed = pushed || f.Source == ""
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", f.Path, result, orDash(f.XXH3), gpus, f.SHA256)
	}
	tw.Flush()
	switch {
	case out.OK && pushed:
		fmt.Fprintf(w, "%s: every file equals its recorded checksum and its GPU slabs\n", out.Version)
	case out.OK:
		fmt.Fprintf(w, "%s: every file equals its source\n", out.Version)
	}
}

// Progress draws a progress bar of bytes on w when w is a terminal; else
// progress is nil. done clears the bar.
func Progress(w io.Writer, what string) (progress func(done, total int64), done func()) {
	if f, ok := w.(*os.File); !ok || !term.IsTerminal(int(f.Fd())) {
		return nil, func() {}
	}
	bar := progressbar.NewOptions64(-1, progressbar.OptionSetWriter(w), progressbar.OptionSetDescription(what),
		progressbar.OptionShowBytes(true), progressbar.OptionShowTotalBytes(true),
		progressbar.OptionThrottle(100*time.Millisecond), progressbar.OptionClearOnFinish())
	return func(done, total int64) { bar.ChangeMax64(total); bar.Set64(done) }, func() { bar.Finish() }
}

// Served is the daemon's line for a --model it loaded and serves under
// mountpoint, on the host and gpus GPUs (or, adopted after a crash, in the
// compressed or snapshot tier, without GPU copies).
func Served(w io.Writer, mountpoint string, v *store.Version, gpus int) {
	where := v.Tier()
	if where == store.TierHost && gpus > 0 && v.GPUError() == nil {
		where = fmt.Sprintf("host + %d GPU", gpus)
	}
	secs := v.LoadTime().Seconds()
	fmt.Fprintf(w, "weightfs: %s → %s (%d files, %s in %.2fs, %s/s, %s)\n", v.Model(), filepath.Join(mountpoint, v.Name()),
		len(v.Files()), store.HumanBytes(v.Bytes()), secs, store.HumanBytes(int64(float64(v.Bytes())/max(secs, 1e-9))), where)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
