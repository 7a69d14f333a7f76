package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/safetensors"
)

// The push transport (docs/PROTOCOL.md §8): POST /v1/push stages a version,
// upgrades the connection, hands the writer the staged slabs' handles and a
// scratch memfd, then serves one JSON line per request until commit or
// abort. The connection is the lease: when it ends without a commit, the
// push is aborted and its memory freed.

const (
	// DefaultPushTimeout is the daemon's --push-timeout default.
	DefaultPushTimeout = 10 * time.Minute
	// maxPushLine bounds one line of a push's connection, either way.
	maxPushLine = 16 << 20
	// maxPushRequest bounds POST /v1/push's body: the manifest and the
	// given files (tokenizers run to tens of MB in base64).
	maxPushRequest = 1 << 30
	// defaultScratchBytes is the scratch's size unless a tensor is larger
	// or the push smaller.
	defaultScratchBytes = 512 << 20
)

// activePush is a push whose connection is open.
type activePush struct {
	st     *store.Staged
	pid    int32
	uid    uint32
	cancel context.CancelCauseFunc
}

// push is what one push's connection serves.
type push struct {
	s       *Server
	st      *store.Staged
	writer  string // "the writer pid N"
	pid     int32
	sizes   map[string]int64
	scratch *scratch
	handles bool // the writer was handed GPU handles
}

// errCancelled is the cause of a push ended by POST /v1/cancel.
var errCancelled = errors.New("cancelled by POST /v1/cancel (weightfs cancel)")

// servePush answers POST /v1/push: refusals as ordinary JSON answers, then
// 101 and the push's lines on the hijacked connection.
func (s *Server) servePush(w http.ResponseWriter, r *http.Request) {
	refuse := func(err error) {
		s.metrics.pushes.WithLabelValues("error").Inc()
		writeError(w, err)
	}
	if !headerHas(r.Header, "Connection", "upgrade") || !strings.EqualFold(r.Header.Get("Upgrade"), PushUpgrade) {
		refuse(errorOf(store.ErrInvalid, "push: the request must upgrade the connection (Connection: Upgrade, Upgrade: %s)", PushUpgrade))
		return
	}
	peer, ok := peerOf(r.Context())
	if !ok {
		refuse(errors.New("push: the connection's peer is unknown: pushes are served on the control socket only"))
		return
	}
	var req PushRequest
	if !readJSONMax(w, r, &req, maxPushRequest) {
		s.metrics.pushes.WithLabelValues("error").Inc()
		return
	}
	manifest := make([]store.PushTensor, len(req.Tensors))
	for i, t := range req.Tensors {
		manifest[i] = store.PushTensor{Name: t.Name, DType: safetensors.DType(t.DType), Shape: t.Shape}
	}
	base := 0 // what the store plans against: the current version when staging
	if m := s.store.Model(req.Name); m != nil {
		if v := m.Current(); v != nil {
			base = v.Number()
		}
	}
	writer := fmt.Sprintf("pid %d (uid %d)", peer.Cred.Pid, peer.Cred.Uid)
	st, err := s.store.Stage(req.Name, manifest, req.Files, store.StageOptions{Writer: writer})
	if err != nil {
		refuse(err)
		return
	}
	if s.pushEnded != nil {
		defer s.pushEnded(req.Name) // deferred first: runs last
	}
	// Registered at once, so that a cancel from now on reaches it.
	ctx, cancel := context.WithCancelCause(s.ctx)
	defer cancel(nil)
	if s.pushTimeout > 0 {
		var stop context.CancelFunc
		ctx, stop = context.WithTimeoutCause(ctx, s.pushTimeout,
			fmt.Errorf("not committed within the push timeout (%s)", s.pushTimeout))
		defer stop()
	}
	s.addPush(&activePush{st: st, pid: peer.Cred.Pid, uid: peer.Cred.Uid, cancel: cancel})
	defer s.dropPush(st)
	p := &push{s: s, st: st, writer: fmt.Sprintf("the writer pid %d", peer.Cred.Pid), pid: peer.Cred.Pid}
	msg, err := p.staged(base)
	if err == nil {
		p.scratch, err = newScratch(msg.ScratchBytes)
	}
	if err != nil {
		st.Abort("the daemon could not start it: " + err.Error())
		refuse(fmt.Errorf("push %s: %w", req.Name, err))
		return
	}
	defer p.scratch.Close()
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		st.Abort("the daemon could not take over the connection: " + err.Error())
		refuse(fmt.Errorf("push %s: %w", req.Name, err))
		return
	}
	defer conn.Close()
	mc, ok := conn.(unixMsgConn)
	if !ok {
		st.Abort("the connection cannot carry file descriptors")
		s.metrics.pushes.WithLabelValues("error").Inc()
		return
	}
	mc.SetDeadline(time.Time{})

	_, total := st.Progress()
	s.log.Info("push started", "model", req.Name, "writer", writer, "tensors", len(msg.Tensors), "bytes", total,
		"base", base, "same_layout", msg.SameLayout)

	head := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + PushUpgrade + "\r\nConnection: Upgrade\r\n\r\n"
	line, _ := json.Marshal(stagedMessage{Staged: msg})
	// One sendmsg for the 101 and the staged line: the descriptor arrives
	// with the writer's first recvmsg, whatever it reads first.
	if err := sendWithFD(mc, append([]byte(head), append(line, '\n')...), int(p.scratch.file.Fd())); err != nil {
		p.end("aborted", fmt.Sprintf("%s: sending the staged message failed: %v", p.writer, err))
		return
	}
	p.serve(ctx, mc, brw.Reader)
}

