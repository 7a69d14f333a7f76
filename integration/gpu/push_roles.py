#!/usr/bin/env python3
"""The processes of gpu_test.py's push checks (issue 9), one role per invocation.

    python3 push_roles.py ROLE --pypkg DIR --socket SOCK [options]

Roles (each prints JSON lines on stdout; the last one is its result):
  trainer       from_pretrained(--src) on cuda:0, perturb with --seed, weightfs.push(--name,
                state_dict), save its logits on the fixed input to --logits.
  engine        a line-driven engine: reads JSON commands on stdin, answers one JSON line each
                (load, logits, update, watch-next, ptrs-in-slabs, exit); see Engine below.
  half-writer   opens weightfs.Push(--name, state_dict), writes half the tensors, prints
                {"half": N}, then sleeps: the parent SIGKILLs it.
  plain-push    a torch-free push of plain_tensors() (never imports torch), prints the version.

This module imports torch only inside the torch roles, so plain-push (and the helpers below,
which gpu_test.py and the unit check use) run without it.
"""
import argparse
import json
import os
import random
import sys
import time

# safetensors dtype -> bytes per element, for the torch-free push (the dtypes plain_tensors uses)
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1}


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def plain_tensors(seed=7):
    """A small torch-free state: name -> (dtype, shape, bytes), deterministic from seed.

    Mixed dtypes and sizes that are not multiples of 256 (so the generated header's padding and
    the slab layout are exercised): BF16, F16, F32, I64 and a 13-byte U8."""
    rng = random.Random(seed)
    spec = [("model.embed_tokens.weight", "BF16", [64, 32]),
            ("model.layers.0.mlp.up_proj.weight", "F16", [2, 3, 4]),
            ("model.layers.0.input_layernorm.weight", "F32", [7, 5]),
            ("model.position_ids", "I64", [3]),
            ("model.odd_bytes", "U8", [13]),
            ("lm_head.weight", "BF16", [32, 64])]
    out = {}
    for name, dt, shape in spec:
        n = numel(shape) * ITEMSIZE[dt]
        out[name] = (dt, shape, bytes(rng.getrandbits(8) for _ in range(n)))
    return out


PLAIN_CONFIG = b'{"model_type": "weightfs-plain", "note": "pushed without torch"}\n'


def out(obj):
    print(json.dumps(obj), flush=True)


# ------------------------------------------------------------------------------------------
# torch roles


def _torch_setup(pypkg):
    sys.path.insert(0, pypkg)
    import torch  # noqa: F401
    import weightfs  # noqa: F401
    return torch, weightfs


def fixed_ids(torch, vocab):
    """The fixed input every process computes logits on: (2, 17) token ids, seed 0."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, 17), generator=g).to("cuda:0")


def logits_of(torch, model, ids):
    with torch.no_grad():
        return model(ids).logits.float().cpu()


def trained_model(torch, src, seed):
    """The trainer's model: the saved folder on cuda:0, perturbed with a fixed seed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).to("cuda:0").eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.cuda.synchronize()
    return model


def role_trainer(a):
    torch, weightfs = _torch_setup(a.pypkg)
    model = trained_model(torch, a.src, a.seed)
    sd = model.state_dict()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = weightfs.push(a.name, sd, socket=a.socket)
    dt = time.perf_counter() - t0
    lg = logits_of(torch, model, fixed_ids(torch, model.config.vocab_size))
    torch.save(lg, a.logits)
    out({"version": n, "push_seconds": dt, "tensors": len(sd),
         "bytes": sum(t.numel() * t.element_size() for t in sd.values())})


def role_half_writer(a):
    torch, weightfs = _torch_setup(a.pypkg)
    model = trained_model(torch, a.src, a.seed)
    sd = model.state_dict()
    names = list(sd)
    half = len(names) // 2
    with weightfs.Push(a.name, sd, socket=a.socket) as p:
        for k in names[:half]:
            p.write(k, sd[k])
        torch.cuda.synchronize()
        out({"half": half, "of": len(names), "pid": os.getpid()})
        time.sleep(600)  # the parent SIGKILLs us here
    out({"error": "not killed"})


