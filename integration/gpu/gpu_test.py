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
  with the reference library, every tensor readable, each index agreeing with its shards.
Prints one line per check and "N passed, N failed" last; exits non-zero on any failure.
"""
import argparse
import datetime
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import torch  # noqa: E402
import weightfs  # noqa: E402

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the weightfs binary")
    ap.add_argument("--log", help="also append the output here")
    args = ap.parse_args()

    results = []

    def check(name, fn):
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
    src, src2, odd, mnt = (os.path.join(work, d) for d in ("src", "src2", "odd", "mnt"))
    os.makedirs(mnt)
    cfg = make_model(src)
    make_model(src2, seed=1)  # (i): same config, other weights
    odd_want = write_odd(odd)
    # The mount carries each source's owner and read bits over (docs/ARCHITECTURE.md): whatever
    # the umask here, let every user read the sources, so that (e) tests weightfs's handle check.
    for top in (src, src2, odd):
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
                               "--gpu", "0", "--socket", sock], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        for s in shards:
            wait_resident(os.path.join(mnt, "tiny", s))
        wait_resident(os.path.join(mnt, "odd", "model.safetensors"))
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
            m = weightfs.load_model(m, mounted).eval()
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
        check("(b) zero-copy load_model: same logits, pointers inside the slabs", b)

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
                return weightfs.load_model(m, path, copy=copy).eval()

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
