package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"
	"golang.org/x/term"

	"github.com/weightfs/weightfs/cuda"
	wfs "github.com/weightfs/weightfs/fs"
	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/control"
	"github.com/weightfs/weightfs/store/demo"
)

// modelSpec is one --model NAME=PATH.
type modelSpec struct{ name, path string }

func parseModelSpec(s string) (modelSpec, error) {
	name, path, ok := strings.Cut(s, "=")
	if !ok || path == "" {
		return modelSpec{}, usagef("--model %q: want NAME=PATH", s)
	}
	if err := store.ValidateModelName(name); err != nil {
		return modelSpec{}, usagef("--model %q: %v", s, err)
	}
	st, err := os.Stat(path)
	if err != nil {
		return modelSpec{}, usagef("--model %s: %v", name, unwrapPathError(err))
	}
	if !st.IsDir() {
		return modelSpec{}, usagef("--model %s: %s is not a directory", name, path)
	}
	return modelSpec{name: name, path: path}, nil
}

// unwrapPathError keeps "stat PATH: no such file or directory" short.
func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: %w", pe.Path, pe.Err)
	}
	return err
}

type mountFlags struct {
	models     []modelSpec
	demo       bool
	cached     bool
	allowOther bool
	debug      bool
	logFormat  string
	mountpoint string
	gpus       []string
	allowUIDs  []uint
	allowGIDs  []uint
	socket     string
	hostBudget int64
	gpuMemory  string
	metrics    string
}

func parseMountFlags(args []string, stderr io.Writer) (*mountFlags, error) {
	fl := pflag.NewFlagSet("weightfs mount", pflag.ContinueOnError)
	fl.SetOutput(stderr)
	fl.Usage = func() {
		fmt.Fprint(stderr, "Usage: weightfs mount MOUNTPOINT [--model NAME=PATH]... [--demo] [flags]\n\nFlags:\n")
		fl.PrintDefaults()
	}
	var f mountFlags
	var specs []string
	fl.StringArrayVar(&specs, "model", nil, "serve the model folder PATH as NAME (repeatable)")
	fl.BoolVar(&f.demo, "demo", false, "serve the built-in demo model as \"demo\"")
	fl.BoolVar(&f.cached, "cached", false, "serve reads from the daemon with the kernel page cache instead of FUSE passthrough")
	fl.BoolVar(&f.allowOther, "allow-other", os.Geteuid() == 0, "let other users read the mount (default when run as root)")
	fl.StringArrayVar(&f.gpus, "gpu", nil, "also keep weights on this GPU (CUDA index or UUID; repeatable)")
	fl.UintSliceVar(&f.allowUIDs, "gpu-allow-uid", nil, "uids that may read GPU handles (default: the daemon's uid and root)")
	fl.UintSliceVar(&f.allowGIDs, "gpu-allow-gid", nil, "gids that may read GPU handles")
	fl.StringVar(&f.socket, "socket", control.DefaultSocket(), "control socket for load, unload, ls, status, verify (mode 0600)")
	hostMemory := fl.String("host-memory", "", "host memory budget: bytes with a unit (64GiB) or a percentage of RAM (80%); default: no budget")
	fl.StringVar(&f.gpuMemory, "gpu-memory", "", "GPU memory budget on each --gpu: bytes with a unit or a percentage of the GPU's memory")
	fl.StringVar(&f.metrics, "metrics-addr", "", "serve Prometheus metrics on this address (e.g. 127.0.0.1:9464)")
	fl.BoolVar(&f.debug, "debug", false, "log every FUSE request")
	fl.StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
	// pflag prints its own message for unknown flags; keep it to our one line.
	fl.SetOutput(io.Discard)
	if err := fl.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fl.SetOutput(stderr)
			fl.Usage()
			return nil, err
		}
		return nil, usagef("mount: %v", err)
	}
	switch fl.NArg() {
	case 0:
		return nil, usagef("mount: missing MOUNTPOINT (weightfs mount MOUNTPOINT [--model NAME=PATH]...)")
	case 1:
		f.mountpoint = fl.Arg(0)
	default:
		return nil, usagef("mount: one MOUNTPOINT expected, got %d arguments: %s", fl.NArg(), strings.Join(fl.Args(), " "))
	}
	if *hostMemory != "" {
		var si unix.Sysinfo_t
		if err := unix.Sysinfo(&si); err != nil {
			return nil, fmt.Errorf("sysinfo: %w", err)
		}
		b, err := parseSize(*hostMemory, uint64(si.Totalram)*uint64(si.Unit))
		if err != nil {
			return nil, usagef("--host-memory %v", err)
		}
		f.hostBudget = b
	}
	if f.gpuMemory != "" && len(f.gpus) == 0 {
		return nil, usagef("--gpu-memory needs --gpu")
	}
	if f.logFormat != "text" && f.logFormat != "json" {
		return nil, usagef("--log-format %q: want text or json", f.logFormat)
	}
	seen := map[string]bool{}
	for _, s := range specs {
		m, err := parseModelSpec(s)
		if err != nil {
			return nil, err
		}
		if seen[m.name] || (f.demo && m.name == "demo") {
			return nil, usagef("--model %s: name given twice", m.name)
		}
		seen[m.name] = true
		f.models = append(f.models, m)
	}
	if st, err := os.Stat(f.mountpoint); err != nil && !errors.Is(err, syscall.ENOTCONN) {
		return nil, usagef("mount point %v", unwrapPathError(err))
	} else if err == nil && !st.IsDir() {
		return nil, usagef("mount point %s is not a directory", f.mountpoint)
	}
	return &f, nil
}