// staged is the staged message for st; base is the version planned against.
func (p *push) staged(base int) (*StagedPush, error) {
	st := p.st
	ts, err := st.Tensors()
	if err != nil {
		return nil, err
	}
	plan := st.Plan()
	msg := &StagedPush{Name: st.Name(), Base: base, SameLayout: plan.SameAsBase, TensorBytes: plan.TensorBytes,
		TimeoutSeconds: p.s.pushTimeout.Seconds(), Files: []StagedFile{}, Tensors: make([]StagedTensor, 0, len(ts))}
	var gpus []string
	if g := p.s.store.GPUs(); g != nil {
		for _, x := range g.List() {
			gpus = append(gpus, x.UUID())
		}
	}
	for _, f := range plan.Files {
		sf := StagedFile{Path: f.Path, SlabBytes: f.SlabSize, Replicas: []SlabReplica{}}
		for _, gpu := range gpus {
			slab, err := st.Slab(f.Path, gpu)
			if err != nil {
				return nil, err
			}
			h, err := slab.IPCHandle()
			if err != nil {
				return nil, fmt.Errorf("export the staged slab of %s on GPU %s: %w", f.Path, gpu, err)
			}
			sf.Replicas = append(sf.Replicas, SlabReplica{GPU: gpu, Handle: h[:]})
			p.handles = true
		}
		msg.Files = append(msg.Files, sf)
	}
	p.sizes = make(map[string]int64, len(ts))
	var largest int64
	for _, t := range ts {
		msg.Tensors = append(msg.Tensors, StagedTensor{Name: t.Name, File: t.File, DType: string(t.DType),
			Shape: t.Shape, Size: t.Size, SlabOffset: t.SlabOffset})
		p.sizes[t.Name] = t.Size
		largest = max(largest, t.Size)
	}
	msg.ScratchBytes = max(largest, min(p.s.scratchBytes, plan.TensorBytes))
	return msg, nil
}

// serve answers the writer's lines until the push ends: a commit, an
// abort, the connection closing, the timeout, a cancel or the daemon
// stopping.
func (p *push) serve(ctx context.Context, conn unixMsgConn, r *bufio.Reader) {
	type line struct {
		b   []byte
		err error
	}
	lines := make(chan line)
	done := make(chan struct{})
	defer close(done)
	go func() { // ends when the connection closes (serve's caller) or serve returns
		for {
			b, err := readPushLine(r, maxPushLine)
			select {
			case lines <- line{b, err}:
			case <-done:
				return
			}
			if err != nil && !errors.Is(err, errLineTooLong) {
				return
			}
		}
	}()
	// A writer that stops reading must not hold the push past its end.
	stop := context.AfterFunc(ctx, func() { conn.SetWriteDeadline(time.Now().Add(5 * time.Second)) })
	defer stop()
	send := func(v any) error {
		b, _ := json.Marshal(v)
		_, err := conn.Write(append(b, '\n'))
		return err
	}
	for {
		select {
		case <-ctx.Done():
			cause := context.Cause(ctx)
			p.end("cancelled", cause.Error())
			body := ErrorBody{Code: CodeCanceled, Message: fmt.Sprintf("push %s: aborted: %v", p.st.Name(), cause)}
			send(PushAnswer{Error: &body})
			return
		case l := <-lines:
			if errors.Is(l.err, errLineTooLong) {
				if send(errorLine(errorOf(store.ErrInvalid, "push %s: a line longer than %d bytes", p.st.Name(), maxPushLine))) != nil {
					p.end("aborted", p.writer+" stopped reading its answers")
					return
				}
				continue
			}
			if l.err != nil {
				reason := p.writer + " closed its connection before committing"
				if !errors.Is(l.err, io.EOF) {
					reason += " (" + l.err.Error() + ")"
				}
				p.end("aborted", reason)
				return
			}
			answer, over := p.handle(ctx, l.b)
			if err := send(answer); err != nil && !over {
				p.end("aborted", fmt.Sprintf("%s: answering failed: %v", p.writer, err))
				return
			}
			if over {
				return
			}
		}
	}
}

