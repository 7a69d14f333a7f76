package store

import (
	"context"
	"errors"
	"log/slog"
)

// Config is how a daemon sets up its store: the flags of `weightfs mount`.
type Config struct {
	Logger *slog.Logger
	// GPUs are the --gpu devices: CUDA ordinals or UUIDs.
	GPUs []string
	// HostMemory is the --host-memory budget: a size or a percentage of
	// the machine's RAM ("": none).
	HostMemory string
	// GPUMemory is the --gpu-memory budget on each GPU: a size or a
	// percentage of the smallest GPU's memory ("": none).
	GPUMemory string
	// MemoryReserve is the --memory-reserve margin a load leaves free below
	// the machine's and the memory cgroup's limits: a size, or a percentage
	// of each limit ("": DefaultMemoryReserve).
	MemoryReserve string
	// KeepVersions is --keep-versions: how many versions of each model
	// stay when one is committed (the current one always stays); 0 keeps
	// all. The flag's default is DefaultKeepVersions.
	KeepVersions int
	// CompressIdle is --compress-idle: a load, push or restore refused for
	// memory first evicts what nobody uses (Options.CompressIdle).
	CompressIdle bool
	// StateDir is --state-dir: where host images and the manifest outlive a
	// killed daemon ("": nowhere, images die with the daemon).
	StateDir string
	// Fresh is --fresh: delete what an earlier daemon left in StateDir
	// instead of adopting it.
	Fresh bool
	// SnapshotDir is --snapshot-dir: where committed pushed versions are
	// written, compressed, to outlive a reboot ("": off).
	SnapshotDir string
	// SnapshotSkip are the models not loaded from SnapshotDir at start:
	// those --model gives a folder for (it wins).
	SnapshotSkip []string
}

// Open sets up a daemon's store: its host memory (a huge-page tmpfs, or
// memfds with a warning), its GPUs (none, with a warning, without a CUDA
// driver) and its budgets, checked against the machine. A budget or a GPU
// the machine cannot honour is an ErrInvalid error that names the flag.
// closeAll closes the store, then the GPUs.
func Open(cfg Config) (st *Store, closeAll func(), err error) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	var budgets Budgets
	if cfg.HostMemory != "" {
		total, err := HostMemory()
		if err != nil {
			return nil, nil, err
		}
		if budgets.Host, err = ParseBudget(cfg.HostMemory, total, "the machine's RAM"); err != nil {
			return nil, nil, errorf(ErrInvalid, "--host-memory %w", err)
		}
	}
	reserve, err := ParseMemoryReserve(cfg.MemoryReserve)
	if err != nil {
		return nil, nil, errorf(ErrInvalid, "--memory-reserve %w", err)
	}
	if cfg.KeepVersions < 0 {
		return nil, nil, errorf(ErrInvalid, "--keep-versions %d: want 0 (keep every version) or more", cfg.KeepVersions)
	}
	if cfg.GPUMemory != "" && len(cfg.GPUs) == 0 {
		return nil, nil, errorf(ErrInvalid, "--gpu-memory needs --gpu")
	}
	gpus, closeGPUs, err := OpenDevices(cfg.GPUs, log)
	if err != nil {
		return nil, nil, err
	}
	if total, of := gpus.SmallestMemory(); cfg.GPUMemory != "" && total > 0 {
		if budgets.GPU, err = ParseBudget(cfg.GPUMemory, total, of); err != nil {
			closeGPUs()
			return nil, nil, errorf(ErrInvalid, "--gpu-memory %w", err)
		}
	}
	var snap *SnapshotDir
	if cfg.SnapshotDir != "" {
		if snap, err = OpenSnapshotDir(cfg.SnapshotDir); err != nil {
			closeGPUs()
			return nil, nil, err
		}
		log.Info("snapshot directory: pushed versions outlive a reboot", "snapshot_dir", snap.Path())
	}
	arena, sd, err := openArena(cfg, log)
	if err != nil {
		if snap != nil {
			snap.close()
		}
		closeGPUs()
		return nil, nil, err
	}
	if arena.Kind() == "memfd" {
		log.Warn("host images in memfd without huge pages; mmap readers will be slower", "reason", arena.FallbackReason())
	}
	if m, err := ReadSystemMemory(); err == nil {
		attrs := []any{"available", m.Available, "total", m.Total, "reserve", reserve(m.Total)}
		if m.Cgroup != "" {
			attrs = append(attrs, "cgroup", m.Cgroup, "cgroup_limit", m.CgroupLimit, "cgroup_used", m.CgroupUsed,
				"cgroup_reserve", reserve(m.CgroupLimit))
		}
		log.Info("host memory admission", attrs...)
	}
	st = New(arena, Options{Logger: log, GPUs: gpus, Budgets: budgets, MemoryReserve: reserve,
		KeepVersions: cfg.KeepVersions, State: sd, Snapshots: snap, CompressIdle: cfg.CompressIdle})
	if sd != nil {
		st.Adopt(context.Background())
	}
	if snap != nil {
		skip := map[string]bool{}
		for _, n := range cfg.SnapshotSkip {
			skip[n] = true
		}
		st.LoadSnapshots(context.Background(), skip)
	}
	return st, func() { st.Close(); closeGPUs() }, nil
}

// openArena opens the state directory and its arena, or, with no
// --state-dir or one that cannot hold memory-backed images (not root, no
// tmpfs), the private arena as before, with a warning. A state directory
// that is refused (another user's, writable by others, in use) is an error.
func openArena(cfg Config, log *slog.Logger) (*Arena, *StateDir, error) {
	if cfg.StateDir != "" {
		sd, err := OpenStateDir(cfg.StateDir, cfg.Fresh)
		switch {
		case err == nil:
			if cfg.Fresh {
				log.Info("--fresh: deleted the host images and manifest an earlier daemon left", "state_dir", sd.Path())
			}
			log.Info("state directory: host images outlive a killed daemon", "state_dir", sd.Path(), "mounted_tmpfs", sd.mounted)
			return OpenStateArena(sd), sd, nil
		case errors.Is(err, ErrInvalid) || errors.Is(err, ErrBusy):
			return nil, nil, err
		default:
			log.Warn("state directory unusable: host images die with the daemon and a restart re-reads sources", "err", err)
		}
	}
	a, err := OpenArena(0)
	return a, nil, err
}