func newLogger(format string, w io.Writer) *slog.Logger {
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, nil))
	}
	return slog.New(slog.NewTextHandler(w, nil))
}

func runMount(args []string, stdout, stderr io.Writer) error {
	f, err := parseMountFlags(args, stderr)
	if err != nil {
		return err
	}
	log := newLogger(f.logFormat, stderr)
	if f.demo {
		dir, err := writeDemo()
		if err != nil {
			return err
		}
		f.models = append([]modelSpec{{name: "demo", path: dir}}, f.models...)
	}

	arena, err := store.OpenArena(0)
	if err != nil {
		return err
	}
	if arena.Kind() != "tmpfs" {
		log.Warn("host images in memfd without huge pages; mmap readers will be slower",
			"reason", arena.FallbackReason())
	}
	gpus, closeGPUs, err := openGPUs(f.gpus, log)
	if err != nil {
		arena.Close()
		return err
	}
	defer closeGPUs()
	budgets := store.Budgets{Host: f.hostBudget}
	if f.gpuMemory != "" && len(gpus.List()) > 0 {
		smallest := gpus.List()[0].Device().TotalMem
		for _, g := range gpus.List() {
			smallest = min(smallest, g.Device().TotalMem)
		}
		if budgets.GPU, err = parseSize(f.gpuMemory, smallest); err != nil {
			arena.Close()
			return usagef("--gpu-memory %v", err)
		}
	}
	st := store.New(arena, store.Options{Logger: log, GPUs: gpus, Budgets: budgets})
	defer st.Close()

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
	controlListener, err := control.Listen(f.socket)
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

	ctl := control.NewServer(st, control.Options{Logger: log, GPUProcessBytes: nvmlProcessBytes(gpus, log)})
	srv, err := wfs.Mount(f.mountpoint, st, wfs.Options{
		ForceCached: f.cached, AllowOther: f.allowOther, Logger: log, Debug: f.debug,
		AllowUIDs: allowUIDs, AllowGIDs: allowGIDs,
		Status: statusSource{ctl},
	})
	if err != nil {
		return err
	}
	ctl.SetMount(func() control.MountStatus { return mountStatus(srv) })
	d := &daemon{store: st, control: ctl, srv: srv}
	if srv.Mode() == wfs.Passthrough {
		log.Info("mounted", "mountpoint", srv.Mountpoint(), "reads", "passthrough", "host_memory", arena.Kind(),
			"socket", f.socket)
	} else {
		log.Warn("FUSE passthrough is OFF: reads go through the daemon and the page cache (slower)",
			"reason", srv.CachedReason(), "mountpoint", srv.Mountpoint(), "socket", f.socket)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go control.Serve(ctx, controlListener, ctl.Handler(), log, "control socket")
	if metricsListener != nil {
		log.Info("metrics", "addr", "http://"+metricsListener.Addr().String()+"/metrics")
		go control.Serve(ctx, metricsListener, promhttp.HandlerFor(newRegistry(d), promhttp.HandlerOpts{}), log, "metrics")
	}
	go st.Run(ctx, 2*time.Second)
	go func() {
		for _, m := range f.models {
			if ctx.Err() != nil {
				return
			}
			loadOne(ctx, ctl, st, srv, log, m, stdout, stderr)
		}
		fmt.Fprintf(stdout, "weightfs: serving %s (Ctrl-C to unmount; control socket %s)\n", srv.Mountpoint(), f.socket)
	}()

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

// shutdown unmounts; while readers hold files open it detaches the mount and
// serves them until they close, or until a second signal.
func shutdown(srv *wfs.Server, unmounted <-chan struct{}, log *slog.Logger) error {
	if err := srv.Unmount(); err == nil {
		log.Info("unmounted", "mountpoint", srv.Mountpoint())
		return nil
	} else {
		log.Warn("mount busy; detaching it and serving open files until they close (signal again to quit now)", "err", err)
	}
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

// loadOne loads one model with a progress bar on a terminal, a summary line
// elsewhere. A failed load is reported and the daemon goes on serving.
func loadOne(ctx context.Context, ctl *control.Server, st *store.Store, srv *wfs.Server, log *slog.Logger, m modelSpec, stdout, stderr io.Writer) {
	var bar *progressbar.ProgressBar
	var progress func(done, total int64)
	if isTerminal(stderr) {
		bar = progressbar.NewOptions64(-1,
			progressbar.OptionSetWriter(stderr),
			progressbar.OptionSetDescription("loading "+m.name),
			progressbar.OptionShowBytes(true),
			progressbar.OptionShowTotalBytes(true),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionClearOnFinish(),
		)
		progress = func(done, total int64) {
			bar.ChangeMax64(total)
			bar.Set64(done)
		}
	}
	v, err := ctl.Load(ctx, m.name, m.path, progress)
	if bar != nil {
		bar.Finish()
	}
	if err != nil {
		log.Error("load failed", "model", m.name, "err", err)
		return
	}
	secs := v.LoadTime().Seconds()
	where := "host"
	if gpus := st.GPUs().List(); len(gpus) > 0 && v.GPUError() == nil {
		where = fmt.Sprintf("host + %d GPU", len(gpus))
	}
	fmt.Fprintf(stdout, "weightfs: %s → %s (%d files, %s in %.2fs, %s/s, %s)\n",
		m.name, filepath.Join(srv.Mountpoint(), v.Name()), len(v.Files()),
		store.HumanBytes(v.Bytes()), secs, store.HumanBytes(int64(float64(v.Bytes())/max(secs, 1e-9))), where)
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// writeDemo writes the built-in demo model into the user's cache folder.
func writeDemo() (string, error) {
	base, err := os.UserCacheDir()
	if err != nil {
		base = os.TempDir()
	}
	dir := filepath.Join(base, "weightfs", "demo")
	if err := demo.Write(dir); err != nil {
		return "", fmt.Errorf("write demo model to %s: %w", dir, err)
	}
	return dir, nil
}

// openGPUs prepares the --gpu devices. Without a CUDA driver the daemon says
// so once and runs host-only; an unknown device is an error.
func openGPUs(ids []string, log *slog.Logger) (*store.GPUs, func(), error) {
	if len(ids) == 0 {
		return nil, func() {}, nil
	}
	driver, err := cuda.Open()
	if err != nil {
		log.Warn("no CUDA driver: running host-only", "err", err)
		return nil, func() {}, nil
	}
	gpus, err := store.OpenGPUs(driver, ids)
	if err != nil {
		driver.Close()
		return nil, nil, usagef("%v", err)
	}
	for _, g := range gpus.List() {
		d := g.Device()
		log.Info("GPU residency", "gpu", d.Ordinal, "uuid", d.UUID, "name", d.Name)
	}
	return gpus, func() { gpus.Close(); driver.Close() }, nil
}

// nvmlProcessBytes returns NVML's figure of this process's memory on a GPU, or
// nil where NVML is not there (a build without cgo, no driver).
func nvmlProcessBytes(gpus *store.GPUs, log *slog.Logger) func(uuid string) uint64 {
	if len(gpus.List()) == 0 {
		return nil
	}
	mon, err := cuda.OpenMonitor()
	if err != nil {
		log.Info("NVML not available; GPU figures come from the CUDA driver", "err", err)
		return nil
	}
	pid := os.Getpid()
	return func(uuid string) uint64 {
		n, err := mon.ProcessMemory(uuid, pid)
		if err != nil {
			return 0
		}
		return n
	}
}

// statusSource shows the control server's status in .weightfs/status.json.
type statusSource struct{ ctl *control.Server }

func (s statusSource) Status() any { return s.ctl.Status() }

// mountStatus is the file system's side of the status.
func mountStatus(srv *wfs.Server) control.MountStatus {
	c := srv.Counters()
	return control.MountStatus{Mountpoint: srv.Mountpoint(), ReadMode: srv.Mode().String(), CachedReason: srv.CachedReason(),
		Requests: c.Requests, DaemonReads: c.DaemonReads, HandleRequests: c.HandleRequests, HandleDenials: c.HandleDenials}
}
