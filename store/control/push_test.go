package control

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/weightfs/weightfs/cuda"
	"github.com/weightfs/weightfs/cuda/cudatest"
	"github.com/weightfs/weightfs/store"
	"github.com/weightfs/weightfs/store/safetensors"
)

// The push transport end to end: a real socket, the real client, a store
// on memfds and, where it matters, fake GPUs.

type pushHarness struct {
	*harness
	fake  *cudatest.Fake // nil without GPUs
	ended chan string    // a push's connection is done with
	sock  string
}

// newPushHarness serves a fresh store over gpus fake GPUs; opts tunes the
// socket; ctx, if set, is the server's lifetime.
func newPushHarness(t *testing.T, gpus int, opts ListenOptions, fake func(l *Listener), ctx context.Context) *pushHarness {
	t.Helper()
	var sopts store.Options
	h := &pushHarness{ended: make(chan string, 16)}
	if gpus > 0 {
		h.fake = cudatest.New(cudatest.Options{})
		t.Cleanup(func() { h.fake.CheckClean(t) })
		driver, err := h.fake.Driver()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { driver.Close() })
		var ids []string
		for i := range gpus {
			ids = append(ids, fmt.Sprint(i))
		}
		g, err := store.OpenGPUs(driver, ids)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { g.Close() })
		sopts.GPUs = g
	}
	sopts.Logger = quiet
	st := store.New(store.OpenMemfdArena(), sopts)
	t.Cleanup(func() { st.Close() })
	srv := NewServer(st, Options{Logger: quiet, Context: ctx})
	srv.scratchBytes = 64 // small: tensors larger than the default size the scratch
	srv.pushEnded = func(name string) { h.ended <- name }
	h.sock = socketPath(t)
	l, err := ListenWith(h.sock, opts)
	if err != nil {
		t.Fatal(err)
	}
	if fake != nil {
		fake(l)
	}
	sctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		Serve(sctx, l, srv.Handler(), quiet, "control socket")
	}()
	t.Cleanup(func() { cancel(); <-done })
	h.harness = &harness{st: st, srv: srv, c: NewClient(h.sock)}
	return h
}

// testManifest is three tensors of odd sizes and dtypes.
func testManifest() []PushTensor {
	return []PushTensor{
		{Name: "embed", DType: "BF16", Shape: []int64{3, 50}},
		{Name: "norm", DType: "F32", Shape: []int64{7}},
		{Name: "head", DType: "U8", Shape: []int64{1001}},
	}
}

// tensorData makes random bytes for each tensor of a staged push.
func tensorData(staged *StagedPush, seed uint64) map[string][]byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	out := map[string][]byte{}
	for _, t := range staged.Tensors {
		b := make([]byte, t.Size)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		out[t.Name] = b
	}
	return out
}

// checkVersion reads the model's current version back: it is number, and
// its weights files hold data.
func checkVersion(t *testing.T, st *store.Store, name string, number int, data map[string][]byte) *store.Version {
	t.Helper()
	m := st.Model(name)
	if m == nil || m.Current() == nil || m.Current().Number() != number {
		t.Fatalf("model %s: want current version %d", name, number)
	}
	v := m.Current()
	seen := 0
	for _, f := range v.Files() {
		if !strings.HasSuffix(f.Path(), ".safetensors") {
			continue
		}
		// Tensors written on a GPU reach the host image after the commit.
		if err := f.WaitReady(context.Background()); err != nil {
			t.Fatalf("%s: %v", f.Path(), err)
		}
		h, err := safetensors.Parse(f.Bytes())
		if err != nil {
			t.Fatalf("%s: %v", f.Path(), err)
		}
		for _, x := range h.Tensors {
			if !bytes.Equal(f.Bytes()[h.DataOffset()+x.Begin:h.DataOffset()+x.End], data[x.Name]) {
				t.Errorf("%s: tensor %s: other bytes than pushed", f.Path(), x.Name)
			}
			seen++
		}
	}
	if seen != len(data) {
		t.Errorf("%d tensors served, %d pushed", seen, len(data))
	}
	return v
}

