#!/usr/bin/env python3
"""make gpu-test: weightfs with --gpu 0 against real loaders, on a GPU machine, as root.

Builds a small LLaMA-shaped transformers model with random weights, mounts it with the
weightfs binary given by --bin, then checks:
  (a) AutoModelForCausalLM.from_pretrained(<mount>) gives the logits of the original folder;
  (b) the zero-copy loader gives the same logits and its tensors lie inside the daemon's slabs;
  (c) safetensors.safe_open reads every mounted file and every tensor equals the source;
  (d) a second process maps the same handles at the same time;
  (e) a uid that is not allowed gets EACCES (xattr and ioctl);
  (f) a file whose tensors are not naturally aligned in the source loads correctly;
  (g) weightfs status; (h) unload while mapped;
  (i) update_model switches an engine in place to a second version loaded through the daemon:
  copy=True keeps every data_ptr, copy=False rebinds into the new slabs, a model that does not
  match raises before anything changes;
  (conformance) before mounting: every file of the conformance corpus
  (store/safetensors/testdata/conformance) gets the verdict cases.json records from the
  reference parser itself (safetensors.safe_open): accepted files open with the expected
  tensors and metadata, refused ones raise;
  (pushed) the files store.PlanPush lays out for pushed versions (store/testdata/pushed) open
  with the reference library, every tensor readable, each index agreeing with its shards;
  (push-a..e) issue 9, each trainer and engine its own process (push_roles.py): a trainer's
  weightfs.push of a perturbed model on cuda:0 reaches an engine's update_model in place (logits
  equal, data_ptrs kept, same files and headers as the loaded base); copy=False rebinds into the
  new slabs; a writer SIGKILLed mid-push leaves nothing visible and frees its memory (and a
  second push of the name meanwhile is refused as busy); rollback gives the old logits back; a
  torch-free push reads back through the mount with safetensors.safe_open; (push-f) a long-lived
  engine switching every step (copy=True and copy=False) holds only the version it runs on, and
  every dropped version is freed while it lives;
  (safe-open-a) issue 11: a sharded awkward model (unaligned offsets, zero-size, scalar, BOOL,
  FP8, 1300 tensors) on the mount: every tensor and a set of slices from weightfs.safe_open
  (device None, 0, "cuda:0"; copy=True; "cpu") equal safetensors.safe_open's of the source, and
  the zero-copy ones lie inside the daemon's slabs; (safe-open-b) transformers' from_pretrained
  with its safe_open swapped for weightfs.safe_open, then for weightfs.shim's safe_open and
  load_file, answers with the same logits (how many parameters are slab views is reported).
Prints one line per check and "N passed, N failed" last; exits non-zero on any failure.
"""
import argparse
import datetime
import fcntl
import json
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import torch  # noqa: E402
import weightfs  # noqa: E402

sys.path.insert(0, HERE)
import push_roles  # noqa: E402  (torch-free helpers; its roles run as their own processes)

sys.path.insert(0, os.path.join(HERE, "..", "python", "tests"))
import test_safe_open_torch as sot  # noqa: E402  (the awkward file, slices, bitwise compare)

ROLES = os.path.join(HERE, "push_roles.py")
PYPKG = os.path.join(HERE, "..", "python")
IOCTL_CUDA_MANIFEST = 0xBFF85701  # _IOR('W', 1, struct weightfs_cuda_manifest), 16376 bytes
IOCTL_SIZE = 16376


def log(msg):
    print(msg, flush=True)


def make_model(src, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(src, max_shard_size="1MB", safe_serialization=True)
    return cfg


def write_odd(folder):
    """A file whose second tensor is not naturally aligned in the source: a 3-element BF16
    tensor (6 bytes) followed by an F32 tensor starting at data offset 6."""
    os.makedirs(folder, exist_ok=True)
    a = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
    b = torch.arange(5, dtype=torch.float32) * 0.5 + 0.25
    c = torch.tensor([7, -8, 9], dtype=torch.int64)
    ab = a.view(torch.uint8).numpy().tobytes()
    bb = b.view(torch.uint8).numpy().tobytes()
    cb = c.view(torch.uint8).numpy().tobytes()
    header = {
        "a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]},
        "b": {"dtype": "F32", "shape": [5], "data_offsets": [6, 26]},
        "c": {"dtype": "I64", "shape": [3], "data_offsets": [26, 50]},
    }
    h = json.dumps(header).encode()
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + ab + bb + cb)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write("{}")
    return {"a": a, "b": b, "c": c}


AWKWARD_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def write_awkward(folder):
    """Two shards of awkward tensors (test_safe_open_torch.awkward) and their index."""
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for shard, prefix, many in zip(AWKWARD_SHARDS, ("model.a.", "model.b."), (300, 1000)):
        with open(os.path.join(folder, shard), "wb") as f:
            f.write(sot.awkward(prefix, many))
        with weightfs.safe_open(os.path.join(folder, shard), "pt") as f:
            weight_map.update({k: shard for k in f.keys()})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write("{}")


