// Package control is the daemon's control API: HTTP + JSON on a Unix socket.
// It holds the wire types, the HTTP handler over a store (Server) and the Go
// client (Client) that the command line and programs use. docs/CONTROL.md
// describes the requests, answers and status codes.
package control

import "time"

// Version describes one version of a model.
type Version struct {
	Name      string   `json:"name"`
	Model     string   `json:"model"`
	Number    int      `json:"number"`
	State     string   `json:"state"`
	Current   bool     `json:"current"`
	Files     int      `json:"files"`
	Bytes     int64    `json:"bytes"`
	HostBytes int64    `json:"host_bytes"` // host memory: each file rounded up to its pages
	Residency []string `json:"residency"`
	// Tier is "host" (host images), "compressed" (codec streams, restored
	// on the next open) or "snapshot" (a pushed version's weights streams
	// read from its snapshot on disk when restored); CompressedBytes is the
	// streams' size then.
	Tier            string  `json:"tier"`
	CompressedBytes int64   `json:"compressed_bytes"`
	OpenFiles       int     `json:"open_files"`
	HandleHolders   []int   `json:"handle_holders"`
	LoadedAt        string  `json:"loaded_at"`
	LoadSeconds     float64 `json:"load_seconds"`
	LoadRate        float64 `json:"load_bytes_per_second"`
	Source          string  `json:"source"`
	GPUError        string  `json:"gpu_error,omitempty"`
}

// Model is a model and its versions.
type Model struct {
	Name     string    `json:"name"`
	Current  int       `json:"current"`
	Versions []Version `json:"versions"`
}

// List answers GET /v1/models (`weightfs ls`).
type List struct {
	Models   []Model   `json:"models"`
	Draining []Version `json:"draining"`
	Pushes   []Push    `json:"pushes"` // staged, not committed yet
}

// Host is host memory.
type Host struct {
	Bytes    int64  `json:"bytes"`
	Reserved int64  `json:"reserved"`
	Budget   int64  `json:"budget"`
	Arena    string `json:"arena"`
}

// GPU is one GPU.
type GPU struct {
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

// Load is a load in progress.
type Load struct {
	Name   string `json:"name"`
	Source string `json:"source"`
	Done   int64  `json:"done"`
	Total  int64  `json:"total"`
}

// MountStatus is what the file system reports about itself.
type MountStatus struct {
	Mountpoint     string            `json:"mountpoint"`
	ReadMode       string            `json:"read_mode"`
	CachedReason   string            `json:"cached_reason,omitempty"`
	Requests       map[string]uint64 `json:"requests"`
	DaemonReads    uint64            `json:"daemon_reads"`
	HandleRequests uint64            `json:"handle_requests"`
	HandleDenials  uint64            `json:"handle_denials"`
}

// Status answers GET /v1/status (`weightfs status`) and fills
// .weightfs/status.json on the mount.
type Status struct {
	Daemon Build `json:"daemon"`
	MountStatus
	Host     Host      `json:"host"`
	GPUs     []GPU     `json:"gpus"`
	Models   []Model   `json:"models"`
	Draining []Version `json:"draining"`
	Loads    []Load    `json:"loads"`
	Pushes   []Push    `json:"pushes"`
}

// LoadRequest is the body of POST /v1/load.
type LoadRequest struct {
	Name string `json:"name"`
	Path string `json:"path"` // absolute
}

// CancelRequest is the body of POST /v1/cancel.
type CancelRequest struct {
	Name string `json:"name"`
}

// Cancelled answers POST /v1/cancel: the loads and the staged push it
// cancelled.
type Cancelled struct {
	Cancelled []Load `json:"cancelled"`
	Pushes    []Push `json:"pushes,omitempty"`
}

// VersionRequest is the body of POST /v1/unload, POST /v1/rollback and
// POST /v1/verify.
type VersionRequest struct {
	Name string `json:"name"`
	// 0: every version (unload), the newest one older than the current
	// one (rollback), the current one (verify).
	Version int `json:"version"`
}

// RolledBack answers POST /v1/rollback: the model's new current version.
type RolledBack struct {
	Version Version `json:"version"`
}

// LoadEvent is one line of a load's streamed answer: progress, then the
// version or an error.
type LoadEvent struct {
	Done    int64      `json:"done,omitempty"`
	Total   int64      `json:"total,omitempty"`
	Version *Version   `json:"version,omitempty"`
	Error   *ErrorBody `json:"error,omitempty"`
}

// Unloaded answers POST /v1/unload.
type Unloaded struct {
	Unloaded []Version `json:"unloaded"`
}

// Verified answers POST /v1/verify.
type Verified struct {
	Version string         `json:"version"`
	OK      bool           `json:"ok"`
	Files   []VerifiedFile `json:"files"`
}

// VerifiedFile is one file's check.
type VerifiedFile struct {
	Path         string `json:"path"`
	Source       string `json:"source"`
	OK           bool   `json:"ok"`
	Problem      string `json:"problem,omitempty"`
	SHA256       string `json:"sha256"`
	SourceSHA256 string `json:"source_sha256"`
	// XXH3 is the checksum recorded after the load or push
	// (user.weightfs.xxh3), ServedXXH3 that of the bytes served now.
	XXH3       string         `json:"xxh3"`
	ServedXXH3 string         `json:"served_xxh3"`
	GPUs       []VerifiedSlab `json:"gpus,omitempty"`
}

// VerifiedSlab is the check of one GPU's slab of a weights file against
// the bytes served.
type VerifiedSlab struct {
	GPU     string `json:"gpu"`
	OK      bool   `json:"ok"`
	Problem string `json:"problem,omitempty"`
}

// WatchEvent is one line of GET /v1/watch (NDJSON): the model's current
// version when the request starts, then each new one. Version 0 (with Gone)
// is the last line: the model left the mount or the daemon is stopping.
type WatchEvent struct {
	Name    string    `json:"name"`
	Version int       `json:"version"`
	Gone    bool      `json:"gone,omitempty"`
	Time    time.Time `json:"time"`
}
