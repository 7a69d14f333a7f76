package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"

	"golang.org/x/sys/unix"
)

// PushSession is a push in progress on its own connection (PROTOCOL.md
// §8): write each tensor once (WriteHost, or Written after copying into a
// staged slab), then Commit. Closing it, or its process exiting, aborts
// the push. Its methods must not be called concurrently.
type PushSession struct {
	conn    *net.UnixConn
	r       *bufio.Reader
	staged  *StagedPush
	scratch []byte // the writer's mapping of the scratch
	sizes   map[string]int64
	stop    func() bool // ends the context watch
	once    sync.Once
	err     error // what ended the session
}

// Push stages a push of name with the manifest tensors and the non-weight
// files (nil: the base's) and returns its session. Cancelling ctx closes the
// session, which aborts the push. The daemon's refusals are *Error.
func (c *Client) Push(ctx context.Context, name string, tensors []PushTensor, files map[string][]byte) (*PushSession, error) {
	body, err := json.Marshal(PushRequest{Name: name, Tensors: tensors, Files: files})
	if err != nil {
		return nil, fmt.Errorf("push %s: %w", name, err)
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", c.socket)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, c.explain(err)
	}
	conn := nc.(*net.UnixConn)
	p := &PushSession{conn: conn}
	p.stop = context.AfterFunc(ctx, func() { conn.Close() })
	staged, err := p.open(name, body)
	if err != nil {
		p.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	p.staged = staged
	return p, nil
}

// fdReader reads a Unix connection with recvmsg, keeping the descriptors
// that come with the bytes: the daemon attaches the scratch to the sendmsg
// of its answer.
type fdReader struct {
	conn *net.UnixConn
	fds  []int
}

func (r *fdReader) Read(b []byte) (int, error) {
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := r.conn.ReadMsgUnix(b, oob)
	if oobn > 0 {
		if msgs, perr := unix.ParseSocketControlMessage(oob[:oobn]); perr == nil {
			for _, m := range msgs {
				if fds, err := unix.ParseUnixRights(&m); err == nil {
					r.fds = append(r.fds, fds...)
				}
			}
		}
	}
	if n == 0 && err == nil {
		err = io.EOF
	}
	return n, err
}

// open sends the request and reads the 101 and the staged message.
func (p *PushSession) open(name string, body []byte) (*StagedPush, error) {
	req := fmt.Sprintf("POST /v1/push HTTP/1.1\r\nHost: weightfs\r\nConnection: Upgrade\r\nUpgrade: %s\r\n"+
		"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n", PushUpgrade, len(body))
	if _, err := p.conn.Write(append([]byte(req), body...)); err != nil {
		return nil, fmt.Errorf("push %s: send the request: %w", name, err)
	}
	fr := &fdReader{conn: p.conn}
	defer func() { // a descriptor kept is the scratch, mapped below; the rest go
		for _, fd := range fr.fds {
			unix.Close(fd)
		}
	}()
	p.r = bufio.NewReaderSize(fr, 64<<10)
	resp, err := http.ReadResponse(p.r, nil)
	if err != nil {
		return nil, fmt.Errorf("push %s: bad answer from the daemon: %w", name, err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer resp.Body.Close()
		var e errorAnswer
		json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&e)
		return nil, newError(resp.StatusCode, e.Error)
	}
	line, err := readPushLine(p.r, maxPushLine)
	if err != nil {
		return nil, fmt.Errorf("push %s: reading the staged message: %w", name, err)
	}
	var msg stagedMessage
	if err := json.Unmarshal(line, &msg); err != nil || msg.Staged == nil {
		return nil, fmt.Errorf("push %s: bad staged message from the daemon: %v", name, err)
	}
	if len(fr.fds) != 1 {
		return nil, fmt.Errorf("push %s: the staged message came with %d file descriptors, want 1 (the scratch)", name, len(fr.fds))
	}
	if n := msg.Staged.ScratchBytes; n > 0 {
		var st unix.Stat_t
		if err := unix.Fstat(fr.fds[0], &st); err != nil || st.Size < n {
			return nil, fmt.Errorf("push %s: the scratch is not the %d bytes announced (%v)", name, n, err)
		}
		if p.scratch, err = unix.Mmap(fr.fds[0], 0, int(n), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
			return nil, fmt.Errorf("push %s: map the scratch: %w", name, err)
		}
	}
	p.sizes = map[string]int64{}
	for _, t := range msg.Staged.Tensors {
		p.sizes[t.Name] = t.Size
	}
	return msg.Staged, nil
}

// Staged is the daemon's staged message: the layout, the slabs' handles,
// the scratch's size.
func (p *PushSession) Staged() *StagedPush { return p.staged }

// Scratch is the writer's mapping of the scratch (shared with the daemon).
func (p *PushSession) Scratch() []byte { return p.scratch }

// call sends one line and reads its answer; an answer with an error is an
// *Error (Status 0).
func (p *PushSession) call(op any) (*PushAnswer, error) {
	if p.err != nil {
		return nil, p.err
	}
	b, err := json.Marshal(op)
	if err != nil {
		return nil, err
	}
	_, werr := p.conn.Write(append(b, '\n'))
	// A daemon that ended the push (a timeout, a cancel) said why before it
	// closed: read that even when the line could not be sent.
	line, err := readPushLine(p.r, maxPushLine)
	if err != nil && werr != nil {
		return nil, p.fail(fmt.Errorf("push %s: send: %w", p.staged.Name, werr))
	}
	if err != nil {
		return nil, p.fail(fmt.Errorf("push %s: the daemon closed the push without an answer: %w", p.staged.Name, err))
	}
	var a PushAnswer
	if err := json.Unmarshal(line, &a); err != nil {
		return nil, p.fail(fmt.Errorf("push %s: bad answer from the daemon: %w", p.staged.Name, err))
	}
	if a.Error != nil {
		return &a, newError(0, *a.Error)
	}
	return &a, nil
}

func (p *PushSession) fail(err error) error {
	p.err = err
	return err
}

// WriteHost writes tensor name's bytes through the scratch and waits until
// the daemon has copied them out.
func (p *PushSession) WriteHost(name string, data []byte) error {
	size, ok := p.sizes[name]
	if !ok {
		return fmt.Errorf("push %s: tensor %q is not in the manifest", p.staged.Name, name)
	}
	if int64(len(data)) != size {
		return fmt.Errorf("push %s: tensor %q is %d bytes, got %d", p.staged.Name, name, size, len(data))
	}
	copy(p.scratch, data) // the scratch holds the largest tensor
	_, err := p.call(PushOp{Op: "write", Tensors: []PushWrite{{Name: name, At: 0}}})
	return err
}

// WriteScratch asks the daemon to copy tensors already placed in the
// scratch (Scratch) at their offsets.
func (p *PushSession) WriteScratch(writes ...PushWrite) error {
	_, err := p.call(PushOp{Op: "write", Tensors: writes})
	return err
}

// Written tells the daemon that these tensors were copied into their
// staged slabs on GPU gpu (a UUID), their copies complete.
func (p *PushSession) Written(gpu string, names ...string) error {
	_, err := p.call(PushOp{Op: "written", GPU: gpu, Tensors: names})
	return err
}

// Commit makes the push the model's next version. Refused for missing
// tensors, the push stays open; any other failure has ended it.
func (p *PushSession) Commit() (*Version, error) { return p.commit(false) }

// CommitReleased commits saying that this process has closed every mapping
// of the staged slabs it was handed (PROTOCOL §3.1): it is not recorded as a
// holder of the version.
func (p *PushSession) CommitReleased() (*Version, error) { return p.commit(true) }

func (p *PushSession) commit(released bool) (*Version, error) {
	a, err := p.call(PushOp{Op: "commit", Released: released})
	if err != nil {
		return nil, err
	}
	if a.Version == nil {
		return nil, p.fail(fmt.Errorf("push %s: the daemon answered the commit without a version", p.staged.Name))
	}
	p.fail(fmt.Errorf("push %s: committed as %s", p.staged.Name, a.Version.Name))
	return a.Version, nil
}

// Abort drops the push.
func (p *PushSession) Abort(reason string) error {
	_, err := p.call(PushOp{Op: "abort", Reason: reason})
	if err == nil {
		p.fail(fmt.Errorf("push %s: aborted", p.staged.Name))
	}
	return err
}

// Close closes the connection (aborting the push unless it was committed
// or aborted) and unmaps the scratch.
func (p *PushSession) Close() error {
	var err error
	p.once.Do(func() {
		p.stop()
		err = p.conn.Close()
		if p.scratch != nil {
			if uerr := unix.Munmap(p.scratch); err == nil {
				err = uerr
			}
			p.scratch = nil
		}
		if errors.Is(err, net.ErrClosed) {
			err = nil
		}
	})
	return err
}
