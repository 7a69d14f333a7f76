package main

import (
	"context"
	"errors"
	"fmt"
	stdlog "log"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"

	wfs "github.com/weightfs/weightfs/fs"
	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/control"
	"github.com/weightfs/weightfs/store/demo"
	"github.com/weightfs/weightfs/store/report"
)

// mountFlags are the daemon's own flags.
type mountFlags struct {
	models                          []string
	demo, cached, allowOther, debug bool
	allowUIDs, allowGIDs            []uint
	metrics                         string
	store                           store.Config
}

func (a *app) mountCommand() *cobra.Command {
	var f mountFlags
	c := &cobra.Command{
		Use:   "mount MOUNTPOINT [--model NAME=PATH]... [--gpu ID]...",
		Short: "Run the daemon: serve models on MOUNTPOINT until SIGINT or SIGTERM",
		Long: `Run the daemon in the foreground: load each --model, mount them read-only on
MOUNTPOINT and serve the control socket until SIGINT or SIGTERM, which unmount.
Sizes: bytes, Ki/Mi/Gi/Ti (or KiB…TiB, K…T: binary), KB…TB (decimal), or a percentage.`,
		Args:              nargs(1, 1),
		ValidArgsFunction: completeDirs(0),
		RunE:              func(_ *cobra.Command, args []string) error { return a.mount(args[0], &f) },
	}
	fl := c.Flags()
	fl.StringArrayVar(&f.models, "model", nil, "serve the model folder PATH as NAME (NAME=PATH, repeatable)")
	fl.BoolVar(&f.demo, "demo", false, "serve the built-in demo model as \"demo\"")
	fl.BoolVar(&f.cached, "cached", false, "serve reads from the daemon with the kernel page cache instead of FUSE passthrough")
	fl.BoolVar(&f.allowOther, "allow-other", os.Geteuid() == 0, "let other users read the mount (default when run as root)")
	fl.StringArrayVar(&f.store.GPUs, "gpu", nil, "also keep weights on this GPU (CUDA index or UUID; repeatable)")
	fl.UintSliceVar(&f.allowUIDs, "gpu-allow-uid", nil, "uids that may read GPU handles (default: the daemon's uid and root)")
	fl.UintSliceVar(&f.allowGIDs, "gpu-allow-gid", nil, "gids that may read GPU handles")
	fl.StringVar(&f.store.HostMemory, "host-memory", "", "host memory budget: a size (64Gi) or a percentage of RAM (80%); default: none")
	fl.StringVar(&f.store.GPUMemory, "gpu-memory", "", "GPU memory budget on each --gpu: a size or a percentage of the GPU's memory")
	fl.StringVar(&f.metrics, "metrics-addr", "", "serve Prometheus metrics on this address (e.g. 127.0.0.1:9464)")
	fl.BoolVar(&f.debug, "debug", false, "log every FUSE request")
	return c
}

// modelSpec is one --model NAME=PATH.
type modelSpec struct{ name, path string }

// check validates the models and the mount point before anything is set up.
func (f *mountFlags) check(mountpoint string) ([]modelSpec, error) {
	var models []modelSpec
	seen := map[string]bool{"demo": f.demo}
	for _, s := range f.models {
		name, path, err := store.ParseModelSpec(s)
		if err == nil && seen[name] {
			err = fmt.Errorf("%s: name given twice", name)
		}
		if err != nil {
			return nil, usagef("--model %v", err)
		}
		seen[name] = true
		models = append(models, modelSpec{name, path})
	}
	if err := store.CheckDir(mountpoint); err != nil && !errors.Is(err, syscall.ENOTCONN) {
		return nil, usagef("mount point %v", err)
	}
	return models, nil
}

// logWriter makes what goes to the standard log package (go-fuse,
// net/http) records of a slog logger.
type logWriter struct{ log *slog.Logger }

func (w logWriter) Write(p []byte) (int, error) {
	w.log.Info(strings.TrimRight(string(p), "\n"), "logger", "log")
	return len(p), nil
}