// push stages a push of testManifest as m; the session closes at the end
// of the test.
func (h *pushHarness) push(t *testing.T) *PushSession {
	t.Helper()
	p, err := h.c.Push(context.Background(), "m", testManifest(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// checkFreed: no push staged, nothing reserved, no host memory taken.
func (h *pushHarness) checkFreed(t *testing.T) {
	t.Helper()
	if n := len(h.st.Pushes()); n != 0 {
		t.Errorf("%d pushes still staged", n)
	}
	if u := h.st.Usage(); u.HostReserved != 0 || u.HostBytes != 0 {
		t.Errorf("after the abort: %d bytes reserved, %d taken", u.HostReserved, u.HostBytes)
	}
	if h.st.Model("m") != nil {
		t.Error("an aborted push left a model")
	}
	if h.fake != nil && len(h.fake.Allocations()) != 0 {
		t.Errorf("GPU allocations left: %v", h.fake.Allocations())
	}
}

func TestPushThroughScratch(t *testing.T) {
	h := newPushHarness(t, 0, ListenOptions{}, nil, nil)
	ctx := context.Background()
	p, err := h.c.Push(ctx, "m", testManifest(), map[string][]byte{"config.json": []byte(`{"a": 1}`)})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	s := p.Staged()
	if s.Name != "m" || s.Base != 0 || s.SameLayout || s.TensorBytes != 300+28+1001 || s.ScratchBytes != 1001 ||
		len(s.Files) != 1 || s.Files[0].Path != "model.safetensors" || len(s.Files[0].Replicas) != 0 || len(s.Tensors) != 3 {
		t.Fatalf("staged %+v", s)
	}
	l, err := h.c.List(ctx)
	if err != nil || len(l.Pushes) != 1 || l.Pushes[0].PID != int32(os.Getpid()) || l.Pushes[0].Tensors != 3 ||
		l.Pushes[0].Total != s.TensorBytes || !strings.Contains(l.Pushes[0].Writer, fmt.Sprintf("pid %d", os.Getpid())) {
		t.Errorf("ls during the push: %+v %v", l, err)
	}
	data := tensorData(s, 1)
	for _, x := range s.Tensors {
		if err := p.WriteHost(x.Name, data[x.Name]); err != nil {
			t.Fatal(err)
		}
	}
	v, err := p.Commit()
	if err != nil {
		t.Fatal(err)
	}
	if v.Name != "m@1" || !v.Current || len(v.HandleHolders) != 0 {
		t.Errorf("committed %+v", v)
	}
	if got := <-h.ended; got != "m" {
		t.Errorf("ended %q", got)
	}
	cur := checkVersion(t, h.st, "m", 1, data)
	for _, f := range cur.Files() {
		if f.Path() == "config.json" && string(f.Bytes()) != `{"a": 1}` {
			t.Errorf("config.json: %q", f.Bytes())
		}
	}
	if st, _ := h.c.Status(ctx); len(st.Pushes) != 0 {
		t.Errorf("status after the commit lists pushes: %+v", st.Pushes)
	}

	// The same tensors again: the same layout, based on m@1.
	p2 := h.push(t)
	if s2 := p2.Staged(); s2.Base != 1 || !s2.SameLayout {
		t.Errorf("second push: base %d, same layout %v", s2.Base, s2.SameLayout)
	}
	data2 := tensorData(p2.Staged(), 2)
	for name, b := range data2 {
		if err := p2.WriteHost(name, b); err != nil {
			t.Fatal(err)
		}
	}
	if v, err := p2.Commit(); err != nil || v.Name != "m@2" {
		t.Fatalf("second commit: %+v %v", v, err)
	}
	<-h.ended
	checkVersion(t, h.st, "m", 2, data2)
}

// TestPushWrittenOnGPU: tensors written into the staged slab on a GPU
// (one through the scratch), then committed. The writer is recorded as a
// holder of the version, unless its commit says it closed its mappings
// (released): then the version can be freed while it lives.
func TestPushWrittenOnGPU(t *testing.T) {
	for _, released := range []bool{false, true} {
		t.Run(fmt.Sprintf("released=%v", released), func(t *testing.T) {
			h := newPushHarness(t, 2, ListenOptions{}, nil, nil)
			p := h.push(t)
			s := p.Staged()
			if len(s.Files) != 1 || len(s.Files[0].Replicas) != 2 {
				t.Fatalf("staged files %+v", s.Files)
			}
			rep := s.Files[0].Replicas[0]
			alloc, ok := h.fake.HandleAllocation(cuda.IPCHandle(rep.Handle))
			if !ok {
				t.Fatalf("the handle of GPU %s is no allocation", rep.GPU)
			}
			data := tensorData(s, 3)
			var onGPU []string
			for i, x := range s.Tensors {
				if i == 0 {
					if err := p.WriteHost(x.Name, data[x.Name]); err != nil {
						t.Fatal(err)
					}
					continue
				}
				if err := h.fake.Write(alloc.Ptr+cuda.DevicePtr(x.SlabOffset), data[x.Name]); err != nil {
					t.Fatal(err)
				}
				onGPU = append(onGPU, x.Name)
			}
			if err := p.Written(rep.GPU, onGPU...); err != nil {
				t.Fatal(err)
			}
			commit, want := p.Commit, []int{os.Getpid()}
			if released {
				commit, want = p.CommitReleased, nil
			}
			v, err := commit()
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(v.HandleHolders, want) {
				t.Errorf("handle holders %v, want %v", v.HandleHolders, want)
			}
			<-h.ended
			checkVersion(t, h.st, "m", 1, data) // the host image has the GPU-written tensors too
			if _, err := h.st.Unload("m", 0); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestPushRefusals(t *testing.T) {
	h := newPushHarness(t, 1, ListenOptions{}, nil, nil)
	ctx := context.Background()
	p := h.push(t)
	data := tensorData(p.Staged(), 4)
	gpu := p.Staged().Files[0].Replicas[0].GPU
	invalid := func(what string, err error, want string) {
		t.Helper()
		var e *Error
		if !errors.As(err, &e) || e.Code != CodeInvalid || !errors.Is(err, store.ErrInvalid) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v; want invalid, %q", what, err, want)
		}
	}
	if err := p.WriteHost("norm", data["norm"]); err != nil {
		t.Fatal(err)
	}
	invalid("a second write", p.WriteScratch(PushWrite{Name: "norm", At: 0}), `tensor "norm" was already written`)
	invalid("written after a write", p.Written(gpu, "norm"), "already written")
	invalid("out of the scratch", p.WriteScratch(PushWrite{Name: "head", At: 1}), "outside the scratch (1001 bytes)")
	invalid("negative offset", p.WriteScratch(PushWrite{Name: "head", At: -1}), "outside the scratch")
	invalid("huge offset", p.WriteScratch(PushWrite{Name: "head", At: 1 << 62}), "outside the scratch")
	invalid("unknown tensor", p.WriteScratch(PushWrite{Name: "nope", At: 0}), `"nope" is not in the manifest`)
	invalid("unknown GPU", p.Written("GPU-nope", "head"), "GPU-nope")
	invalid("no tensors", p.Written(gpu), `"written" needs "tensors"`)
	_, err := p.call(PushOp{Op: "fly"})
	invalid("unknown op", err, `unknown op "fly"`)
	_, err = p.Commit()
	invalid("an incomplete commit", err, `commit: 2 of 3 tensors not written: "embed", "head"`)
	// Still open: finish and commit.
	for _, name := range []string{"embed", "head"} {
		if err := p.WriteHost(name, data[name]); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := p.Commit(); err != nil {
		t.Fatal(err)
	}
	<-h.ended
	checkVersion(t, h.st, "m", 1, data)
	if _, err := h.st.Unload("m", 0); err != nil {
		t.Fatal(err)
	}

	// Refused before the upgrade: a bad manifest, a bad name.
	if _, err := h.c.Push(ctx, "m", []PushTensor{{Name: "x", DType: "Q7", Shape: []int64{1}}}, nil); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("an unknown dtype: %v", err)
	}
	if _, err := h.c.Push(ctx, "a/b", testManifest(), nil); !errors.Is(err, store.ErrInvalid) {
		t.Errorf("a bad name: %v", err)
	}
	// Without the upgrade headers.
	resp, err := h.c.http.Post("http://weightfs/v1/push", "application/json", strings.NewReader(`{"name": "m"}`))
	if err != nil || resp.StatusCode != 400 {
		t.Errorf("a push without the upgrade: %v %v", resp, err)
	}
}

func TestPushOnePerName(t *testing.T) {
	h := newPushHarness(t, 0, ListenOptions{}, nil, nil)
	p := h.push(t)
	_, err := h.c.Push(context.Background(), "m", testManifest(), nil)
	var e *Error
	if !errors.As(err, &e) || e.Status != 409 || e.Code != CodeBusy ||
		!strings.Contains(err.Error(), fmt.Sprintf("a push is in progress by pid %d (uid %d)", os.Getpid(), os.Geteuid())) {
		t.Errorf("a second push of the name: %v", err)
	}
	if err := p.Abort("test"); err != nil {
		t.Fatal(err)
	}
	<-h.ended
	h.checkFreed(t)
}

func TestPushWriterCloses(t *testing.T) {
	h := newPushHarness(t, 1, ListenOptions{}, nil, nil)
	p := h.push(t)
	data := tensorData(p.Staged(), 5)
	if err := p.WriteHost("head", data["head"]); err != nil {
		t.Fatal(err)
	}
	p.Close()
	<-h.ended
	h.checkFreed(t)
	if got := testutilCount(h, "aborted"); got != 1 {
		t.Errorf("pushes{result=aborted} = %v", got)
	}
}

// TestHelperPushWriter is the writer TestPushWriterKilled kills: it stages
// a push, writes one tensor, says so and waits to be killed.
func TestHelperPushWriter(t *testing.T) {
	sock := os.Getenv("WEIGHTFS_TEST_PUSH_SOCKET")
	if sock == "" {
		t.Skip("a helper process of TestPushWriterKilled")
	}
	p, err := NewClient(sock).Push(context.Background(), "m", testManifest(), nil)
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	if err := p.WriteHost("norm", make([]byte, 28)); err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	fmt.Println("half written")
	select {}
}

func TestPushWriterKilled(t *testing.T) {
	h := newPushHarness(t, 1, ListenOptions{}, nil, nil)
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperPushWriter$")
	cmd.Env = append(os.Environ(), "WEIGHTFS_TEST_PUSH_SOCKET="+h.sock)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(out).ReadString('\n')
	if line != "half written\n" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("the writer said %q", line)
	}
	pushes := h.srv.Pushes()
	if len(pushes) != 1 || pushes[0].PID != int32(cmd.Process.Pid) || pushes[0].Done != 28 || pushes[0].TensorsWritten != 1 {
		t.Errorf("pushes while the writer lives: %+v", pushes)
	}
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	<-h.ended
	h.checkFreed(t)
}

func TestPushCancelAndTimeout(t *testing.T) {
	h := newPushHarness(t, 1, ListenOptions{}, nil, nil)
	ctx := context.Background()
	p := h.push(t)
	out, err := h.c.Cancel(ctx, "m")
	if err != nil || len(out.Pushes) != 1 || out.Pushes[0].PID != int32(os.Getpid()) || len(out.Cancelled) != 0 {
		t.Fatalf("cancel: %+v %v", out, err)
	}
	h.checkFreed(t) // aborted before the answer
	<-h.ended
	if err := p.WriteHost("norm", make([]byte, 28)); !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "cancelled") {
		t.Errorf("a write after the cancel: %v", err)
	}
	if _, err := h.c.Cancel(ctx, "m"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("cancel with nothing in progress: %v", err)
	}

	h.srv.pushTimeout = 1 // a nanosecond: over before the first line
	p2 := h.push(t)
	<-h.ended
	h.checkFreed(t)
	if err := p2.Written("x", "norm"); !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "push timeout") {
		t.Errorf("a line after the timeout: %v", err)
	}
	if got := testutilCount(h, "cancelled"); got != 2 {
		t.Errorf("pushes{result=cancelled} = %v", got)
	}
}

func TestPushDaemonStops(t *testing.T) {
	ctx, stop := context.WithCancel(context.Background())
	h := newPushHarness(t, 0, ListenOptions{}, nil, ctx)
	h.push(t)
	stop()
	<-h.ended
	h.checkFreed(t)
}

// fakePeer makes every connection's peer uid (and gid) id.
func fakePeer(id uint32) func(l *Listener) {
	return func(l *Listener) {
		l.credOf = func(c *net.UnixConn) (*unix.Ucred, error) {
			cred, err := peerCred(c)
			if err == nil {
				cred.Uid, cred.Gid = id, id
			}
			return cred, err
		}
		l.pushers.groupsOf = func(int32) ([]uint32, error) { return []uint32{id, 5000}, nil }
	}
}

func TestPushOnlyPeer(t *testing.T) {
	ctx := context.Background()
	for _, opts := range []ListenOptions{{PushUIDs: []uint32{4242}}, {PushGIDs: []uint32{5000}}} {
		h := newPushHarness(t, 0, opts, fakePeer(4242), nil)
		fi, err := os.Stat(h.sock)
		if err != nil || fi.Mode().Perm() != 0o666 {
			t.Errorf("socket with pushers: %v %v", fi.Mode(), err)
		}
		p, err := h.c.Push(ctx, "m", testManifest(), nil)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(p.Staged().Name, "m") {
			t.Errorf("staged %+v", p.Staged())
		}
		if pushes := h.srv.Pushes(); len(pushes) != 1 || pushes[0].UID != 4242 {
			t.Errorf("pushes %+v", pushes)
		}
		p.Close()
		<-h.ended
		_, err = h.c.Load(ctx, "m", "/nowhere", nil)
		var e *Error
		if !errors.As(err, &e) || e.Status != 403 || !errors.Is(err, fs.ErrPermission) ||
			!strings.Contains(err.Error(), "uid 4242 may only push") || !strings.Contains(err.Error(), "--push-allow-uid") {
			t.Errorf("a push-only peer's load: %v", err)
		}
	}
	// Not listed at all.
	h := newPushHarness(t, 0, ListenOptions{PushUIDs: []uint32{1}}, fakePeer(4242), nil)
	_, err := h.c.Push(ctx, "m", testManifest(), nil)
	if !errors.Is(err, fs.ErrPermission) || !strings.Contains(err.Error(), "uid 4242 may not drive this daemon") ||
		!strings.Contains(err.Error(), "uid 1 may push") {
		t.Errorf("a peer that may not push: %v", err)
	}
	// Without push lists the socket stays 0600.
	h = newPushHarness(t, 0, ListenOptions{}, nil, nil)
	if fi, err := os.Stat(h.sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket without pushers: %v %v", fi.Mode(), err)
	}
}

func TestParseGroups(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []uint32
		bad  bool
	}{
		{"Name:\tx\nGroups:\t4 24 27 \nNgid:\t0\n", []uint32{4, 24, 27}, false},
		{"Groups:\n", nil, false},
		{"Name:\tx\n", nil, true},
		{"Groups:\t4 x\n", nil, true},
		{"Groups:\t99999999999\n", nil, true},
	} {
		got, err := parseGroups([]byte(c.in))
		if (err != nil) != c.bad || fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("parseGroups(%q) = %v, %v", c.in, got, err)
		}
	}
	if g, err := procGroups(int32(os.Getpid())); err != nil {
		t.Errorf("own groups: %v %v", g, err)
	}
}

func TestParsePushLine(t *testing.T) {
	for _, c := range []struct {
		in, err string
	}{
		{`{"op": "commit"}`, ""},
		{`{"op": "commit", "released": true}`, ""},
		{`{"op": "abort", "released": true}`, `belongs to "commit"`},
		{`{"op": "abort", "reason": "x"}`, ""},
		{`{"op": "written", "gpu": "GPU-1", "tensors": ["a"]}`, ""},
		{`{"op": "write", "tensors": [{"name": "a", "at": 4}]}`, ""},
		{``, "malformed"},
		{`{`, "malformed"},
		{`[]`, "malformed"},
		{`{"op": "commit"} {}`, "more than one"},
		{`{"op": "commit", "extra": 1}`, "malformed"},
		{`{"op": "commit", "tensors": ["a"]}`, "takes no tensors"},
		{`{}`, `without "op"`},
		{`{"op": 3}`, "malformed"},
		{`{"op": "written", "tensors": ["a"]}`, `needs "gpu"`},
		{`{"op": "written", "gpu": "g", "tensors": [1]}`, `needs "tensors"`},
		{`{"op": "write", "tensors": [{"name": "a", "at": "x"}]}`, `needs "tensors"`},
		{`{"op": "write", "tensors": []}`, `needs "tensors"`},
		{`{"op": "write"}`, `needs "tensors"`},
	} {
		_, err := parsePushLine([]byte(c.in))
		if (c.err == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), c.err)) {
			t.Errorf("parsePushLine(%q): %v; want %q", c.in, err, c.err)
		}
		if err != nil && !errors.Is(err, store.ErrInvalid) {
			t.Errorf("parsePushLine(%q): %v is not ErrInvalid", c.in, err)
		}
	}
}

func FuzzParsePushLine(f *testing.F) {
	for _, s := range []string{`{"op": "commit"}`, `{"op": "written", "gpu": "g", "tensors": ["a"]}`,
		`{"op": "write", "tensors": [{"name": "a", "at": 4}]}`, `{"op": "abort", "reason": "r"}`, "{", "\x00"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := parsePushLine(b)
		if err == nil && l.Op != "commit" && l.Op != "abort" && l.Op != "write" && l.Op != "written" {
			t.Errorf("accepted op %q", l.Op)
		}
	})
}

func TestReadPushLine(t *testing.T) {
	r := bufio.NewReaderSize(strings.NewReader("ab\n"+strings.Repeat("x", 40)+"\ncd\nef"), 16)
	for _, want := range []string{"ab", "too long", "cd", "unexpected EOF"} {
		b, err := readPushLine(r, 10)
		got := string(b)
		if err != nil {
			got = err.Error()
		}
		if !strings.Contains(got, want) {
			t.Errorf("got %q, want %q", got, want)
		}
	}
}

func testutilCount(h *pushHarness, result string) float64 {
	return testutil.ToFloat64(h.srv.metrics.pushes.WithLabelValues(result))
}