def compare_safe_open(path, ref_path, kwargs, zero_copy):
    """Every tensor and slice of ``path`` by weightfs.safe_open(**kwargs) equals the reference
    library's of ``ref_path`` (dtype, shape, bits); tensors lie inside the path's slabs iff
    ``zero_copy``. Returns (tensors, slices) compared."""
    from safetensors import safe_open as ref

    dev = kwargs.get("device")
    ref_dev = "cpu" if dev == "cpu" else "cuda:0"
    ranges = []

    def inside(t):
        if not ranges:  # the slabs this process maps, once safe_open has mapped them
            ranges.extend(weightfs.gpu_pointer_ranges(path))
        return any(b <= t.data_ptr() < b + n for _, b, n in ranges)

    def same(got, want, what):
        if got.dtype != want.dtype or tuple(got.shape) != tuple(want.shape):
            raise AssertionError(f"{what}: {got.dtype} {tuple(got.shape)}, reference {want.dtype} {tuple(want.shape)}")
        if got.device != want.device:
            raise AssertionError(f"{what}: on {got.device}, reference on {want.device}")
        if not torch.equal(sot._bits(got), sot._bits(want)):
            raise AssertionError(f"{what}: values differ")

    tensors = slices = 0
    with weightfs.safe_open(path, "pt", **kwargs) as f, ref(ref_path, framework="pt", device=ref_dev) as r:
        where = f"{os.path.basename(path)} {kwargs}"
        if f.zero_copy != zero_copy:
            raise AssertionError(f"{where}: zero_copy {f.zero_copy}, want {zero_copy}")
        if (f.keys(), f.offset_keys(), f.metadata()) != (list(r.keys()), list(r.offset_keys()), r.metadata()):
            raise AssertionError(f"{where}: keys, offset_keys or metadata differ from the reference's")
        for name in r.keys():
            got = f.get_tensor(name)
            same(got, r.get_tensor(name), f"{where} {name}")
            if got.numel() and inside(got) != zero_copy:
                raise AssertionError(f"{where} {name}: inside the slabs {inside(got)}, want {zero_copy}")
            gs, rs = f.get_slice(name), r.get_slice(name)
            if (gs.get_shape(), gs.get_dtype()) != (list(rs.get_shape()), rs.get_dtype()):
                raise AssertionError(f"{where} {name}: slice shape/dtype differ")
            tensors += 1
            for idx in sot._indexes(gs.get_shape()):
                try:
                    w = rs[idx]
                except Exception:  # noqa: BLE001 - an index this reference version refuses
                    continue
                g = gs[idx]
                same(g, w, f"{where} {name}{idx}")
                if zero_copy and g.numel() and not inside(g):
                    raise AssertionError(f"{where} {name}{idx}: a zero-copy slice outside the slabs")
                slices += 1
    return tensors, slices