// end aborts the push (unless it already ended) and counts it as result.
func (p *push) end(result, reason string) {
	if err := p.st.Abort(reason); err == nil {
		p.s.metrics.pushes.WithLabelValues(result).Inc()
	}
}

func errorLine(err error) PushAnswer {
	body, _ := errorBody(err)
	return PushAnswer{Error: &body}
}

// handle answers one line; over says that the push has ended.
func (p *push) handle(ctx context.Context, b []byte) (answer any, over bool) {
	op, err := parsePushLine(b)
	if err != nil {
		return errorLine(fmt.Errorf("push %s: %w", p.st.Name(), err)), false
	}
	switch op.Op {
	case "written":
		for _, name := range op.names {
			if err := p.st.MarkWritten(name, op.GPU); err != nil {
				return errorLine(err), false
			}
		}
	case "write":
		for _, w := range op.writes {
			data, err := p.scratchRange(w)
			if err == nil {
				err = p.st.WriteTensor(w.Name, data)
			}
			if err != nil {
				return errorLine(err), false
			}
		}
	case "commit":
		return p.commit(ctx, op.Released)
	case "abort":
		reason := p.writer + " aborted"
		if op.Reason != "" {
			reason += ": " + op.Reason
		}
		p.end("aborted", reason)
		return PushAnswer{Aborted: true}, true
	}
	done, _ := p.st.Progress()
	return okAnswer{OK: true, Done: done}, false
}

// scratchRange is the part of the scratch write w names, checked against
// the manifest and the scratch's bounds.
func (p *push) scratchRange(w PushWrite) ([]byte, error) {
	size, ok := p.sizes[w.Name]
	if !ok {
		return nil, errorOf(store.ErrInvalid, "push %s: write: tensor %q is not in the manifest", p.st.Name(), w.Name)
	}
	n := int64(len(p.scratch.mem))
	if w.At < 0 || w.At > n || size > n-w.At {
		return nil, errorOf(store.ErrInvalid, "push %s: write: tensor %q: bytes %d to %d are outside the scratch (%d bytes)",
			p.st.Name(), w.Name, w.At, w.At+size, n)
	}
	return p.scratch.mem[w.At : w.At+size], nil
}

// commit commits the push. A commit refused while tensors are missing
// leaves the push open; any other failure has ended it.
func (p *push) commit(ctx context.Context, released bool) (any, bool) {
	v, err := p.st.Commit(ctx)
	if err != nil {
		open := false
		for _, st := range p.s.store.Pushes() {
			open = open || st == p.st
		}
		if !open {
			result := "error"
			if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
				result = "cancelled"
			}
			p.s.metrics.pushes.WithLabelValues(result).Inc()
		}
		return errorLine(err), !open
	}
	if p.handles && !released {
		// It may still map the slabs, which are the version's now (§8):
		// its GPU memory drains as with any holder of the handles.
		v.NoteHandleHolder(int(p.pid))
	}
	_, total := p.st.Progress()
	p.s.metrics.pushes.WithLabelValues("ok").Inc()
	p.s.metrics.pushBytes.Add(float64(total))
	current := false
	if m := p.s.store.Model(v.Model()); m != nil {
		current = m.Current() == v
	}
	vj := versionOf(v, current)
	return PushAnswer{Version: &vj}, true
}

