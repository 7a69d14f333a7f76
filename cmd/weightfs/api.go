package main

import (
	"sort"
	"time"

	wfs "github.com/weightfs/weightfs/fs"
	"github.com/weightfs/weightfs/store"
)

// The control socket's JSON, shared by the daemon and its clients
// (docs/CONTROL.md).

// VersionJSON describes one version.
type VersionJSON struct {
	Name          string   `json:"name"`
	Model         string   `json:"model"`
	Number        int      `json:"number"`
	State         string   `json:"state"`
	Current       bool     `json:"current"`
	Files         int      `json:"files"`
	Bytes         int64    `json:"bytes"`
	Residency     []string `json:"residency"`
	OpenFiles     int      `json:"open_files"`
	HandleHolders []int    `json:"handle_holders"`
	LoadedAt      string   `json:"loaded_at"`
	LoadSeconds   float64  `json:"load_seconds"`
	LoadRate      float64  `json:"load_bytes_per_second"`
	Source        string   `json:"source"`
	GPUError      string   `json:"gpu_error,omitempty"`
}

// ModelJSON describes a model and its versions.
type ModelJSON struct {
	Name     string        `json:"name"`
	Current  int           `json:"current"`
	Versions []VersionJSON `json:"versions"`
}

// ListJSON answers `weightfs ls`.
type ListJSON struct {
	Models   []ModelJSON   `json:"models"`
	Draining []VersionJSON `json:"draining"`
}

// HostJSON is host memory.
type HostJSON struct {
	Bytes    int64  `json:"bytes"`
	Reserved int64  `json:"reserved"`
	Budget   int64  `json:"budget"`
	Arena    string `json:"arena"`
}

// GPUJSON is one GPU.
type GPUJSON struct {
	Index        int    `json:"index"`
	UUID         string `json:"uuid"`
	Name         string `json:"name"`
	Bytes        int64  `json:"bytes"`
	Reserved     int64  `json:"reserved"`
	Budget       int64  `json:"budget"`
	ProcessBytes uint64 `json:"process_bytes,omitempty"`
	Free         uint64 `json:"free"`
	Total        uint64 `json:"total"`
}

// LoadJSON is a load in progress.
type LoadJSON struct {
	Name   string `json:"name"`
	Source string `json:"source"`
	Done   int64  `json:"done"`
	Total  int64  `json:"total"`
}

// StatusJSON answers `weightfs status` and fills .weightfs/status.json.
type StatusJSON struct {
	Mountpoint     string            `json:"mountpoint"`
	ReadMode       string            `json:"read_mode"`
	CachedReason   string            `json:"cached_reason,omitempty"`
	Host           HostJSON          `json:"host"`
	GPUs           []GPUJSON         `json:"gpus"`
	Models         []ModelJSON       `json:"models"`
	Draining       []VersionJSON     `json:"draining"`
	Loads          []LoadJSON        `json:"loads"`
	Requests       map[string]uint64 `json:"requests"`
	DaemonReads    uint64            `json:"daemon_reads"`
	HandleRequests uint64            `json:"handle_requests"`
	HandleDenials  uint64            `json:"handle_denials"`
}

// LoadRequest asks the daemon to load a folder.
type LoadRequest struct {
	Name string `json:"name"`
	Path string `json:"path"`
}

// LoadEvent is one line of a load's streamed answer: progress, then the
// version or an error.
type LoadEvent struct {
	Done    int64        `json:"done,omitempty"`
	Total   int64        `json:"total,omitempty"`
	Version *VersionJSON `json:"version,omitempty"`
	Error   string       `json:"error,omitempty"`
}

// UnloadJSON answers `weightfs unload`.
type UnloadJSON struct {
	Unloaded []VersionJSON `json:"unloaded"`
}

// VerifyJSON answers `weightfs verify`.
type VerifyJSON struct {
	Version string           `json:"version"`
	OK      bool             `json:"ok"`
	Files   []VerifyFileJSON `json:"files"`
}

// VerifyFileJSON is one file's check.
type VerifyFileJSON struct {
	Path         string `json:"path"`
	Source       string `json:"source"`
	OK           bool   `json:"ok"`
	Problem      string `json:"problem,omitempty"`
	SHA256       string `json:"sha256"`
	SourceSHA256 string `json:"source_sha256"`
}

// ErrorJSON is the body of a failed request.
type ErrorJSON struct {
	Error string `json:"error"`
}

func versionJSON(v *store.Version, current bool) VersionJSON {
	secs := v.LoadTime().Seconds()
	j := VersionJSON{
		Name: v.Name(), Model: v.Model(), Number: v.Number(), State: v.State(), Current: current,
		Files: len(v.Files()), Bytes: v.Bytes(), Residency: v.Residency(), OpenFiles: v.OpenFiles(),
		HandleHolders: v.HandleHolders(), LoadedAt: v.LoadedAt().UTC().Format(time.RFC3339),
		LoadSeconds: secs, Source: v.Source(),
	}
	if j.HandleHolders == nil {
		j.HandleHolders = []int{}
	}
	if secs > 0 {
		j.LoadRate = float64(v.Bytes()) / secs
	}
	if err := v.GPUError(); err != nil {
		j.GPUError = err.Error()
	}
	return j
}

func listJSON(st *store.Store) ListJSON {
	out := ListJSON{Models: []ModelJSON{}, Draining: []VersionJSON{}}
	for _, m := range st.Models() {
		cur := m.Current()
		mj := ModelJSON{Name: m.Name()}
		if cur != nil {
			mj.Current = cur.Number()
		}
		for _, v := range m.Versions() {
			mj.Versions = append(mj.Versions, versionJSON(v, v == cur))
		}
		out.Models = append(out.Models, mj)
	}
	for _, v := range st.Draining() {
		out.Draining = append(out.Draining, versionJSON(v, false))
	}
	sort.Slice(out.Draining, func(i, j int) bool { return out.Draining[i].Name < out.Draining[j].Name })
	return out
}

func statusJSON(st *store.Store, srv *wfs.Server, gpuProcessBytes func(uuid string) uint64) StatusJSON {
	list := listJSON(st)
	u := st.Usage()
	c := srv.Counters()
	out := StatusJSON{
		Mountpoint: srv.Mountpoint(), ReadMode: srv.Mode().String(), CachedReason: srv.CachedReason(),
		Host:   HostJSON{Bytes: u.HostBytes, Reserved: u.HostReserved, Budget: u.HostBudget, Arena: st.Arena().Kind()},
		GPUs:   []GPUJSON{},
		Models: list.Models, Draining: list.Draining, Loads: []LoadJSON{},
		Requests: c.Requests, DaemonReads: c.DaemonReads,
		HandleRequests: c.HandleRequests, HandleDenials: c.HandleDenials,
	}
	for _, g := range u.GPUs {
		gj := GPUJSON{Index: g.Ordinal, UUID: g.UUID, Name: g.Name, Bytes: g.Bytes, Reserved: g.Reserved,
			Budget: g.Budget, Free: g.DeviceFree, Total: g.DeviceTotal}
		if gpuProcessBytes != nil {
			gj.ProcessBytes = gpuProcessBytes(g.UUID)
		}
		out.GPUs = append(out.GPUs, gj)
	}
	for _, l := range st.Loads() {
		done, total := l.Progress()
		out.Loads = append(out.Loads, LoadJSON{Name: l.Name, Source: l.Source, Done: done, Total: total})
	}
	return out
}
