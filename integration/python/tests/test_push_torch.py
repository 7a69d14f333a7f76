"""weightfs.push with torch tensors (skipped without torch; the slab tests without a CUDA GPU).

The daemon is test_push.py's fake, run in a helper process (a process cannot open its own CUDA
IPC handles): with a slab it allocates with the driver API and exports the way the daemon does,
so CUDA tensors go device to device; without, every tensor goes through the scratch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unittest

from stfiles import build  # noqa: F401  (puts the package on sys.path)

import weightfs

try:
    import torch

    HAVE_TORCH = True
    HAVE_CUDA = torch.cuda.is_available()
except ImportError:  # CI and dev machines have no torch
    torch = None
    HAVE_TORCH = HAVE_CUDA = False

TESTS = os.path.dirname(os.path.abspath(__file__))

FAKE = r"""
import ctypes as C, json, sys
sys.path.insert(0, sys.argv[1])
import test_push

class Slab:
    def __init__(self):
        self.cu = cu = C.CDLL("libcuda.so.1")
        cu.cuMemAlloc_v2.argtypes = [C.POINTER(C.c_uint64), C.c_size_t]
        cu.cuMemcpyDtoH_v2.argtypes = [C.c_void_p, C.c_uint64, C.c_size_t]
        cu.cuMemsetD8_v2.argtypes = [C.c_uint64, C.c_ubyte, C.c_size_t]
        assert cu.cuInit(0) == 0
        dev, self.ctx = C.c_int(), C.c_void_p()
        assert cu.cuDeviceGet(C.byref(dev), 0) == 0
        assert cu.cuDevicePrimaryCtxRetain(C.byref(self.ctx), dev) == 0
        assert cu.cuCtxSetCurrent(self.ctx) == 0
        raw = (C.c_ubyte * 16)()
        assert cu.cuDeviceGetUuid_v2(raw, dev) == 0
        h = bytes(raw).hex()
        self.gpu = f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    def replicas(self, n):
        import base64
        cu = self.cu
        cu.cuCtxSetCurrent(self.ctx)
        self.ptr = C.c_uint64()
        assert cu.cuMemAlloc_v2(C.byref(self.ptr), n) == 0
        assert cu.cuMemsetD8_v2(self.ptr.value, 0xAB, n) == 0
        handle = (C.c_char * 64)()
        assert cu.cuIpcGetMemHandle(handle, self.ptr) == 0
        return [{"gpu": self.gpu, "handle": base64.b64encode(bytes(handle)).decode()}]
    def read(self, off, n):
        self.cu.cuCtxSetCurrent(self.ctx)
        buf = (C.c_ubyte * max(n, 1))()
        assert self.cu.cuMemcpyDtoH_v2(buf, self.ptr.value + off, n) == 0
        return bytes(buf)[:n]

d = test_push.FakeDaemon(slab=Slab() if sys.argv[2] == "slab" else None, scratch_bytes=12000)  # as the daemon: at least the largest tensor
print(d.path, flush=True)
sys.stdin.readline()
s = d.sessions[-1]
s.done.wait(30)
print(json.dumps({"received": {k: v.hex() for k, v in s.received.items()}, "gpus": s.gpus,
                  "ops": s.ops, "errors": s.errors}), flush=True)
d.close()
"""


def _bytes(t) -> bytes:
    t = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return bytes(t.tolist())


@unittest.skipUnless(HAVE_TORCH, "skipping: torch is not installed")
class TestPushTorch(unittest.TestCase):
    def run_push(self, mode: str, tensors: dict) -> dict:
        proc = subprocess.Popen([sys.executable, "-c", FAKE, TESTS, mode],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            path = proc.stdout.readline().strip()
            self.assertTrue(path, "the fake daemon did not start")
            n = weightfs.push("policy", tensors, socket=path)
            self.assertEqual(n, 1)
            proc.stdin.write("\n")
            proc.stdin.flush()
            report = json.loads(proc.stdout.readline())
        finally:
            proc.stdin.close()
            proc.wait(60)
            proc.stdout.close()
        self.assertEqual(report["errors"], [])
        got = {k: bytes.fromhex(v) for k, v in report["received"].items()}
        self.assertEqual(got, {k: _bytes(t) for k, t in tensors.items()})
        return report

    def tensors(self, device: str) -> dict:
        g = torch.Generator().manual_seed(0)
        big = torch.randn(40, 50, generator=g)  # 8000 bytes: more than half the scratch, so it goes alone
        return {
            "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16).to(device),
            "t": big.to(device).t(),  # not contiguous
            "big": big.to(device),
            "mask": torch.tensor([True, False, True], device=device),
            "fp8": torch.randn(4, generator=g).to(torch.float8_e4m3fn).to(device),
            "empty": torch.empty(0, 3, device=device),
            "scalar": torch.tensor(2.5, dtype=torch.float64, device=device),
            "cpu": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        }

    def test_cpu_tensors_through_the_scratch(self):
        ops = self.run_push("none", self.tensors("cpu"))["ops"]
        self.assertFalse(any(op["op"] == "written" for op in ops))

    def test_meta_tensor_refused(self):
        with self.assertRaisesRegex(ValueError, "'w' is on the meta device"):
            weightfs.push("p", {"w": torch.empty(2, device="meta")}, socket="/nonexistent")

    @unittest.skipUnless(HAVE_CUDA, "skipping: no CUDA GPU")
    def test_cuda_into_the_slab(self):
        t = self.tensors("cuda")
        report = self.run_push("slab", t)
        cuda = {k for k, v in t.items() if v.is_cuda and v.numel()}
        written = {n for op in report["ops"] if op["op"] == "written" for n in op["tensors"]}
        self.assertEqual(written, cuda)
        self.assertTrue(all(g.startswith("GPU-") for g in report["gpus"]))
        # the slabs were dropped before the commit: it says so
        self.assertEqual(report["ops"][-1], {"op": "commit", "released": True})

    @unittest.skipUnless(HAVE_CUDA, "skipping: no CUDA GPU")
    def test_cuda_without_replicas_through_the_scratch(self):
        report = self.run_push("none", self.tensors("cuda"))
        self.assertFalse(any(op["op"] == "written" for op in report["ops"]))


if __name__ == "__main__":
    unittest.main()