class Engine:
    """An inference engine's process, driven line by line. Commands (JSON on stdin):

    {"op": "load", "path": P}              build from config (meta) and load_model_folder(copy=True)
    {"op": "logits", "out": F}             torch.save(logits on the fixed input, F)
    {"op": "update", "path": P, "copy": B, "newer_than": N|null, "timeout": S}
                                           wait_version (when newer_than is given), then
                                           update_model; answers the version, whether every
                                           data_ptr stayed, the seconds
    {"op": "watch-start", "path": P}       start weightfs.watch(P) in a thread; answers the first
    {"op": "watch-next", "timeout": S}     the watch's next version (error on timeout)
    {"op": "in-slabs", "folder": F}        how many parameters lie inside the open slabs of F's files
    {"op": "exit"}
    """

    def __init__(self, a):
        self.torch, self.weightfs = _torch_setup(a.pypkg)
        from transformers import AutoConfig

        self.cfg = AutoConfig.from_pretrained(a.src)
        self.model = None
        self.ids = None
        self.watch_q = None

    def ptrs(self):
        m = self.model
        return {n: t.data_ptr() for n, t in list(m.named_parameters()) + list(m.named_buffers())}

    def op_load(self, c):
        from transformers import AutoModelForCausalLM

        torch = self.torch
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(self.cfg, dtype=torch.bfloat16)
        with torch.cuda.device(0):
            self.model = self.weightfs.load_model_folder(m, c["path"], copy=True).eval()
        self.ids = fixed_ids(torch, self.cfg.vocab_size)
        return {"loaded": c["path"], "version": self.weightfs.resolve_version(c["path"]).number}

    def op_logits(self, c):
        self.torch.save(logits_of(self.torch, self.model, self.ids), c["out"])
        return {"saved": c["out"]}

    def op_update(self, c):
        w = self.weightfs
        waited = None
        if c.get("newer_than") is not None:
            t0 = time.perf_counter()
            seen = w.wait_version(c["path"], newer_than=c["newer_than"], timeout=c.get("timeout", 60))
            waited = {"seen": seen, "seconds": time.perf_counter() - t0}
        before = self.ptrs()
        t0 = time.perf_counter()
        n = w.update_model(self.model, c["path"], copy=c.get("copy", True))
        dt = time.perf_counter() - t0
        after = self.ptrs()
        moved = [k for k in before if after.get(k) != before[k]]
        return {"version": n, "seconds": dt, "waited": waited, "moved": len(moved),
                "moved_examples": moved[:3], "tensors": len(before)}

    def op_watch_start(self, c):
        import queue
        import threading

        q = queue.Queue()

        def run():
            try:
                for n in self.weightfs.watch(c["path"]):
                    q.put(n)
                q.put("gone")
            except Exception as e:  # reported by watch-next
                q.put(f"error: {type(e).__name__}: {e}")

        threading.Thread(target=run, daemon=True).start()
        self.watch_q = q
        return self.op_watch_next({"timeout": c.get("timeout", 10)})

    def op_watch_next(self, c):
        import queue

        try:
            v = self.watch_q.get(timeout=c.get("timeout", 10))
        except queue.Empty:
            raise TimeoutError(f"watch: nothing within {c.get('timeout', 10)} s") from None
        if isinstance(v, str):
            raise RuntimeError(f"watch: {v}")
        return {"version": v}

    def op_in_slabs(self, c):
        w = self.weightfs
        folder = c["folder"]
        ranges = []
        for f in sorted(os.listdir(folder)):
            if f.endswith(".safetensors"):
                ranges += w.gpu_pointer_ranges(os.path.join(folder, f))
        params = [(n, p) for n, p in self.model.named_parameters() if p.numel()]
        outside = [n for n, p in params
                   if not any(base <= p.data_ptr() and p.data_ptr() + p.numel() * p.element_size() <= base + size
                              for _, base, size in ranges)]
        return {"params": len(params), "slabs": len(ranges), "outside": len(outside),
                "outside_examples": outside[:3]}

    def serve(self):
        out({"ready": os.getpid()})
        for line in sys.stdin:
            c = json.loads(line)
            if c["op"] == "exit":
                out({"bye": True})
                return
            try:
                res = getattr(self, "op_" + c["op"].replace("-", "_"))(c)
                out({"ok": True, **res})
            except Exception as e:  # the parent reports it as the check's failure
                import traceback

                out({"ok": False, "error": f"{type(e).__name__}: {e}",
                     "trace": traceback.format_exc()[-2000:]})


def role_engine(a):
    Engine(a).serve()


# ------------------------------------------------------------------------------------------
# the torch-free role


def role_plain_push(a):
    sys.path.insert(0, a.pypkg)
    import weightfs

    t0 = time.perf_counter()
    n = weightfs.push(a.name, plain_tensors(), files={"config.json": PLAIN_CONFIG}, socket=a.socket)
    out({"version": n, "seconds": time.perf_counter() - t0, "torch_imported": "torch" in sys.modules,
         "numpy_imported": "numpy" in sys.modules})


ROLES = {"trainer": role_trainer, "engine": role_engine, "half-writer": role_half_writer,
         "plain-push": role_plain_push}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=sorted(ROLES))
    ap.add_argument("--pypkg", required=True, help="integration/python (the weightfs package)")
    ap.add_argument("--socket", required=True, help="the daemon's control socket")
    ap.add_argument("--src", help="the saved model folder (config, base weights)")
    ap.add_argument("--name", default="policy")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--logits", help="where the trainer saves its logits")
    a = ap.parse_args()
    ROLES[a.role](a)


if __name__ == "__main__":
    main()