// headerHas reports whether a comma-separated header holds token.
func headerHas(h http.Header, key, token string) bool {
	for _, v := range h.Values(key) {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// errLineTooLong is a line over the limit; it was skipped to its end.
var errLineTooLong = errors.New("line too long")

// readPushLine reads one '\n'-terminated line of at most max bytes. A
// longer one is read to its end and dropped (errLineTooLong) so that the
// next line can be read.
func readPushLine(r *bufio.Reader, max int) ([]byte, error) {
	var out []byte
	tooLong := false
	for {
		chunk, err := r.ReadSlice('\n')
		if !tooLong {
			if len(out)+len(chunk) > max+1 {
				tooLong, out = true, nil
			} else {
				out = append(out, chunk...)
			}
		}
		switch {
		case err == nil && tooLong:
			return nil, errLineTooLong
		case err == nil:
			return bytes.TrimSuffix(out, []byte{'\n'}), nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(bytes.TrimSpace(out)) > 0 && !tooLong:
			return nil, io.ErrUnexpectedEOF // a last line without its newline is no request
		default:
			return nil, err
		}
	}
}

// pushLine is a parsed line of a writer.
type pushLine struct {
	PushOp
	names  []string    // written
	writes []PushWrite // write
}

// parsePushLine parses and checks one line of a writer; it never panics on
// input (FuzzParsePushLine).
func parsePushLine(b []byte) (pushLine, error) {
	var raw struct {
		Op       string          `json:"op"`
		GPU      string          `json:"gpu"`
		Tensors  json.RawMessage `json:"tensors"`
		Reason   string          `json:"reason"`
		Released bool            `json:"released"`
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&raw); err != nil {
		return pushLine{}, errorOf(store.ErrInvalid, "a malformed line: %v", err)
	}
	if dec.More() {
		return pushLine{}, errorOf(store.ErrInvalid, "a malformed line: more than one JSON value")
	}
	l := pushLine{PushOp: PushOp{Op: raw.Op, GPU: raw.GPU, Reason: raw.Reason, Released: raw.Released}}
	hasTensors := len(raw.Tensors) > 0 && string(raw.Tensors) != "null"
	if raw.Released && raw.Op != "commit" {
		return l, errorOf(store.ErrInvalid, `"released" belongs to "commit" only`)
	}
	switch raw.Op {
	case "written":
		if raw.GPU == "" {
			return l, errorOf(store.ErrInvalid, `"written" needs "gpu", the UUID of the GPU written to`)
		}
		if err := json.Unmarshal(raw.Tensors, &l.names); err != nil || len(l.names) == 0 {
			return l, errorOf(store.ErrInvalid, `"written" needs "tensors", a list of one or more tensor names`)
		}
	case "write":
		if err := json.Unmarshal(raw.Tensors, &l.writes); err != nil || len(l.writes) == 0 {
			return l, errorOf(store.ErrInvalid, `"write" needs "tensors", a list of one or more {"name", "at"}`)
		}
	case "commit", "abort":
		if hasTensors || raw.GPU != "" {
			return l, errorOf(store.ErrInvalid, "%q takes no tensors and no gpu", raw.Op)
		}
	case "":
		return l, errorOf(store.ErrInvalid, `a line without "op" (written, write, commit or abort)`)
	default:
		return l, errorOf(store.ErrInvalid, "unknown op %q (want written, write, commit or abort)", raw.Op)
	}
	return l, nil
}

func (s *Server) addPush(p *activePush) {
	s.pushMu.Lock()
	defer s.pushMu.Unlock()
	s.pushes[p.st] = p
}

func (s *Server) dropPush(st *store.Staged) {
	s.pushMu.Lock()
	defer s.pushMu.Unlock()
	delete(s.pushes, st)
}

// cancelPushes aborts the staged pushes of name and returns them as they
// were. Each is aborted here, before the answer, so that its memory is free
// when the canceller hears back; its connection then says so and closes.
func (s *Server) cancelPushes(name string) []Push {
	var out []Push
	for _, p := range s.Pushes() {
		if p.Name == name {
			out = append(out, p)
		}
	}
	for _, st := range s.store.Pushes() {
		if st.Name() != name {
			continue
		}
		if st.Abort(errCancelled.Error()) == nil {
			s.metrics.pushes.WithLabelValues("cancelled").Inc()
		}
		s.pushMu.Lock()
		if ap := s.pushes[st]; ap != nil {
			ap.cancel(errCancelled)
		}
		s.pushMu.Unlock()
	}
	return out
}

// Pushes are the staged pushes, by model name.
func (s *Server) Pushes() []Push {
	out := []Push{}
	for _, st := range s.store.Pushes() {
		done, total := st.Progress()
		p := Push{Name: st.Name(), Writer: st.Writer(), Started: st.Started().UTC().Format(time.RFC3339),
			Done: done, Total: total}
		for _, f := range st.Plan().Files {
			p.Tensors += len(f.Tensors)
		}
		p.TensorsWritten = p.Tensors - len(st.Missing())
		s.pushMu.Lock()
		if ap := s.pushes[st]; ap != nil {
			p.PID, p.UID = ap.pid, ap.uid
		}
		s.pushMu.Unlock()
		out = append(out, p)
	}
	return out
}