def wait_resident(path, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if "GPU-" in os.getxattr(path, "user.weightfs.residency").decode():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{path} did not become GPU-resident in {timeout}s")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


CHILD = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import weightfs
path = sys.argv[2]
t = weightfs.load_file(path)
total = sum(float(v.float().sum()) for v in t.values())
ranges = weightfs.gpu_pointer_ranges(path)
print(repr(total), len(ranges), flush=True)
sys.stdin.readline()   # hold the mapping until the parent says so
"""

DENIED = r"""
import errno, fcntl, os, sys
path = sys.argv[1]
os.setgid(65534); os.setuid(65534)
res = []
try:
    os.getxattr(path, "user.weightfs.cuda"); res.append("xattr:allowed")
except OSError as e:
    res.append("xattr:" + errno.errorcode.get(e.errno, str(e.errno)))
fd = os.open(path, os.O_RDONLY)
try:
    fcntl.ioctl(fd, 0xBFF85701, bytearray(16376)); res.append("ioctl:allowed")
except OSError as e:
    res.append("ioctl:" + errno.errorcode.get(e.errno, str(e.errno)))
print(" ".join(res))
"""


CORPUS = os.path.join(HERE, "..", "..", "store", "safetensors", "testdata", "conformance")


def check_conformance():
    """Confirm the corpus verdicts (which both weightfs parsers reach, see
    integration/python/tests/test_conformance.py) against the reference parser. No mount."""
    import safetensors
    from safetensors import safe_open

    with open(os.path.join(CORPUS, "cases.json"), encoding="utf-8") as f:
        corpus = json.load(f)
    bad = []
    accepted = refused = 0
    for case in corpus["cases"]:
        path = os.path.join(CORPUS, case["file"])
        try:
            with safe_open(path, framework="pt") as st:
                got = {k: (st.get_slice(k).get_dtype(), list(st.get_slice(k).get_shape()))
                       for k in st.keys()}
                metadata = st.metadata()
                by_offset = st.offset_keys()
        except Exception as e:  # noqa: BLE001 - any refusal counts
            if case["verdict"] == "accept":
                bad.append(f"{case['file']}: refused ({type(e).__name__}: {e}), want accepted")
            else:
                refused += 1
            continue
        if case["verdict"] == "refuse":
            bad.append(f"{case['file']}: accepted, want refused as {case['class']}")
            continue
        want = {t["name"]: (t["dtype"], t["shape"]) for t in case["tensors"]}
        offsets = {t["name"]: tuple(t["data_offsets"]) for t in case["tensors"]}
        if got != want:
            bad.append(f"{case['file']}: tensors {got}, want {want}")
        elif metadata != case["metadata"]:
            bad.append(f"{case['file']}: metadata {metadata}, want {case['metadata']}")
        elif [offsets[k] for k in by_offset] != sorted(offsets.values()):
            bad.append(f"{case['file']}: reference offset order {by_offset} disagrees with "
                       f"data_offsets {offsets}")
        else:
            accepted += 1
    if bad:
        raise AssertionError(f"{len(bad)} of {len(corpus['cases'])} cases differ from the "
                             "reference:\n  " + "\n  ".join(bad))
    return (f"safetensors {safetensors.__version__}: {accepted} accepted, {refused} refused, "
            "as cases.json says")


PUSHED = os.path.join(HERE, "..", "..", "store", "testdata", "pushed")


def check_pushed():
    """Files laid out by store.PlanPush for pushed versions (store/testdata/pushed, written by
    `go test ./store -run TestPushedCorpus -update-pushed`) open with the reference library:
    every tensor with its dtype and shape, readable, and the index maps each to its shard."""
    from safetensors import safe_open

    with open(os.path.join(PUSHED, "cases.json"), encoding="utf-8") as f:
        cases = json.load(f)
    bad, files = [], 0
    for case, shards in cases.items():
        weight_map = {}
        for name, tensors in shards.items():
            path = os.path.join(PUSHED, case, name)
            want = {t["name"]: (t["dtype"], t["shape"]) for t in tensors}
            try:
                with safe_open(path, framework="pt") as st:
                    got = {k: (st.get_slice(k).get_dtype(), list(st.get_slice(k).get_shape())) for k in st.keys()}
                    for k in st.keys():
                        st.get_tensor(k)
            except Exception as e:  # noqa: BLE001 - any refusal counts
                bad.append(f"{case}/{name}: refused ({type(e).__name__}: {e})")
                continue
            if got != want:
                bad.append(f"{case}/{name}: tensors {got}, want {want}")
            weight_map.update({t["name"]: name for t in tensors})
            files += 1
        index = os.path.join(PUSHED, case, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                if json.load(f)["weight_map"] != weight_map:
                    bad.append(f"{case}: the index's weight_map disagrees with the shards")
    if bad:
        raise AssertionError("\n  ".join(bad))
    return f"{files} files of {len(cases)} layouts open with every tensor; indexes agree"


# --------------------------------------------------------------------------------------------
# push checks (issue 9): the trainer, the engine and the writers are processes of push_roles.py


class RoleProc:
    """A push_roles.py process: JSON lines out, optionally JSON commands in; every read has a
    deadline, stderr goes to a file that failures quote."""

    def __init__(self, role, sock, *extra):
        self.errf = tempfile.TemporaryFile()
        self.role = role
        self.p = subprocess.Popen([sys.executable, ROLES, role, "--pypkg", PYPKG, "--socket", sock, *extra],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errf)
        self.buf = b""

    def stderr(self, n=3000):
        self.errf.seek(0)
        return self.errf.read().decode(errors="replace")[-n:]

    def line(self, timeout):
        deadline = time.time() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError(f"{self.role} (pid {self.p.pid}): no answer within {timeout}s; "
                                     f"stderr:\n{self.stderr()}")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.p.wait(timeout=10)
                    raise AssertionError(f"{self.role} (pid {self.p.pid}) exited {self.p.returncode} "
                                         f"without answering; stderr:\n{self.stderr()}")
                self.buf += chunk
        ln, self.buf = self.buf.split(b"\n", 1)
        return json.loads(ln)

    def send(self, op, **kw):
        self.p.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.p.stdin.flush()

    def answer(self, timeout=120):
        a = self.line(timeout)
        if a.get("ok") is False:
            raise AssertionError(f"{self.role}: {a.get('error')}\n{a.get('trace', '')}")
        return a

    def call(self, op, timeout=120, **kw):
        self.send(op, **kw)
        return self.answer(timeout)

    def result(self, timeout=300):
        """The last line of a role that runs to its end, after it exited 0."""
        last = None
        try:
            while True:
                last = self.line(timeout)
        except AssertionError:
            if self.p.poll() is None:
                raise
        try:
            if self.p.returncode != 0 or last is None:
                raise AssertionError(f"{self.role} exited {self.p.returncode}; stderr:\n{self.stderr()}")
            return last
        finally:
            self.close()

    def close(self):
        if self.p.poll() is None:
            try:
                self.send("exit")
                self.p.wait(timeout=30)
            except Exception:  # noqa: BLE001 - not an engine, or stuck: kill it
                self.p.kill()
                self.p.wait()
        for f in (self.p.stdin, self.p.stdout, self.errf):
            if f and not f.closed:
                f.close()


def engine_proc(sock, src, timeout=180):
    e = RoleProc("engine", sock, "--src", src)
    e.line(timeout)  # {"ready": pid}: torch, CUDA and transformers imported
    return e


def headers_equal(folder_a, folder_b):
    """Same file names; each *.safetensors header (8-byte length + JSON) byte for byte equal;
    every index file byte for byte equal. Returns the number of weights files."""
    na, nb = sorted(os.listdir(folder_a)), sorted(os.listdir(folder_b))
    if na != nb:
        raise AssertionError(f"files differ: {na} vs {nb}")
    n = 0
    for f in na:
        pa, pb = os.path.join(folder_a, f), os.path.join(folder_b, f)
        if f.endswith(".safetensors"):
            with open(pa, "rb") as fa, open(pb, "rb") as fb:
                ha, hb = fa.read(8), fb.read(8)
                ha += fa.read(struct.unpack("<Q", ha)[0])
                hb += fb.read(struct.unpack("<Q", hb)[0])
            if ha != hb:
                raise AssertionError(f"{f}: headers differ ({len(ha)} vs {len(hb)} bytes)")
            if os.path.getsize(pa) != os.path.getsize(pb):
                raise AssertionError(f"{f}: sizes differ")
            n += 1
        elif f.endswith(".safetensors.index.json"):
            with open(pa, "rb") as fa, open(pb, "rb") as fb:
                if fa.read() != fb.read():
                    raise AssertionError(f"{f} differs")
    return n


def wait_until(what, fn, timeout=20, every=0.25):
    """fn() until it returns a true value; AssertionError naming what and the last value."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the weightfs binary")
    ap.add_argument("--log", help="also append the output here")
    ap.add_argument("--only", metavar="TEXT", default=None,
                    help="run only the checks whose name contains TEXT (e.g. safe-open); the others are "
                         "reported as skipped")
    args = ap.parse_args()

    results = []

    def check(name, fn):
        if args.only and args.only not in name:
            log(f"SKIP {name} (--only {args.only})")
            return
        t0 = time.time()
        try:
            detail = fn() or ""
            results.append(True)
            log(f"PASS {name} ({time.time() - t0:.2f}s) {detail}")
        except Exception as e:  # report every check, keep going
            results.append(False)
            log(f"FAIL {name}: {e}")
            traceback.print_exc()

    log(f"weightfs gpu-test {datetime.datetime.now().isoformat(timespec='seconds')} "
        f"torch {torch.__version__} {torch.cuda.get_device_name(0)}")
    check("(conformance) the corpus verdicts are the reference parser's", check_conformance)
    check("(pushed) layouts planned for pushed versions open with the reference library", check_pushed)
    work = tempfile.mkdtemp(prefix="weightfs-gpu-test-")
    os.chmod(work, 0o755)  # (e) runs as uid 65534: the refusal must come from weightfs, not from here
    src, src2, odd, awk, mnt = (os.path.join(work, d) for d in ("src", "src2", "odd", "awkward", "mnt"))
    os.makedirs(mnt)
    cfg = make_model(src)
    make_model(src2, seed=1)  # (i): same config, other weights
    odd_want = write_odd(odd)
    write_awkward(awk)
    # The mount carries each source's owner and read bits over (docs/ARCHITECTURE.md): whatever
    # the umask here, let every user read the sources, so that (e) tests weightfs's handle check.
    for top in (src, src2, odd, awk):
        for dirpath, _, files in os.walk(top):
            os.chmod(dirpath, 0o755)
            for f in files:
                os.chmod(os.path.join(dirpath, f), 0o644)
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    log(f"model: {len(shards)} shards in {src}")

    sock = os.path.join(work, "control.sock")

    def wfs(*a):
        out = subprocess.run([args.bin, *a, "--socket", sock, "--json"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise AssertionError(f"weightfs {' '.join(a)}: {out.stderr.strip()}")
        return json.loads(out.stdout)

    daemon = subprocess.Popen([args.bin, "mount", mnt, "--model", f"tiny={src}", "--model", f"odd={odd}",
                               "--model", f"awkward={awk}",
                               "--gpu", "0", "--socket", sock], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        for s in shards:
            wait_resident(os.path.join(mnt, "tiny", s))
        wait_resident(os.path.join(mnt, "odd", "model.safetensors"))
        for s in AWKWARD_SHARDS:
            wait_resident(os.path.join(mnt, "awkward", s))
        mounted = os.path.join(mnt, "tiny")
        ids = torch.randint(0, cfg.vocab_size, (2, 17), device="cuda")
        from transformers import AutoModelForCausalLM

        ref_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).cuda().eval()
        ref = logits(ref_model, ids)
        del ref_model

        def a():
            m = AutoModelForCausalLM.from_pretrained(mounted, dtype=torch.bfloat16).cuda().eval()
            got = logits(m, ids)
            if not torch.equal(got, ref):
                raise AssertionError(f"max diff {(got - ref).abs().max()}")
            return "logits equal"
        check("(a) from_pretrained(mount) == from_pretrained(source)", a)

        def b():
            with torch.device("meta"):
                m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
            m = weightfs.load_model_folder(m, mounted).eval()
            got = logits(m, ids)
            if not torch.equal(got, ref):
                raise AssertionError(f"max diff {(got - ref).abs().max()}")
            ranges = []
            for s in shards:
                ranges += weightfs.gpu_pointer_ranges(os.path.join(mounted, s))
            outside = [n for n, p in m.named_parameters()
                       if p.numel() and not any(base <= p.data_ptr() and p.data_ptr() + p.numel() * p.element_size() <= base + size
                                                for _, base, size in ranges)]
            if outside:
                raise AssertionError(f"{len(outside)} parameters outside the daemon's slabs, e.g. {outside[:3]}")
            return f"logits equal; {sum(1 for _ in m.parameters())} parameters inside {len(ranges)} slabs"
        check("(b) zero-copy load_model_folder: same logits, pointers inside the slabs", b)

        def c():
            from safetensors import safe_open
            n = 0
            for s in shards:
                with safe_open(os.path.join(mounted, s), "pt") as fm, safe_open(os.path.join(src, s), "pt") as fs:
                    if sorted(fm.keys()) != sorted(fs.keys()):
                        raise AssertionError(f"{s}: tensor names differ")
                    for k in fs.keys():
                        if not torch.equal(fm.get_tensor(k), fs.get_tensor(k)):
                            raise AssertionError(f"{s}: {k} differs")
                        n += 1
            return f"{n} tensors equal"
        check("(c) safetensors.safe_open on the mount == source", c)

        def safe_open_a():
            import safetensors

            tensors = slices = 0
            cases = (({"device": None}, True), ({"device": 0}, True), ({"device": "cuda:0"}, True),
                     ({"device": "cuda:0", "copy": True}, False), ({"device": "cpu"}, False))
            for shard in AWKWARD_SHARDS:
                for kwargs, zero in cases:
                    t, n = compare_safe_open(os.path.join(mnt, "awkward", shard), os.path.join(awk, shard), kwargs, zero)
                    tensors, slices = tensors + t, slices + n
            return (f"{tensors} tensors and {slices} slices equal safetensors {safetensors.__version__}'s "
                    f"over {len(AWKWARD_SHARDS)} shards x {len(cases)} device/copy cases; zero-copy ones inside the slabs")
        check("(safe-open-a) weightfs.safe_open == safetensors.safe_open on an awkward sharded model", safe_open_a)

        def safe_open_b():
            from safetensors import safe_open as st_open
            from transformers import modeling_utils

            from weightfs import shim

            ranges = []
            out = []
            # A plain swap of the import, then the package's shim (reference signatures, "cpu"
            # meaning "the replica first") for both names transformers imports.
            for label, opener, loader in (("plain swap", weightfs.safe_open, None),
                                          ("weightfs.shim", shim.safe_open, shim.load_file)):
                devices = []

                def swapped(*a, opener=opener, devices=devices, **kw):
                    devices.append(kw.get("device", a[2] if len(a) > 2 else "cpu"))
                    return opener(*a, **kw)
                patches = [mock.patch.object(modeling_utils, "safe_open", swapped)]
                if loader is not None and hasattr(modeling_utils, "safe_load_file"):
                    patches.append(mock.patch.object(modeling_utils, "safe_load_file", loader))
                for p in patches:
                    p.start()
                try:
                    m = AutoModelForCausalLM.from_pretrained(mounted, dtype=torch.bfloat16, device_map="cuda:0").eval()
                finally:
                    for p in patches:
                        p.stop()
                if not devices:
                    raise AssertionError(f"{label}: transformers did not call modeling_utils.safe_open")
                got = logits(m, ids)
                if not torch.equal(got, ref):
                    raise AssertionError(f"{label}: max diff {(got - ref).abs().max()}")
                if not ranges:
                    ranges.extend(r for s in shards for r in weightfs.gpu_pointer_ranges(os.path.join(mounted, s)))
                params = list(m.parameters())
                inside = sum(1 for p in params if any(b <= p.data_ptr() < b + n for _, b, n in ranges))
                out.append(f"{label}: logits equal, {len(devices)} files opened with device "
                           f"{sorted(set(map(str, devices)))}, {inside}/{len(params)} parameters inside the slabs")
                del m
            return "; ".join(out) + (f"; the reference's signature "
                                     f"{getattr(st_open, '__text_signature__', None) or '(not exposed)'}")
        check("(safe-open-b) transformers with its safe_open swapped for weightfs': same logits", safe_open_b)

        def d():
            path = os.path.join(mounted, shards[0])
            mine = weightfs.load_file(path)
            total = sum(float(v.float().sum()) for v in mine.values())
            kids = [subprocess.Popen([sys.executable, "-c", CHILD, os.path.join(HERE, "..", "python"), path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
            outs = [k.stdout.readline().split() for k in kids]  # both hold their mappings now
            for k in kids:
                k.stdin.write("\n")
                k.stdin.flush()
                k.wait(timeout=60)
            for o in outs:
                if len(o) != 2 or float(o[0]) != total or o[1] != "1":
                    raise AssertionError(f"child saw {o}, parent sum {total!r}")
            return f"parent and 2 children mapped the slab at once, sums equal ({total:.4f})"
        check("(d) other processes map the same handles concurrently", d)

        def e():
            path = os.path.join(mounted, shards[0])
            out = subprocess.run([sys.executable, "-c", DENIED, path], capture_output=True, text=True, timeout=60)
            if out.stdout.strip() != "xattr:EACCES ioctl:EACCES":
                raise AssertionError(f"uid 65534 got {out.stdout.strip()!r} {out.stderr.strip()}")
            buf = bytearray(IOCTL_SIZE)
            fd = os.open(path, os.O_RDONLY)
            try:
                fcntl.ioctl(fd, IOCTL_CUDA_MANIFEST, buf)
            finally:
                os.close(fd)
            n = struct.unpack_from("<I", buf)[0]
            if json.loads(bytes(buf[8:8 + n])) != json.loads(os.getxattr(path, "user.weightfs.cuda")):
                raise AssertionError("ioctl and xattr manifests differ")
            return "uid 65534: EACCES for xattr and ioctl; root: ioctl == xattr"
        check("(e) a uid that is not allowed gets EACCES", e)

        def f():
            path = os.path.join(mnt, "odd", "model.safetensors")
            got = weightfs.load_file(path)
            if not weightfs.gpu_pointer_ranges(path):
                raise AssertionError("not loaded zero-copy")
            for k, v in odd_want.items():
                if not torch.equal(got[k].cpu(), v):
                    raise AssertionError(f"{k}: {got[k]} != {v}")
                if got[k].data_ptr() % 256:
                    raise AssertionError(f"{k} not 256-aligned on the slab")
            return "BF16[3] then F32[5] then I64[3]: values equal, each 256-aligned"
        check("(f) tensors not naturally aligned in the source", f)

        def g():
            st = wfs("status")
            gpu = st["gpus"][0]
            want = sum(v["bytes"] for m in st["models"] for v in m["versions"])
            if not gpu["name"] or not gpu["uuid"].startswith("GPU-") or gpu["bytes"] <= 0 or gpu["free"] <= 0:
                raise AssertionError(f"status gpus: {gpu}")
            tiny = next(m for m in st["models"] if m["name"] == "tiny")["versions"][0]
            if not any(r.startswith("GPU-") for r in tiny["residency"]):
                raise AssertionError(f"tiny residency {tiny['residency']}")
            return (f"{gpu['name']} {gpu['uuid']}: {gpu['bytes']} B of slabs (NVML: {gpu.get('process_bytes', 0)} B "
                    f"for the daemon), {gpu['free']} B free; host {st['host']['bytes']} B for {want} B of files")
        check("(g) weightfs status: per-GPU figures and residency", g)

        def h():
            load = wfs("load", "tiny", src)["version"]
            path = os.path.join(mnt, load["name"], shards[0])
            before = wfs("status")["gpus"][0]["bytes"]
            kid = subprocess.Popen([sys.executable, "-c", CHILD, os.path.join(HERE, "..", "python"), path],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            kid.stdout.readline()  # it holds the mapping now
            gone = wfs("unload", "tiny", "--version", str(load["number"]))["unloaded"][0]
            drain = wfs("ls")["draining"]
            if gone["state"] != "draining" or not drain or kid.pid not in drain[0]["handle_holders"]:
                raise AssertionError(f"unloaded {gone}, draining {drain}")
            kid.stdin.write("\n")
            kid.stdin.flush()
            kid.wait(timeout=60)
            deadline = time.time() + 15
            while time.time() < deadline and wfs("ls")["draining"]:
                time.sleep(0.5)
            after = wfs("status")["gpus"][0]["bytes"]
            if wfs("ls")["draining"] or after >= before:
                raise AssertionError(f"still draining or GPU bytes not freed: {before} -> {after}")
            return f"{load['name']} drained while pid {kid.pid} held its handles; GPU slabs {before} -> {after} B"
        check("(h) unload while another process maps the handles: draining, then freed", h)

        def i():
            import copy as copymod

            def engine(path, copy):
                with torch.device("meta"):
                    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
                return weightfs.load_model_folder(m, path, copy=copy).eval()

            def ptrs(m):
                return {n: t.data_ptr() for n, t in list(m.named_parameters()) + list(m.named_buffers())}

            upd = os.path.join(mnt, "upd")
            first = wfs("load", "upd", src)["version"]["number"]
            for s in shards:
                wait_resident(os.path.join(mnt, f"upd@{first}", s))
            e1 = engine(upd, copy=True)  # private copies of version 1
            e2 = engine(os.path.join(mnt, f"upd@{first}"), copy=False)  # views of version 1's slabs
            if not torch.equal(logits(e1, ids), ref):
                raise AssertionError("engine at version 1: logits differ from the source's")
            second = wfs("load", "upd", src2)["version"]["number"]
            if (first, second) != (1, 2):
                raise AssertionError(f"versions {first}, {second}: want 1, 2")
            shards2 = sorted(f for f in os.listdir(src2) if f.endswith(".safetensors"))
            for s in shards2:
                wait_resident(os.path.join(mnt, "upd@2", s))
            m2 = AutoModelForCausalLM.from_pretrained(src2, dtype=torch.bfloat16).cuda().eval()
            ref2 = logits(m2, ids)
            del m2
            if torch.equal(ref2, ref):
                raise AssertionError("the second model's logits equal the first's")

            # copy=True: in place, same storage
            before = ptrs(e1)
            t0 = time.time()
            n = weightfs.update_model(e1, upd)
            took = time.time() - t0
            if n != 2:
                raise AssertionError(f"update_model returned {n}, want 2")
            got = logits(e1, ids)
            if not torch.equal(got, ref2):
                raise AssertionError(f"copy=True: max diff {(got - ref2).abs().max()}")
            moved = [k for k, v in ptrs(e1).items() if before.get(k) != v]
            if moved or ptrs(e1).keys() != before.keys():
                raise AssertionError(f"copy=True moved {len(moved)} tensors, e.g. {moved[:3]}")

            # copy=True into views of a weightfs slab is refused: it would write version 1
            v1 = {k: p.detach().clone() for k, p in e2.named_parameters()}
            try:
                weightfs.update_model(e2, upd)
                raise AssertionError("copy=True into slab views was not refused")
            except weightfs.ModelMismatchError as err:
                if "zero-copy views" not in str(err):
                    raise
            if not all(torch.equal(p, v1[k]) for k, p in e2.named_parameters()):
                raise AssertionError("the refused update changed version 1's slab")
            del v1

            # copy=False: rebound to zero-copy views of version 2
            if weightfs.update_model(e2, upd, copy=False) != 2:
                raise AssertionError("copy=False did not return 2")
            got = logits(e2, ids)
            if not torch.equal(got, ref2):
                raise AssertionError(f"copy=False: max diff {(got - ref2).abs().max()}")
            ranges = []
            for s in shards2:
                ranges += weightfs.gpu_pointer_ranges(os.path.join(mnt, "upd@2", s))
            outside = [k for k, p in e2.named_parameters()
                       if p.numel() and not any(base <= p.data_ptr() and p.data_ptr() + p.numel() * p.element_size() <= base + size
                                                for _, base, size in ranges)]
            if outside or not ranges:
                raise AssertionError(f"copy=False: {len(outside)} parameters outside version 2's slabs, e.g. {outside[:3]}")

            # models that do not match: refused before anything changes
            refused = []
            narrow = copymod.deepcopy(cfg)
            narrow.intermediate_size = 512
            for what, m, want in (("intermediate_size 512", AutoModelForCausalLM.from_config(narrow, dtype=torch.bfloat16), "mlp"),
                                  ("float32", AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), "torch.float32")):
                m = m.cuda().eval()
                snap = {k: (t.data_ptr(), t.detach().clone()) for k, t in m.state_dict(keep_vars=True).items()}
                try:
                    weightfs.update_model(m, upd)
                    raise AssertionError(f"{what}: update_model did not raise")
                except weightfs.ModelMismatchError as err:
                    if want not in str(err) or "nothing was changed" not in str(err):
                        raise AssertionError(f"{what}: {err}")
                now = m.state_dict(keep_vars=True)
                changed = [k for k, (ptr, val) in snap.items() if now[k].data_ptr() != ptr or not torch.equal(now[k], val)]
                if changed:
                    raise AssertionError(f"{what}: refused but changed {changed[:3]}")
                refused.append(what)
            return (f"copy=True {took * 1000:.0f} ms: version 2, logits equal, {len(before)} data_ptrs unchanged; "
                    f"copy=False: logits equal, {sum(1 for _ in e2.parameters())} parameters in {len(ranges)} slabs; "
                    f"copy=True into slab views refused; refused untouched: {', '.join(refused)}")
        check("(i) update_model switches an engine in place", i)

        # ---- push (issue 9): "policy" starts as a `weightfs load` of the saved folder, so that
        # a push of the same tensors must keep its files and headers (PROTOCOL.md §6.1).
        policy = os.path.join(mnt, "policy")
        pushed = {}  # what later push checks need from earlier ones: versions, logits files

        def ls_pushes():
            return wfs("ls").get("pushes") or []

        def no_draining():
            return not wfs("ls")["draining"]

        def push_a():
            first = wfs("load", "policy", src)["version"]["number"]
            for sh in shards:
                wait_resident(os.path.join(mnt, f"policy@{first}", sh))
            pushed["first"] = first
            eng = engine_proc(sock, src)
            try:
                eng.call("load", path=os.path.join(mnt, f"policy@{first}"))
                base_logits = os.path.join(work, "logits-base.pt")
                eng.call("logits", out=base_logits)
                # the engine waits for the commit (wait_version) while the trainer pushes
                eng.send("update", path=policy, copy=True, newer_than=first, timeout=120)
                la = os.path.join(work, "logits-a.pt")
                tr = RoleProc("trainer", sock, "--src", src, "--name", "policy", "--seed", "1001", "--logits", la).result()
                up = eng.answer(timeout=120)
                ea = os.path.join(work, "logits-engine-a.pt")
                eng.call("logits", out=ea)
            finally:
                eng.close()
            n = tr["version"]
            if n != up["version"] or n <= first:
                raise AssertionError(f"trainer pushed version {n}, engine updated to {up['version']} (base {first})")
            if up["moved"]:
                raise AssertionError(f"copy=True moved {up['moved']} of {up['tensors']} tensors, e.g. {up['moved_examples']}")
            got, want, base = torch.load(ea), torch.load(la), torch.load(base_logits)
            if not torch.equal(got, want):
                raise AssertionError(f"engine logits differ from the trainer's: max diff {(got - want).abs().max()}")
            if torch.equal(got, base):
                raise AssertionError("the pushed weights give the base's logits: nothing changed")
            files = headers_equal(os.path.join(mnt, f"policy@{first}"), os.path.join(mnt, f"policy@{n}"))
            pushed.update(a=n, logits_a=la)
            return (f"push of {tr['tensors']} tensors ({tr['bytes']} B) -> policy@{n} in {tr['push_seconds'] * 1000:.0f} ms; "
                    f"engine woke after {up['waited']['seconds'] * 1000:.0f} ms of waiting, update_model {up['seconds'] * 1000:.1f} ms; "
                    f"logits equal, {up['tensors']} data_ptrs unchanged; {files} weights files with the base's names and headers")
        check("(push-a) trainer push -> engine update_model in place: logits equal", push_a)

        def push_b():
            if "a" not in pushed:
                raise AssertionError("needs (push-a)")
            eng = engine_proc(sock, src)
            try:
                eng.call("load", path=os.path.join(mnt, f"policy@{pushed['a']}"))
                eng.send("update", path=policy, copy=False, newer_than=pushed["a"], timeout=120)
                lb = os.path.join(work, "logits-b.pt")
                tr = RoleProc("trainer", sock, "--src", src, "--name", "policy", "--seed", "1002", "--logits", lb).result()
                up = eng.answer(timeout=120)
                eb = os.path.join(work, "logits-engine-b.pt")
                eng.call("logits", out=eb)
                inside = eng.call("in-slabs", folder=os.path.join(mnt, f"policy@{tr['version']}"))
            finally:
                eng.close()
            if tr["version"] != up["version"]:
                raise AssertionError(f"trainer pushed {tr['version']}, engine rebound to {up['version']}")
            got, want = torch.load(eb), torch.load(lb)
            if not torch.equal(got, want):
                raise AssertionError(f"copy=False: max diff {(got - want).abs().max()}")
            if inside["outside"] or not inside["slabs"]:
                raise AssertionError(f"{inside['outside']} of {inside['params']} parameters outside the "
                                     f"{inside['slabs']} slabs of policy@{tr['version']}, e.g. {inside['outside_examples']}")
            pushed.update(b=tr["version"], logits_b=lb)
            return (f"policy@{tr['version']}: rebound in {up['seconds'] * 1000:.1f} ms, logits equal, "
                    f"{inside['params']} parameters inside {inside['slabs']} slabs")
        check("(push-b) update_model(copy=False) rebinds to the pushed version's slabs", push_b)

        def push_c():
            if "b" not in pushed:
                raise AssertionError("needs (push-b)")
            # the earlier engines and trainers have exited: let their versions drain first
            wait_until("versions left draining by earlier checks freed", no_draining, timeout=30)
            cur = weightfs.resolve_version(policy).number
            st = wfs("status")
            gpu_before, host_before = st["gpus"][0]["bytes"], st["host"]["bytes"]
            gpu_reserved_before = st["gpus"][0].get("reserved", 0)
            versions_before = sorted(v["number"] for m in wfs("ls")["models"] if m["name"] == "policy" for v in m["versions"])
            if ls_pushes():
                raise AssertionError(f"a staged push before the test: {ls_pushes()}")
            w = RoleProc("half-writer", sock, "--src", src, "--name", "policy", "--seed", "1003")
            try:
                half = w.line(180)
                if "half" not in half:
                    raise AssertionError(f"writer said {half}")
                staged = ls_pushes()
                if len(staged) != 1 or staged[0].get("name") != "policy" or staged[0].get("pid") != w.p.pid:
                    raise AssertionError(f"ls pushes while writing: {staged}, writer pid {w.p.pid}")
                g = wfs("status")["gpus"][0]
                gpu_during = g["bytes"] + g.get("reserved", 0)  # the staged slabs: held or reserved
                if gpu_during <= gpu_before + gpu_reserved_before:
                    raise AssertionError(f"GPU bytes + reserved did not grow for the staged version: "
                                         f"{gpu_before} + {gpu_reserved_before} -> {gpu_during}")
                # one push per name: a second writer is refused, naming the first one's pid
                busy = RoleProc("plain-push", sock, "--name", "policy")
                try:
                    busy.p.wait(timeout=120)
                    if busy.p.returncode == 0 or str(w.p.pid) not in busy.stderr():
                        raise AssertionError(f"a second push of policy: exit {busy.p.returncode}, {busy.stderr(600)!r}")
                finally:
                    busy.close()
                os.kill(w.p.pid, signal.SIGKILL)
                w.p.wait(timeout=30)
            finally:
                if w.p.poll() is None:
                    w.p.kill()
                    w.p.wait()
                w.close()
            wait_until("the staged push gone from ls", lambda: not ls_pushes(), timeout=15)

            def freed():
                s2 = wfs("status")
                return ((s2["gpus"][0]["bytes"], s2["gpus"][0].get("reserved", 0), s2["host"]["bytes"])
                        == (gpu_before, gpu_reserved_before, host_before)) or None
            try:
                wait_until("GPU and host bytes back to their values before the push", freed, timeout=15)
            except AssertionError:
                s2 = wfs("status")
                raise AssertionError(f"GPU bytes {gpu_before} -> {gpu_during} -> {s2['gpus'][0]['bytes']}, "
                                     f"host bytes {host_before} -> {s2['host']['bytes']}") from None
            now = weightfs.resolve_version(policy).number
            versions_after = sorted(v["number"] for m in wfs("ls")["models"] if m["name"] == "policy" for v in m["versions"])
            if now != cur or versions_after != versions_before:
                raise AssertionError(f"current {cur} -> {now}, versions {versions_before} -> {versions_after}")
            return (f"killed pid {w.p.pid} after {half['half']} of {half['of']} tensors: second push refused as busy; "
                    f"policy@{now} still current, versions {versions_after}; staged push gone; "
                    f"GPU bytes {gpu_before} -> {gpu_during} (with reserved) -> {gpu_before}, host bytes back to {host_before}")
        check("(push-c) SIGKILL of the writer mid-push: nothing visible, memory freed", push_c)

        def push_d():
            if "b" not in pushed:
                raise AssertionError("needs (push-a) and (push-b)")
            eng = engine_proc(sock, src)
            try:
                eng.call("load", path=policy)
                first = eng.call("watch-start", path=policy)["version"]
                rb = wfs("rollback", "policy")["version"]["number"]
                seen = eng.call("watch-next", timeout=10)["version"]
                up = eng.call("update", path=policy, copy=True)
                ed = os.path.join(work, "logits-engine-d.pt")
                eng.call("logits", out=ed)
            finally:
                eng.close()
            if (first, rb, seen, up["version"]) != (pushed["b"], pushed["a"], pushed["a"], pushed["a"]):
                raise AssertionError(f"watch {first} -> {seen}, rollback to {rb}, update_model -> {up['version']}; "
                                     f"want {pushed['b']} -> {pushed['a']}")
            got, want = torch.load(ed), torch.load(pushed["logits_a"])
            if not torch.equal(got, want):
                raise AssertionError(f"after the rollback: max diff {(got - want).abs().max()} from push-a's logits")
            return (f"rollback policy@{pushed['b']} -> policy@{rb}; the engine's watch saw it; update_model gave "
                    f"push-a's logits back exactly")
        check("(push-d) rollback: update_model gets the old logits back", push_d)

        def push_e():
            from safetensors import safe_open

            res = RoleProc("plain-push", sock, "--name", "plain").result(timeout=120)
            if res.get("torch_imported"):
                raise AssertionError("the torch-free push imported torch")
            want = push_roles.plain_tensors()
            folder = os.path.join(mnt, "plain")
            if weightfs.resolve_version(folder).number != res["version"]:
                raise AssertionError(f"pushed {res['version']}, mount shows {weightfs.resolve_version(folder)}")
            with open(os.path.join(folder, "config.json"), "rb") as f:
                if f.read() != push_roles.PLAIN_CONFIG:
                    raise AssertionError("config.json is not the pushed one")
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            if files != ["model.safetensors"]:
                raise AssertionError(f"a first push of {len(want)} small tensors laid out as {files}")
            path = os.path.join(folder, "model.safetensors")
            with open(path, "rb") as f:
                hlen = struct.unpack("<Q", f.read(8))[0]
            if (8 + hlen) % 4096:
                raise AssertionError(f"data section starts at {8 + hlen}, not on a 4096-byte boundary")
            seen = {}
            with safe_open(path, framework="pt") as st:
                if st.metadata() != {"format": "pt"}:
                    raise AssertionError(f"metadata {st.metadata()}")
                for k in st.keys():
                    sl = st.get_slice(k)
                    seen[k] = (sl.get_dtype(), list(sl.get_shape()),
                               st.get_tensor(k).contiguous().view(torch.uint8).numpy().tobytes())
            if seen != {k: (dt, shape, data) for k, (dt, shape, data) in want.items()}:
                raise AssertionError(f"safe_open read {sorted((k, v[:2]) for k, v in seen.items())}, "
                                     f"want {sorted((k, v[:2]) for k, v in want.items())} (or bytes differ)")
            wait_resident(path)
            gpu = weightfs.load_file(path)
            if not weightfs.gpu_pointer_ranges(path):
                raise AssertionError("not loaded zero-copy")
            bad = [k for k, (_, _, data) in want.items()
                   if gpu[k].cpu().contiguous().view(torch.uint8).numpy().tobytes() != data]
            if bad:
                raise AssertionError(f"GPU slab bytes differ for {bad}")
            return (f"plain@{res['version']} pushed without torch in {res['seconds'] * 1000:.0f} ms: "
                    f"{len(want)} tensors, safe_open and the GPU slab give the pushed bytes; header 4096-aligned")
        check("(push-e) a torch-free push reads back with safetensors.safe_open", push_e)

        def push_f():
            # A long-lived engine switching every step holds only the version it runs on: it
            # releases the others (PROTOCOL §3.1), so the daemon frees each dropped version while
            # the engine lives (without the release, every version it touched would drain until
            # it exits: a GPU out of memory after a few steps).
            eng = engine_proc(sock, src)
            steps = []
            try:
                eng.call("load", path=policy)
                for i, copy in enumerate((True, True, False, False)):  # copy=True into slab views is refused
                    n0 = weightfs.resolve_version(policy).number
                    eng.send("update", path=policy, copy=copy, newer_than=n0, timeout=120)
                    tr = RoleProc("trainer", sock, "--src", src, "--name", "policy", "--seed", str(2000 + i),
                                  "--logits", os.path.join(work, f"logits-f{i}.pt")).result()
                    up = eng.answer(timeout=120)
                    if up["version"] != tr["version"]:
                        raise AssertionError(f"step {i}: pushed {tr['version']}, engine updated to {up['version']}")
                    want = {tr["version"]} if not copy else set()

                    def settled():
                        ls = wfs("ls")
                        held = sorted(v["number"] for m in ls["models"] if m["name"] == "policy"
                                      for v in m["versions"] if eng.p.pid in (v.get("handle_holders") or []))
                        return (not ls["draining"] and set(held) == want) or None
                    try:
                        wait_until(f"step {i}: nothing draining, the engine holding {sorted(want)}", settled, timeout=20)
                    except AssertionError:
                        ls = wfs("ls")
                        raise AssertionError(f"step {i} (copy={copy}): draining "
                                             f"{[v['name'] + ' held by ' + str(v.get('handle_holders')) for v in ls['draining']]}; "
                                             f"versions {[(v['name'], v.get('handle_holders')) for m in ls['models'] for v in m['versions'] if m['name'] == 'policy']}") from None
                    steps.append(f"{'copy' if copy else 'rebind'}->{up['version']}")
                gpu_bytes = wfs("status")["gpus"][0]["bytes"]
            finally:
                eng.close()
            return (f"engine pid {eng.p.pid} alive through {len(steps)} pushes ({', '.join(steps)}): "
                    f"after each, nothing draining and it holds only what it runs on; GPU bytes {gpu_bytes}")
        check("(push-f) a long-lived engine releases the versions it leaves: nothing piles up", push_f)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            out, _ = daemon.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            out, _ = daemon.communicate()
        log("--- daemon output ---\n" + out.strip())
    passed, failed = results.count(True), results.count(False)
    log(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
