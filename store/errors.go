package store

import (
	"errors"
	"fmt"
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
	TierHost = "host"
	TierGPU  = "gpu"
)

// BudgetError is a load refused by a memory budget before anything was read:
// what it needs, what is free and the budget, in bytes. It matches
// ErrNoMemory.
type BudgetError struct {
	Model  string `json:"model"`
	Source string `json:"source"`
	Tier   string `json:"tier"`          // TierHost or TierGPU
	GPU    string `json:"gpu,omitempty"` // the GPU's UUID for TierGPU
	Need   int64  `json:"need"`
	Free   int64  `json:"free"`
	Budget int64  `json:"budget"`
}

func (e *BudgetError) Error() string {
	where := "host memory"
	if e.Tier == TierGPU {
		where = "GPU memory on " + e.GPU
	}
	return fmt.Sprintf("load %s from %s: needs %s of %s, %s free of the %s budget",
		e.Model, e.Source, HumanBytes(e.Need), where, HumanBytes(e.Free), HumanBytes(e.Budget))
}

// Is makes errors.Is(err, ErrNoMemory) true for a budget refusal.
func (e *BudgetError) Is(target error) bool { return target == ErrNoMemory }
