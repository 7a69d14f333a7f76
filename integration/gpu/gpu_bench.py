#!/usr/bin/env python3
"""make gpu-bench: time until every tensor of a Qwen3-8B-shaped checkpoint is on the GPU.

Side by side in one run, each measurement in a fresh process (CUDA initialised before the
clock starts): safetensors load_file(device="cuda") from local disk (cold and warm page
cache) and from /dev/shm; the same from the weightfs mount; the zero-copy loader, with and
without copy=True; and the daemon's own cold load next to a raw `cat` of the same files.
Needs root (drop_caches, mounting). Prints a table with ratios last.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PYPKG = os.path.join(HERE, "..", "python")


def log(msg):
    print(msg, flush=True)


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def qwen3_8b_tensors():
    """Names and shapes of Qwen3-8B (36 layers, hidden 4096, 151936 vocab): ~8.2 B params."""
    h, inter, layers, vocab, kv, hd = 4096, 12288, 36, 151936, 8, 128
    t = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        t += [(p + "self_attn.q_proj.weight", (32 * hd, h)), (p + "self_attn.k_proj.weight", (kv * hd, h)),
              (p + "self_attn.v_proj.weight", (kv * hd, h)), (p + "self_attn.o_proj.weight", (h, 32 * hd)),
              (p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,)),
              (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
              (p + "mlp.down_proj.weight", (h, inter)),
              (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    t += [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]
    return t


def make_checkpoint(folder, shards=4):
    import torch
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tensors = qwen3_8b_tensors()
    total = sum(2 * _numel(s) for _, s in tensors)
    per = total / shards
    groups, cur, size = [], [], 0
    for name, shape in tensors:
        cur.append((name, shape))
        size += 2 * _numel(shape)
        if size >= per and len(groups) < shards - 1:
            groups.append(cur)
            cur, size = [], 0
    groups.append(cur)
    weight_map = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        data = {n: (torch.randn(s, device="cuda", generator=g, dtype=torch.float32) * 0.02)
                .to(torch.bfloat16).cpu() for n, s in group}
        save_file(data, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n, _ in group})
        del data
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36}, f)
    return total


def _numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


# Runs in a fresh process: CUDA is initialised, then the clock runs until every tensor of
# every shard is on the GPU (synchronised). Prints seconds and bytes.
TIMED = r"""
import os, sys, time, torch
sys.path.insert(0, sys.argv[1])
mode, folder = sys.argv[2], sys.argv[3]
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
from safetensors.torch import load_file
import weightfs
def run():
    if mode == "safetensors":
        return [load_file(f, device="cuda") for f in files]
    return [weightfs.load_file(f, copy=(mode == "zero-copy+copy"), prefer="ipc") for f in files]
t0 = time.perf_counter()
if os.environ.get("PROFILE"):
    import cProfile, pstats
    pr = cProfile.Profile(); pr.enable(); out = run(); torch.cuda.synchronize(); pr.disable()
    pstats.Stats(pr, stream=sys.stderr).sort_stats("cumulative").print_stats(18)
else:
    out = run()
torch.cuda.synchronize()
dt = time.perf_counter() - t0
n = sum(t.numel() * t.element_size() for d in out for t in d.values())
print(dt, n)
"""


def timed_once(mode, folder, profile=False):
    env = dict(os.environ, PROFILE="1") if profile else None
    out = subprocess.run([sys.executable, "-c", TIMED, PYPKG, mode, folder], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} {folder}: {out.stderr[-2000:]}")
    if profile:
        log(out.stderr)
    dt, n = out.stdout.split()[-2:]
    return float(dt), int(n)


def timed(mode, folder, runs=3):
    """Median of runs fresh processes (warm measurements only: cold ones run once)."""
    results = sorted(timed_once(mode, folder) for _ in range(runs))
    log(f"  {mode} {folder}: " + " ".join(f"{dt:.3f}" for dt, _ in results))
    return results[len(results) // 2]


def start_daemon(binary, mnt, src, gpu):
    args = [binary, "mount", mnt, "--model", f"qwen={src}"] + (["--gpu", "0"] if gpu else [])
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    t0 = time.perf_counter()
    for line in p.stdout:
        lines.append(line.rstrip())
        m = re.search(r"in ([0-9.]+)s", line)
        if "qwen →" in line and m:
            return p, float(m.group(1)), time.perf_counter() - t0, lines
        if "load failed" in line:
            break
    raise RuntimeError("daemon did not load:\n" + "\n".join(lines))


def stop_daemon(p):
    os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (local disk)")
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="weightfs-bench-", dir="/var/tmp")
    src = os.path.join(work, "qwen3-8b")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    log(f"weightfs gpu-bench {datetime.date.today()}")
    t0 = time.perf_counter()
    total = make_checkpoint(src)
    log(f"checkpoint: {total / 1e9:.2f} GB in 4 shards, written in {time.perf_counter() - t0:.1f}s")
    files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".safetensors"))
    rows = []

    def row(name, secs, nbytes):
        rows.append((name, secs, nbytes / secs / 1e9))
        log(f"{name}: {secs:.3f}s {nbytes / secs / 1e9:.2f} GB/s")

    drop_caches()
    t0 = time.perf_counter()
    subprocess.run(["cat"] + files, stdout=subprocess.DEVNULL, check=True)
    row("raw cat, cold page cache", time.perf_counter() - t0, total)
    drop_caches()
    row("safetensors from disk, cold page cache", *timed("safetensors", src, runs=1))
    row("safetensors from disk, warm page cache", *timed("safetensors", src))
    shm = os.path.join("/dev/shm", "weightfs-bench")
    shutil.copytree(src, shm, dirs_exist_ok=True)
    row("safetensors from /dev/shm", *timed("safetensors", shm))
    shutil.rmtree(shm)

    drop_caches()
    daemon, load_secs, _, lines = start_daemon(args.bin, mnt, src, gpu=True)
    try:
        row("weightfs daemon load, cold (disk → host → GPU)", load_secs, total)
        mounted = os.path.join(mnt, "qwen")
        row("safetensors from the weightfs mount", *timed("safetensors", mounted))
        row("weightfs zero-copy (CUDA IPC)", *timed("zero-copy", mounted))
        row("weightfs zero-copy, copy=True", *timed("zero-copy+copy", mounted))
        with open("/proc/meminfo") as f:
            log("".join(line for line in f if "Huge" in line or "Shmem" in line))
        timed_once("zero-copy", mounted, profile=True)
    finally:
        stop_daemon(daemon)

    base = {n: s for n, s, _ in rows}
    best = min(base["safetensors from disk, warm page cache"], base["safetensors from disk, cold page cache"],
               base["safetensors from /dev/shm"])
    log(f"\n{total / 1e9:.1f} GB Qwen3-8B-shaped BF16 checkpoint, 4 shards, "
        f"{datetime.date.today()}; speed-up = best safetensors baseline time / time\n")
    log("| path | seconds | GB/s | speed-up |")
    log("|---|---|---|---|")
    for name, secs, gbs in rows:
        log(f"| {name} | {secs:.3f} | {gbs:.2f} | {best / secs:.2f}× |")
    cat = base["raw cat, cold page cache"]
    log(f"\ndaemon cold load / raw cat cold: {cat / base['weightfs daemon load, cold (disk → host → GPU)']:.2f}× of raw disk throughput")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
