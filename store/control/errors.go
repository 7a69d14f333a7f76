package control

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/http"

	"github.com/weightfs/weightfs/store"
)

// Error codes on the wire, one per kind of store error (docs/CONTROL.md).
const (
	CodeInvalid  = "invalid"   // 400: the request is wrong
	CodeNotFound = "not_found" // 404: no such model or version
	CodeBusy     = "busy"      // 409: conflicts with the daemon's state
	CodeNoMemory = "no_memory" // 507: a budget or the machine cannot hold it
	CodeCanceled = "cancelled" // 409: the load was cancelled (POST /v1/cancel, the daemon stopping)
	CodeInternal = "internal"  // 500: anything else
	// CodeForbidden (403): the peer's uid may not drive the daemon. It is
	// the socket's answer, not a store error's; on the client's side it
	// matches fs.ErrPermission.
	CodeForbidden = "forbidden"
)

// ErrorBody is a failed request's answer, {"error": ErrorBody}, and a failed
// load's last event.
type ErrorBody struct {
	Code    string             `json:"code"`
	Message string             `json:"message"`
	Budget  *store.BudgetError `json:"budget,omitempty"`
}

// errorAnswer is the JSON of a failed request.
type errorAnswer struct {
	Error ErrorBody `json:"error"`
}

var codes = []struct {
	kind   error
	code   string
	status int
}{
	{store.ErrInvalid, CodeInvalid, http.StatusBadRequest},
	{store.ErrNotFound, CodeNotFound, http.StatusNotFound},
	{store.ErrBusy, CodeBusy, http.StatusConflict},
	{store.ErrNoMemory, CodeNoMemory, http.StatusInsufficientStorage},
	{context.Canceled, CodeCanceled, http.StatusConflict},
}

// errorBody maps a store error to its wire form and HTTP status.
func errorBody(err error) (ErrorBody, int) {
	body := ErrorBody{Code: CodeInternal, Message: err.Error()}
	status := http.StatusInternalServerError
	for _, c := range codes {
		if errors.Is(err, c.kind) {
			body.Code, status = c.code, c.status
			break
		}
	}
	var be *store.BudgetError
	if errors.As(err, &be) {
		body.Budget = be
	}
	return body, status
}

// Error is a request the daemon refused or failed, as the client sees it.
// errors.Is matches the store's error kinds (store.ErrNotFound, …) and
// errors.As finds a *store.BudgetError when a budget refused a load.
type Error struct {
	// Status is the HTTP status (0 for an error inside a load's stream).
	Status int
	ErrorBody
}

func (e *Error) Error() string { return e.Message }

// Unwrap gives the store's error kind and the budget, when there is one.
func (e *Error) Unwrap() []error {
	var out []error
	for _, c := range codes {
		if c.code == e.Code {
			out = append(out, c.kind)
		}
	}
	if e.Code == CodeForbidden {
		out = append(out, fs.ErrPermission)
	}
	if e.Budget != nil {
		out = append(out, e.Budget)
	}
	return out
}

// kindError is an error of one of the store's kinds raised here, with its
// own message.
type kindError struct{ kind, err error }

func (e *kindError) Error() string   { return e.err.Error() }
func (e *kindError) Unwrap() []error { return []error{e.err, e.kind} }

func errorOf(kind error, format string, args ...any) error {
	return &kindError{kind: kind, err: fmt.Errorf(format, args...)}
}

// newError rebuilds an Error from its wire form; an answer without one (not
// from this API) is CodeInternal.
func newError(status int, body ErrorBody) *Error {
	if body.Code == "" {
		body.Code = CodeInternal
	}
	if body.Message == "" {
		body.Message = fmt.Sprintf("the daemon answered %d %s", status, http.StatusText(status))
	}
	return &Error{Status: status, ErrorBody: body}
}
