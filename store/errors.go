package store

import (
	"errors"
	"fmt"
	"strings"
)

// Every error the store returns for a request wraps one of these kinds, so
// the edges (the control server, the command line) can map it to a status
// code or a flag name without reading its text. Match with errors.Is.
var (
	// ErrInvalid: the request itself is wrong (a bad model name, a folder
	// that is not a model, a malformed or inconsistent file).
	ErrInvalid = errors.New("invalid request")
	// ErrNotFound: no such model or version.
	ErrNotFound = errors.New("not found")
	// ErrBusy: the request conflicts with the store's state (it is closed,
	// or the version is in use in a way that forbids the request).
	ErrBusy = errors.New("busy")
	// ErrNoMemory: a budget, or the machine, cannot hold what was asked.
	// The error is a *BudgetError when a budget refused it.
	ErrNoMemory = errors.New("not enough memory")
)

// kindError is an error of one kind with its own message.
type kindError struct {
	kind error
	err  error
}

func (e *kindError) Error() string   { return e.err.Error() }
func (e *kindError) Unwrap() []error { return []error{e.err, e.kind} }

// errorf makes an error of kind with a formatted message; %w in format
// still wraps its cause.
func errorf(kind error, format string, args ...any) error {
	return &kindError{kind: kind, err: fmt.Errorf(format, args...)}
}

// Tiers a BudgetError can name.
const (
	// TierHost: the host memory budget.
	TierHost = "host"
	// TierGPU: the GPU memory budget of one GPU.
	TierGPU = "gpu"
	// TierSystem: what the machine (MemAvailable) or the daemon's memory
	// cgroup can still give, less the reserve the daemon keeps free.
	TierSystem = "system"
)

// BudgetError is a load refused for memory before anything was read: what it
// needs, what is free and the budget, in bytes. For TierSystem, Budget is the
// limit (the machine's MemTotal, or the limit of Cgroup), Free what the limit
// can still give beyond Reserve. It matches ErrNoMemory.
type BudgetError struct {
	Model   string `json:"model"`
	Source  string `json:"source"`
	Tier    string `json:"tier"`          // TierHost, TierGPU or TierSystem
	GPU     string `json:"gpu,omitempty"` // the GPU's UUID for TierGPU
	Need    int64  `json:"need"`
	Free    int64  `json:"free"`
	Budget  int64  `json:"budget"`
	Reserve int64  `json:"reserve,omitempty"` // TierSystem: the margin kept free
	Cgroup  string `json:"cgroup,omitempty"`  // TierSystem: the limiting memory cgroup ("": the machine)
}

func (e *BudgetError) Error() string { return e.Explain("") }

// Explain words the refusal naming setting, the daemon's setting that made
// the budget or the reserve (a flag, for the command line), or without one
// when setting is "".
func (e *BudgetError) Explain(setting string) string {
	head := fmt.Sprintf("load %s from %s: needs %s of ", e.Model, e.Source, HumanBytes(e.Need))
	if writer, ok := strings.CutPrefix(e.Source, pushSource); ok {
		head = fmt.Sprintf("push %s by %s: needs %s of ", e.Model, writer, HumanBytes(e.Need))
	}
	if e.Tier == TierSystem {
		limit := "the machine can give only %s more (what MemAvailable says of its %s, less a reserve of %s)"
		if e.Cgroup != "" {
			limit = "memory cgroup " + e.Cgroup + " can give only %s more (of its %s limit, less a reserve of %s)"
		}
		if setting != "" {
			limit = strings.TrimSuffix(limit, ")") + ", the daemon's " + setting + ")"
		}
		return head + "host memory, but " + fmt.Sprintf(limit, HumanBytes(e.Free), HumanBytes(e.Budget), HumanBytes(e.Reserve))
	}
	where := "host memory"
	if e.Tier == TierGPU {
		where = "GPU memory on " + e.GPU
	}
	budget := "budget"
	if setting != "" {
		budget = "daemon's " + setting + " budget"
	}
	return head + fmt.Sprintf("%s, only %s is free of the %s of %s", where, HumanBytes(e.Free), budget, HumanBytes(e.Budget))
}

// Is makes errors.Is(err, ErrNoMemory) true for a budget refusal.
func (e *BudgetError) Is(target error) bool { return target == ErrNoMemory }
