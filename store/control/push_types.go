package control

// Wire types of POST /v1/push (docs/PROTOCOL.md §8).

// PushUpgrade is the protocol a push's connection switches to.
const PushUpgrade = "weightfs-push/1"

// PushTensor is one tensor of a push's manifest.
type PushTensor struct {
	Name  string  `json:"name"`
	DType string  `json:"dtype"` // the safetensors header's spelling: "BF16", "F32", …
	Shape []int64 `json:"shape"`
}

// PushRequest is the body of POST /v1/push.
type PushRequest struct {
	Name    string       `json:"name"`
	Tensors []PushTensor `json:"tensors"`
	// Files are non-weight files (config, tokenizer), base64 on the wire.
	Files map[string][]byte `json:"files,omitempty"`
}

// StagedPush is the daemon's first line on a push's connection, under
// "staged", sent with the scratch memfd attached.
type StagedPush struct {
	Name           string         `json:"name"`
	Base           int            `json:"base"`
	SameLayout     bool           `json:"same_layout"`
	TensorBytes    int64          `json:"tensor_bytes"`
	ScratchBytes   int64          `json:"scratch_bytes"`
	TimeoutSeconds float64        `json:"timeout_seconds"`
	Files          []StagedFile   `json:"files"`
	Tensors        []StagedTensor `json:"tensors"`
}

// StagedFile is one weights file of a staged push and its staged slabs.
type StagedFile struct {
	Path      string        `json:"path"`
	SlabBytes int64         `json:"slab_bytes"`
	Replicas  []SlabReplica `json:"replicas"`
}

// SlabReplica is a staged slab on one GPU: a CUDA IPC handle (64 bytes).
type SlabReplica struct {
	GPU    string `json:"gpu"`
	Handle []byte `json:"handle"`
}

// StagedTensor is where one tensor of a staged push goes.
type StagedTensor struct {
	Name       string  `json:"name"`
	File       string  `json:"file"`
	DType      string  `json:"dtype"`
	Shape      []int64 `json:"shape"`
	Size       int64   `json:"size"`
	SlabOffset int64   `json:"slab_offset"`
}

type stagedMessage struct {
	Staged *StagedPush `json:"staged"`
}

// PushOp is one line a writer sends: "written", "write", "commit" or
// "abort". Tensors is a list of names for "written", of PushWrite for
// "write".
type PushOp struct {
	Op      string `json:"op"`
	GPU     string `json:"gpu,omitempty"`
	Tensors any    `json:"tensors,omitempty"`
	Reason  string `json:"reason,omitempty"`
	// Released (commit): the writer closed its mappings of the staged
	// slabs, so it is not recorded as a holder of the version (§3.1).
	Released bool `json:"released,omitempty"`
}

// PushWrite is a tensor whose bytes are in the scratch at offset At.
type PushWrite struct {
	Name string `json:"name"`
	At   int64  `json:"at"`
}

// PushAnswer is one line the daemon answers: ok and done, the committed
// version, aborted, or an error.
type PushAnswer struct {
	OK      bool       `json:"ok,omitempty"`
	Done    int64      `json:"done,omitempty"`
	Version *Version   `json:"version,omitempty"`
	Aborted bool       `json:"aborted,omitempty"`
	Error   *ErrorBody `json:"error,omitempty"`
}

// okAnswer is PushAnswer's ok form, with done even when 0.
type okAnswer struct {
	OK   bool  `json:"ok"`
	Done int64 `json:"done"`
}

// Push is a staged push in progress, as ls and status show it.
type Push struct {
	Name           string `json:"name"`
	Writer         string `json:"writer"`
	PID            int32  `json:"pid"`
	UID            uint32 `json:"uid"`
	Started        string `json:"started"`
	Done           int64  `json:"done"`
	Total          int64  `json:"total"`
	Tensors        int    `json:"tensors"`
	TensorsWritten int    `json:"tensors_written"`
}
