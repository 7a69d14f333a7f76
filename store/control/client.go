package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"syscall"
)

// Client talks to a running daemon over its control socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client of the daemon listening on socket.
func NewClient(socket string) *Client {
	return &Client{socket: socket, http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}}
}

// Socket is the control socket's path.
func (c *Client) Socket() string { return c.socket }

// explain turns a failed connection into one line a person can act on.
func (c *Client) explain(err error) error {
	switch {
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("permission denied on the control socket %s (it is 0600: run as the daemon's user or root)", c.socket)
	case errors.Is(err, syscall.ENOENT), errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("no weightfs daemon at %s: is `weightfs mount` running? (--socket or WEIGHTFS_SOCKET name another socket)", c.socket)
	}
	return fmt.Errorf("control socket %s: %w", c.socket, err)
}

func (c *Client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://weightfs"+path, rd)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, c.explain(err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		var e errorAnswer
		json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&e) // a body that is not one leaves e empty
		return nil, newError(resp.StatusCode, e.Error)
	}
	return resp, nil
}

// call sends a request and decodes its JSON answer into out.
func (c *Client) call(ctx context.Context, method, path string, body, out any) error {
	resp, err := c.do(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("control socket %s: bad answer to %s %s: %w", c.socket, method, path, err)
	}
	return nil
}

// List lists models and versions (`weightfs ls`).
func (c *Client) List(ctx context.Context) (*List, error) {
	var out List
	if err := c.call(ctx, http.MethodGet, "/v1/models", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Status is the daemon's status (`weightfs status`).
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var out Status
	if err := c.call(ctx, http.MethodGet, "/v1/status", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Unload removes version (0: every version) of a model.
func (c *Client) Unload(ctx context.Context, name string, version int) ([]Version, error) {
	var out Unloaded
	if err := c.call(ctx, http.MethodPost, "/v1/unload", VersionRequest{Name: name, Version: version}, &out); err != nil {
		return nil, err
	}
	return out.Unloaded, nil
}

// Rollback makes version (0: the newest one older than the current one) of a
// model its current version, and returns it.
func (c *Client) Rollback(ctx context.Context, name string, version int) (*Version, error) {
	var out RolledBack
	if err := c.call(ctx, http.MethodPost, "/v1/rollback", VersionRequest{Name: name, Version: version}, &out); err != nil {
		return nil, err
	}
	return &out.Version, nil
}

// Verify compares version (0: the current one) of a model with its source.
func (c *Client) Verify(ctx context.Context, name string, version int) (*Verified, error) {
	var out Verified
	if err := c.call(ctx, http.MethodPost, "/v1/verify", VersionRequest{Name: name, Version: version}, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Cancel cancels the loads and the staged push of name in progress in the
// daemon and returns them; none is an *Error matching store.ErrNotFound.
func (c *Client) Cancel(ctx context.Context, name string) (*Cancelled, error) {
	var out Cancelled
	if err := c.call(ctx, http.MethodPost, "/v1/cancel", CancelRequest{Name: name}, &out); err != nil {
		return nil, err
	}
	return &out, nil
}

// Load loads the folder path as the next version of name; progress, if set,
// receives the bytes copied and the total as the daemon reports them.
// A relative path is made absolute here: the daemon's working directory is
// not the caller's (an empty one is sent as it is, and refused). Cancelling
// ctx stops waiting, not the load: the daemon goes on and commits it (Cancel
// stops it). The daemon's refusals and failures, before or during the
// stream, come back as an *Error; a load cancelled in the daemon is one with
// CodeCanceled, on which errors.Is(err, context.Canceled) holds.
func (c *Client) Load(ctx context.Context, name, path string, progress func(done, total int64)) (*Version, error) {
	abs := path
	if path != "" {
		var err error
		if abs, err = filepath.Abs(path); err != nil {
			return nil, fmt.Errorf("load %s: %w", path, err)
		}
	}
	resp, err := c.do(ctx, http.MethodPost, "/v1/load", LoadRequest{Name: name, Path: abs})
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var ev LoadEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return nil, fmt.Errorf("load %s: bad answer from the daemon: %w", name, err)
		}
		switch {
		case ev.Error != nil:
			return nil, newError(0, *ev.Error)
		case ev.Version != nil:
			return ev.Version, nil
		case progress != nil:
			progress(ev.Done, ev.Total)
		}
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("load %s: %w", name, err)
	}
	return nil, fmt.Errorf("load %s: the daemon closed the connection without an answer", name)
}
