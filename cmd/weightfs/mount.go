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
	"syscall"
	"time"

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
	push                            pushFlags
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
		ValidArgsFunction: cobra.FixedCompletions(nil, cobra.ShellCompDirectiveFilterDirs),
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
	fl.StringVar(&f.store.MemoryReserve, "memory-reserve", "", "host memory a load leaves free below the machine's and the memory cgroup's limits: a size or a percentage of each; default: the larger of 1Gi and 5%")
	fl.StringVar(&f.store.GPUMemory, "gpu-memory", "", "GPU memory budget on each --gpu: a size or a percentage of the GPU's memory")
	fl.IntVar(&f.store.KeepVersions, "keep-versions", store.DefaultKeepVersions, "versions of each model kept when one is committed, the current one always among them; older ones are unloaded (0: keep all)")
	fl.BoolVar(&f.store.CompressIdle, "compress-idle", false, "when memory runs short for a load, push or restore, evict what nobody uses (least recently used first) instead of refusing: GPU copies of non-current versions, then compress versions in RAM (their first open restores them), then let compressed pushed versions be read back from their snapshot (--snapshot-dir) instead of RAM, then unload compressed old versions that can be loaded again unchanged from their folder")
	fl.StringVar(&f.store.StateDir, "state-dir", store.DefaultStateDir, "keep host images and their manifest here, so that a restarted daemon adopts them instead of re-reading sources (\"\": off)")
	fl.BoolVar(&f.store.Fresh, "fresh", false, "delete what an earlier daemon left in --state-dir instead of adopting it")
	fl.StringVar(&f.store.SnapshotDir, "snapshot-dir", "", "write committed pushed versions here, compressed, and load the newest of each model at start, so that they outlive a reboot (\"\": off)")
	fl.StringVar(&f.metrics, "metrics-addr", "", "serve Prometheus metrics on this address (e.g. 127.0.0.1:9464)")
	fl.BoolVar(&f.debug, "debug", false, "log every FUSE request")
	f.push.register(fl)
	return c
}

func (a *app) mount(mountpoint string, f *mountFlags) error {
	taken := []string{}
	if f.demo {
		taken = append(taken, "demo")
	}
	models, err := store.ParseModelSpecs(f.models, taken...)
	if err != nil {
		return usagef("--model %v", err)
	}
	listenOpts, err := f.push.listen()
	if err != nil {
		return err
	}
	if err := store.CheckDir(mountpoint); err != nil && !errors.Is(err, syscall.ENOTCONN) {
		return usagef("mount point %v", err)
	}
	log := a.logger()
	if a.logFormat == "json" {
		stdlog.SetFlags(0) // go-fuse and net/http log through the standard logger
		stdlog.SetOutput(slog.NewLogLogger(log.With("logger", "log").Handler(), slog.LevelInfo).Writer())
	}
	f.store.Logger = log
	f.store.SnapshotSkip = modelNames(models) // an explicit --model wins over a snapshot
	st, closeStore, err := store.Open(f.store)
	if errors.Is(err, store.ErrInvalid) {
		return statusError{err, 2}
	} else if err != nil {
		return err
	}
	defer closeStore()
	if f.demo {
		dir, err := demo.WriteCache()
		if err != nil {
			return err
		}
		models = append([]store.ModelSpec{{Name: "demo", Path: dir}}, models...)
	}
	var allow [2][]uint32 // --gpu-allow-uid, --gpu-allow-gid
	for i, ids := range [][]uint{f.allowUIDs, f.allowGIDs} {
		for _, id := range ids {
			allow[i] = append(allow[i], uint32(id))
		}
	}
	controlListener, err := control.ListenWith(a.socket, listenOpts)
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
	ctx, cancel := context.WithCancel(context.Background()) // the daemon's lifetime: loads run on it
	defer cancel()
	procMem, closeMonitor := store.ProcessMemory(st.GPUs(), log)
	defer closeMonitor()
	ctl := control.NewServer(st, control.Options{Logger: log, Version: version, GPUProcessBytes: procMem, Context: ctx,
		PushTimeout: f.push.timeout})
	srv, err := wfs.Mount(mountpoint, st, wfs.Options{
		ForceCached: f.cached, AllowOther: f.allowOther, Logger: log, Debug: f.debug, AllowUIDs: allow[0], AllowGIDs: allow[1],
		Status: wfs.StatusFunc(func() any { return ctl.Status() }),
	})
	if err != nil {
		return err
	}
	ctl.SetMount(func() control.MountStatus { return control.MountStatus(srv.Report()) })
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	go control.Serve(ctx, controlListener, ctl.Handler(), log, "control socket")
	if metricsListener != nil {
		log.Info("metrics", "addr", "http://"+metricsListener.Addr().String()+"/metrics")
		handler := control.MetricsHandler(append(ctl.Collectors(), st.Collector(), srv.Collector())...)
		go control.Serve(ctx, metricsListener, handler, log, "metrics")
	}
	go st.Run(ctx, 2*time.Second)
	go a.loadModels(ctx, st, ctl, srv.Mountpoint(), len(st.GPUs().List()), log, models)
	err = srv.Serve(sig)
	if errors.Is(err, wfs.ErrFilesOpen) {
		os.Exit(0) // free nothing: the kernel may still ask for the open files
	}
	return err
}

// loadModels loads the --model folders, with a progress bar on a terminal
// in text mode. A failed load is logged and the daemon goes on serving.
func (a *app) loadModels(ctx context.Context, st *store.Store, ctl *control.Server, mountpoint string, gpus int, log *slog.Logger, models []store.ModelSpec) {
	for _, m := range models {
		if v := st.Serving(m.Name, m.Path); v != nil { // adopted from --state-dir
			log.Info("serving the adopted version; not re-read", "version", v.Name(), "source", v.Source())
			if a.logFormat == "text" {
				report.Served(a.stdout, mountpoint, v, gpus)
			}
			continue
		}
		progress, done := func(int64, int64) {}, func() {}
		if a.logFormat == "text" {
			progress, done = report.Progress(a.stderr, "loading "+m.Name)
		}
		v, err := ctl.Load(ctx, m.Name, m.Path, progress)
		done()
		switch {
		case ctx.Err() != nil:
			return
		case errors.Is(err, context.Canceled): // weightfs cancel: the store logged it
		case err != nil:
			msg, attrs := explain(err)
			log.Error("load failed", append([]any{"model", m.Name, "err", msg}, attrs...)...)
		case a.logFormat == "text": // the store logs every load; people also get a line on stdout
			report.Served(a.stdout, mountpoint, v, gpus)
		}
	}
	if a.logFormat == "json" {
		log.Info("serving", "mountpoint", mountpoint, "socket", a.socket)
	} else {
		fmt.Fprintf(a.stdout, "weightfs: serving %s (Ctrl-C to unmount; control socket %s)\n", mountpoint, a.socket)
	}
}