func (a *app) mount(mountpoint string, f *mountFlags) error {
	models, err := f.check(mountpoint)
	if err != nil {
		return err
	}
	log := a.logger()
	if a.logFormat == "json" {
		stdlog.SetFlags(0)
		stdlog.SetOutput(logWriter{log})
	}
	f.store.Logger = log
	st, closeStore, err := store.Open(f.store)
	if errors.Is(err, store.ErrInvalid) {
		return usageError{err}
	} else if err != nil {
		return err
	}
	defer closeStore()
	if f.demo {
		dir, err := demo.WriteCache()
		if err != nil {
			return err
		}
		models = append([]modelSpec{{"demo", dir}}, models...)
	}
	var allowUIDs, allowGIDs []uint32
	for _, id := range f.allowUIDs {
		allowUIDs = append(allowUIDs, uint32(id))
	}
	for _, id := range f.allowGIDs {
		allowGIDs = append(allowGIDs, uint32(id))
	}
	if allowUIDs != nil || allowGIDs != nil {
		allowUIDs = append(allowUIDs, 0, uint32(os.Getuid()))
	}
	controlListener, err := control.Listen(a.socket)
	if err != nil {
		return err
	}
	defer controlListener.Close()
	var metricsListener net.Listener
	if f.metrics != "" {
		if metricsListener, err = net.Listen("tcp", f.metrics); err != nil {
			return fmt.Errorf("--metrics-addr %s: %w", f.metrics, err)
		}
		defer metricsListener.Close()
	}

	ctl := control.NewServer(st, control.Options{Logger: log, GPUProcessBytes: store.ProcessMemory(st.GPUs(), log)})
	srv, err := wfs.Mount(mountpoint, st, wfs.Options{
		ForceCached: f.cached, AllowOther: f.allowOther, Logger: log, Debug: f.debug, AllowUIDs: allowUIDs, AllowGIDs: allowGIDs,
		Status: statusSource{ctl},
	})
	if err != nil {
		return err
	}
	ctl.SetMount(func() control.MountStatus {
		c := srv.Counters()
		return control.MountStatus{Mountpoint: srv.Mountpoint(), ReadMode: srv.Mode().String(), CachedReason: srv.CachedReason(),
			Requests: c.Requests, DaemonReads: c.DaemonReads, HandleRequests: c.HandleRequests, HandleDenials: c.HandleDenials}
	})
	if srv.Mode() == wfs.Passthrough {
		log.Info("mounted", "mountpoint", srv.Mountpoint(), "reads", "passthrough", "host_memory", st.Arena().Kind(), "socket", a.socket)
	} else {
		log.Warn("FUSE passthrough is OFF: reads go through the daemon and the page cache (slower)",
			"reason", srv.CachedReason(), "mountpoint", srv.Mountpoint(), "socket", a.socket)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go control.Serve(ctx, controlListener, ctl.Handler(), log, "control socket")
	if metricsListener != nil {
		log.Info("metrics", "addr", "http://"+metricsListener.Addr().String()+"/metrics")
		reg := prometheus.NewRegistry()
		reg.MustRegister(ctl.Collectors()...)
		reg.MustRegister(st.Collector(), srv.Collector(),
			collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		go control.Serve(ctx, metricsListener, promhttp.HandlerFor(reg, promhttp.HandlerOpts{}), log, "metrics")
	}
	go st.Run(ctx, 2*time.Second)
	go a.loadModels(ctx, ctl, srv.Mountpoint(), len(st.GPUs().List()), log, models)

	unmounted := make(chan struct{})
	go func() { srv.Wait(); close(unmounted) }()
	select {
	case <-unmounted:
		return errors.New("file system was unmounted from outside")
	case <-ctx.Done():
	}
	stop()
	return shutdown(srv, unmounted, log)
}

// loadModels loads the --model folders, with a progress bar on a terminal
// in text mode. A failed load is logged and the daemon goes on serving.
func (a *app) loadModels(ctx context.Context, ctl *control.Server, mountpoint string, gpus int, log *slog.Logger, models []modelSpec) {
	for _, m := range models {
		var progress func(done, total int64)
		done := func() {}
		if a.logFormat == "text" {
			progress, done = report.Progress(a.stderr, "loading "+m.name)
		}
		v, err := ctl.Load(ctx, m.name, m.path, progress)
		done()
		if ctx.Err() != nil {
			return
		} else if err != nil {
			msg, attrs := explain(err)
			log.Error("load failed", append([]any{"model", m.name, "err", msg}, attrs...)...)
		} else if a.logFormat == "json" {
			log.Info("loaded", "model", m.name, "version", v.Name(), "files", len(v.Files()), "bytes", v.Bytes(),
				"seconds", v.LoadTime().Seconds())
		} else {
			report.Served(a.stdout, mountpoint, v, gpus)
		}
	}
	if a.logFormat == "json" {
		log.Info("serving", "mountpoint", mountpoint, "socket", a.socket)
	} else {
		fmt.Fprintf(a.stdout, "weightfs: serving %s (Ctrl-C to unmount; control socket %s)\n", mountpoint, a.socket)
	}
}

// shutdown unmounts; while readers hold files open it detaches the mount and
// serves them until they close, or until a second signal.
func shutdown(srv *wfs.Server, unmounted <-chan struct{}, log *slog.Logger) error {
	err := srv.Unmount()
	if err == nil {
		log.Info("unmounted", "mountpoint", srv.Mountpoint())
		return nil
	}
	log.Warn("mount busy; detaching it and serving open files until they close (signal again to quit now)", "err", err)
	if err := srv.Detach(); err != nil {
		return err
	}
	again := make(chan os.Signal, 1)
	signal.Notify(again, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(again)
	select {
	case <-unmounted:
		log.Info("last open file closed; unmounted", "mountpoint", srv.Mountpoint())
	case <-again:
		log.Warn("quitting with files still open", "mountpoint", srv.Mountpoint())
	}
	return nil
}

// statusSource shows the control server's status in .weightfs/status.json.
type statusSource struct{ ctl *control.Server }

func (s statusSource) Status() any { return s.ctl.Status() }
