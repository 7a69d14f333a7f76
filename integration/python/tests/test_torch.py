"""torch tests of weightfs.load_file / state_dict / load_model.

CPU tests need torch; the zero-copy tests also need a CUDA GPU. They build their own GPU
replica: a helper process (the "exporter", standing in for the daemon) copies each file's tensors
into a slab following the layout rule and prints the user.weightfs.cuda record, whose handle this
process then opens.
"""

from __future__ import annotations

import base64
import errno
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import stfiles
from stfiles import build, f32

from weightfs import manifest as m

HAVE_TORCH = importlib.util.find_spec("torch") is not None
if HAVE_TORCH:
    import torch

    import weightfs
    from weightfs import torch_loader as tl

    HAVE_CUDA = torch.cuda.is_available()
else:
    HAVE_CUDA = False
HAVE_TRANSFORMERS = HAVE_TORCH and importlib.util.find_spec("transformers") is not None
HAVE_SAFETENSORS = importlib.util.find_spec("safetensors") is not None

PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TORCH = "torch is not installed: torch tests skipped (pip install torch to run them)"
NO_CUDA = "no CUDA GPU visible to torch: zero-copy tests skipped"


def _write(d: str, name: str, data: bytes) -> str:
    p = os.path.join(d, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


@unittest.skipUnless(HAVE_TORCH, NO_TORCH)
class TorchReadTests(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.unaligned = _write(self.tmp.name, "u.safetensors", stfiles.unaligned())
        self.mixed = _write(self.tmp.name, "m.safetensors", stfiles.mixed())
        self.simple = _write(self.tmp.name, "s.safetensors", stfiles.simple())

    def check_unaligned(self, d):
        self.assertEqual(d["x"].dtype, torch.bfloat16)
        self.assertEqual(d["x"].tolist(), [1.0, -2.0, 0.5])
        self.assertEqual(d["y"].dtype, torch.float32)
        self.assertEqual(d["y"].tolist(), [3.25, -8.0])

    def check_mixed(self, d):
        self.assertEqual(d["w1"].tolist(), list(range(10)))
        self.assertEqual(d["e"].shape, (0, 3))
        self.assertEqual(d["w2"].dtype, torch.float16)
        self.assertEqual(d["w2"].tolist(), [[1, 2], [3, 4]])
        self.assertEqual(d["s"].shape, ())
        self.assertEqual(d["s"].item(), 6.5)

    def test_read_paths(self):
        for loader in (lambda p: weightfs.load_file(p, prefer="read"),
                       lambda p: weightfs.load_file(p, device="cpu"),
                       tl._load_stdlib):
            self.check_unaligned(loader(self.unaligned))
            self.check_mixed(loader(self.mixed))
            s = loader(self.simple)
            self.assertEqual(s["a"].tolist(), [[1, 2], [3, 4]])
            self.assertEqual(s["b"].tolist(), [-1, 0, 7])

    def test_stdlib_reader_without_safetensors(self):
        with mock.patch.dict(sys.modules, {"safetensors": None, "safetensors.torch": None}):
            d = weightfs.load_file(self.unaligned)
        self.check_unaligned(d)
        self.assertEqual(d["y"].data_ptr() % 4, 0)

    @unittest.skipUnless(HAVE_SAFETENSORS, "safetensors not installed: cross-check skipped")
    def test_stdlib_reader_matches_safetensors(self):
        from safetensors.torch import load_file as st_load

        for p in (self.unaligned, self.mixed, self.simple):
            a, b = tl._load_stdlib(p), st_load(p)
            self.assertEqual(a.keys(), b.keys())
            for k in a:
                self.assertEqual(a[k].dtype, b[k].dtype, k)
                self.assertTrue(torch.equal(a[k], b[k]), k)

    def test_torch_dtypes(self):
        for st, name in m.TORCH_DTYPE_NAMES.items():
            if name is None:
                with self.assertRaises(TypeError):
                    weightfs.torch_dtype(st)
            elif hasattr(torch, name):
                self.assertIs(weightfs.torch_dtype(st), getattr(torch, name))

    def test_prefer_ipc_without_replica(self):
        with self.assertRaisesRegex(RuntimeError, "no GPU replica"):
            weightfs.load_file(self.simple, prefer="ipc")
        with self.assertRaisesRegex(ValueError, "needs a CUDA device"):
            weightfs.load_file(self.simple, device="cpu", prefer="ipc")
        with self.assertRaises(ValueError):
            weightfs.load_file(self.simple, prefer="fast")

    def test_replica_on_invisible_gpu(self):
        h = m.read_header(self.simple)
        man = m.parse_cuda_manifest(json.dumps({
            "schema": 1, "file_size": h.file_size, "data_offset": h.data_offset, "align": m.DEFAULT_ALIGN,
            "replicas": [{"gpu": "GPU-00000000-0000-0000-0000-000000000000",
                          "handle": base64.b64encode(bytes(64)).decode(), "slab_bytes": 4096}]}))
        d = weightfs.load_file(self.simple, manifest=man)  # falls back to reading
        self.assertEqual(d["a"].device.type, "cpu")
        with self.assertRaisesRegex(RuntimeError, "no GPU replica on a visible GPU"):
            weightfs.load_file(self.simple, manifest=man, prefer="ipc")

    def _folder(self):
        """A two-shard checkpoint of _Tiny without lm_head.weight (tied)."""
        folder = os.path.join(self.tmp.name, "tiny@1")
        os.mkdir(folder)
        emb = f32(*[float(i) for i in range(12)])
        _write(folder, "model-00001-of-00002.safetensors",
               build({"embed.weight": ("F32", [4, 3], emb)}))
        _write(folder, "model-00002-of-00002.safetensors",
               build({"proj.weight": ("F32", [3, 3], f32(*[1.0] * 9)),
                      "proj.bias": ("F32", [3], f32(0.5, 0.5, 0.5))}))
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {"embed.weight": "model-00001-of-00002.safetensors",
                                      "proj.weight": "model-00002-of-00002.safetensors",
                                      "proj.bias": "model-00002-of-00002.safetensors"}}, f)
        os.symlink("tiny@1", os.path.join(self.tmp.name, "tiny"))
        return os.path.join(self.tmp.name, "tiny")

    def test_state_dict_and_load_model(self):
        folder = self._folder()
        sd = weightfs.state_dict(folder)
        self.assertEqual(sorted(sd), ["embed.weight", "proj.bias", "proj.weight"])
        with torch.device("meta"):
            model = _Tiny()
        out = weightfs.load_model_folder(model, folder)
        self.assertIs(out, model)
        self.assertFalse(any(p.is_meta for p in model.parameters()))
        self.assertIs(model.lm_head.weight, model.embed.weight)
        self.assertEqual(model.embed.weight[1].tolist(), [3.0, 4.0, 5.0])
        y = model(torch.tensor([[1]]))
        self.assertEqual(y.shape, (1, 1, 4))

    def test_load_model_strict(self):
        folder = self._folder()
        with torch.device("meta"):
            model = _Tiny(extra=True)
        with self.assertRaisesRegex(RuntimeError, "missing keys: extra.weight"):
            weightfs.load_model_folder(model, folder)
        with torch.device("meta"):
            model = _Tiny(extra=True)
        with self.assertWarnsRegex(RuntimeWarning, "still on the meta device.*extra.weight"):
            weightfs.load_model_folder(model, folder, strict=False)
        self.assertTrue(model.extra.weight.is_meta)

    def test_update_model(self):
        folder = self._folder()
        os.makedirs(os.path.join(self.tmp.name, ".weightfs", "versions"))  # a fake mount
        model = _Tiny()
        ptrs = {n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items()}
        from unittest import mock
        from weightfs import torch_loader
        with mock.patch.object(torch_loader, "release") as rel:  # no slab opened: none released
            self.assertEqual(weightfs.update_model(model, folder), 1)
        rel.assert_not_called()
        self.assertEqual(model.embed.weight[1].tolist(), [3.0, 4.0, 5.0])
        self.assertEqual(model.proj.bias.tolist(), [0.5, 0.5, 0.5])
        self.assertIs(model.lm_head.weight, model.embed.weight)
        self.assertTrue(model.proj.weight.requires_grad)
        self.assertEqual({n: t.data_ptr() for n, t in model.state_dict(keep_vars=True).items()}, ptrs)

        other = _Tiny(extra=True)
        before = {n: t.detach().clone() for n, t in other.state_dict().items()}
        with self.assertRaisesRegex(weightfs.ModelMismatchError, "missing keys: extra.weight"):
            weightfs.update_model(other, folder)
        for n, t in other.state_dict().items():
            self.assertTrue(torch.equal(t, before[n]), n)
        self.assertEqual(weightfs.update_model(other, folder, strict=False), 1)
        self.assertEqual(other.proj.bias.tolist(), [0.5, 0.5, 0.5])

        wide = _Tiny().double()
        with self.assertRaisesRegex(weightfs.ModelMismatchError, "dtype or shape differs: embed"):
            weightfs.update_model(wide, folder)

        with torch.device("meta"):
            meta = _Tiny()
        with self.assertRaisesRegex(weightfs.ModelMismatchError, "meta device"):
            weightfs.update_model(meta, folder)

    def test_update_model_rebind(self):
        folder = self._folder()
        os.makedirs(os.path.join(self.tmp.name, ".weightfs", "versions"))
        model = _Tiny()
        param = model.proj.weight
        self.assertEqual(weightfs.update_model(model, folder + "@1", copy=False), 1)
        self.assertIs(model.proj.weight, param)  # same Parameter, new storage
        self.assertEqual(param.tolist(), [[1.0] * 3] * 3)
        self.assertIs(model.lm_head.weight, model.embed.weight)
        self.assertEqual(model.lm_head.weight[1].tolist(), [3.0, 4.0, 5.0])

    def test_update_model_not_a_mount(self):
        folder = self._folder()  # no .weightfs/versions beside it
        with self.assertRaises(weightfs.NotOnMountError):
            weightfs.update_model(_Tiny(), folder)


if HAVE_TORCH:
    class _Tiny(torch.nn.Module):
        def __init__(self, extra=False):
            super().__init__()
            self.embed = torch.nn.Embedding(4, 3)
            self.proj = torch.nn.Linear(3, 3)
            self.lm_head = torch.nn.Linear(3, 4, bias=False)
            if extra:
                self.extra = torch.nn.Linear(1, 1, bias=False)
            self.tie_weights()

        def tie_weights(self):
            self.lm_head.weight = self.embed.weight

        def forward(self, ids):
            return self.lm_head(self.proj(self.embed(ids)))


EXPORTER = r"""
# Stands in for the daemon: one cuMemAlloc slab per file, tensors copied in at their layout
# offsets, the slab's legacy IPC handle published. Driver API through ctypes, no torch.
import base64, ctypes as C, json, sys
sys.path.insert(0, sys.argv[1])
from weightfs.manifest import DEFAULT_ALIGN, read_header, slab_layout, slab_end

cu = C.CDLL("libcuda.so.1")
def ck(rc, what):
    if rc:
        raise SystemExit(f"exporter: {what} failed: CUresult {rc}")
class Handle(C.Structure):
    _fields_ = [("reserved", C.c_char * 64)]
cu.cuMemAlloc_v2.argtypes = [C.POINTER(C.c_uint64), C.c_size_t]
cu.cuMemcpyHtoD_v2.argtypes = [C.c_uint64, C.c_void_p, C.c_size_t]
cu.cuMemsetD8_v2.argtypes = [C.c_uint64, C.c_ubyte, C.c_size_t]
cu.cuIpcGetMemHandle.argtypes = [C.POINTER(Handle), C.c_uint64]
ck(cu.cuInit(0), "cuInit")
dev, ctx = C.c_int(), C.c_void_p()
ck(cu.cuDeviceGet(C.byref(dev), 0), "cuDeviceGet")
ck(cu.cuDevicePrimaryCtxRetain(C.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
ck(cu.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
raw = (C.c_ubyte * 16)()
ck(cu.cuDeviceGetUuid_v2(raw, dev), "cuDeviceGetUuid_v2")
h = bytes(raw).hex()
gpu = f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
out = {}
for p in sys.argv[2:]:
    hd = read_header(p)
    lay = slab_layout(hd, DEFAULT_ALIGN)
    nbytes = max(slab_end(lay), 1)
    ptr = C.c_uint64()
    ck(cu.cuMemAlloc_v2(C.byref(ptr), nbytes), "cuMemAlloc")
    ck(cu.cuMemsetD8_v2(ptr.value, 0xAB, nbytes), "cuMemsetD8")
    data = open(p, "rb").read()
    for name, e in lay.items():
        t = hd.tensors[name]
        if e.nbytes:
            src = data[hd.data_offset + t.begin:hd.data_offset + t.end]
            ck(cu.cuMemcpyHtoD_v2(ptr.value + e.offset, src, e.nbytes), "cuMemcpyHtoD")
    ck(cu.cuCtxSynchronize(), "cuCtxSynchronize")
    handle = Handle()
    ck(cu.cuIpcGetMemHandle(C.byref(handle), ptr.value), "cuIpcGetMemHandle")
    out[p] = {"schema": 1, "file_size": hd.file_size, "data_offset": hd.data_offset,
              "align": DEFAULT_ALIGN, "replicas": [{"gpu": gpu, "slab_bytes": nbytes,
                                          "handle": base64.b64encode(bytes(handle)).decode()}]}
print(json.dumps(out), flush=True)
sys.stdin.read()  # keep the slabs until the test closes our stdin
"""


def _start_exporter(paths):
    proc = subprocess.Popen([sys.executable, "-c", EXPORTER, PKG_DIR, *paths],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        raise RuntimeError(f"exporter process failed (exit {proc.returncode}; stderr above)")
    return proc, json.loads(line)


def _stop_exporter(proc):
    import gc

    gc.collect()  # drop this process's views of the slabs first
    torch.cuda.synchronize()
    proc.stdin.close()
    proc.stdout.close()
    proc.wait(timeout=60)



@unittest.skipUnless(HAVE_TORCH, NO_TORCH)
@unittest.skipUnless(HAVE_CUDA, NO_CUDA)
class CudaIPCTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        g = torch.Generator().manual_seed(0)
        big = torch.randn(1000, 257, generator=g).to(torch.bfloat16)
        cls.files = {
            "unaligned": _write(cls.tmp.name, "u.safetensors", stfiles.unaligned()),
            "mixed": _write(cls.tmp.name, "m.safetensors", stfiles.mixed()),
            "big": _write(cls.tmp.name, "big.safetensors", build({
                "odd": ("I8", [7], bytes(range(7))),
                "big": ("BF16", list(big.shape), bytes(big.view(torch.uint8).flatten().tolist())),
                "flag": ("BOOL", [3], b"\x01\x00\x01"),
            })),
        }
        cls.proc, cls.raw = _start_exporter(list(cls.files.values()))
        cls.man = {k: m.parse_cuda_manifest(json.dumps(cls.raw[p]), p)
                   for k, p in cls.files.items()}
        cls.dev = torch.cuda.current_device()

    @classmethod
    def tearDownClass(cls):
        _stop_exporter(cls.proc)
        cls.tmp.cleanup()

    def ranges(self, key):
        return weightfs.gpu_pointer_ranges(self.man[key])

    def assertInSlab(self, t, key):
        (gpu, base, size), = self.ranges(key)
        self.assertTrue(base <= t.data_ptr() < base + size, (hex(t.data_ptr()), hex(base)))

    def test_zero_copy_matches_read(self):
        for key, p in self.files.items():
            got = weightfs.load_file(p, manifest=self.man[key], prefer="ipc")
            want = weightfs.load_file(p, prefer="read")
            self.assertEqual(got.keys(), want.keys())
            for k, t in got.items():
                self.assertEqual(t.device, torch.device("cuda", self.dev), k)
                self.assertEqual(t.dtype, want[k].dtype, k)
                self.assertEqual(t.shape, want[k].shape, k)
                self.assertTrue(torch.equal(t.cpu(), want[k]), k)
                if t.numel():
                    self.assertInSlab(t, key)
                    self.assertTrue(t.is_contiguous())

    def test_offsets_follow_layout(self):
        p = self.files["mixed"]
        got = weightfs.load_file(p, manifest=self.man["mixed"])
        (_, base, _), = self.ranges("mixed")
        self.assertEqual(got["w1"].data_ptr() - base, 0)
        self.assertEqual(got["w2"].data_ptr() - base, m.DEFAULT_ALIGN)
        self.assertEqual(got["s"].data_ptr() - base, 2 * m.DEFAULT_ALIGN)

    def test_slab_opened_once(self):
        p = self.files["big"]
        a = weightfs.load_file(p, manifest=self.man["big"])
        b = weightfs.load_file(p, device=self.dev, manifest=self.man["big"])
        self.assertEqual(a["big"].data_ptr(), b["big"].data_ptr())
        self.assertEqual(len(self.ranges("big")), 1)
        self.assertEqual(weightfs.gpu_pointer_ranges(self.man["big"])[0][0],
                         self.man["big"].replicas[0].gpu)
        self.assertIn(self.man["big"].replicas[0].gpu, [g for g, _, _ in weightfs.gpu_pointer_ranges()])
        # the slab closes with its last tensor, and opens again on demand
        del a, b
        import gc

        gc.collect()
        self.assertEqual(self.ranges("big"), [])
        c = weightfs.load_file(p, manifest=self.man["big"])
        self.assertInSlab(c["big"], "big")

    def test_copy(self):
        p = self.files["big"]
        view = weightfs.load_file(p, manifest=self.man["big"])
        priv = weightfs.load_file(p, copy=True, manifest=self.man["big"])
        (_, base, size), = self.ranges("big")
        for k, t in priv.items():
            self.assertFalse(base <= t.data_ptr() < base + size, k)
            self.assertTrue(torch.equal(t, view[k]), k)

    def test_cpu_device_reads_file(self):
        d = weightfs.load_file(self.files["unaligned"], device="cpu", manifest=self.man["unaligned"])
        self.assertEqual(d["x"].device.type, "cpu")
        self.assertEqual(d["y"].tolist(), [3.25, -8.0])

    def test_manifest_mismatch(self):
        p = self.files["unaligned"]
        rec = dict(self.raw[p], file_size=os.path.getsize(p) + 1)
        bad = m.parse_cuda_manifest(json.dumps(rec), self.files["unaligned"])
        with self.assertWarns(RuntimeWarning):
            d = weightfs.load_file(self.files["unaligned"], manifest=bad)
        self.assertEqual(d["x"].device.type, "cpu")
        with self.assertRaisesRegex(ValueError, "file_size"):
            weightfs.load_file(self.files["unaligned"], manifest=bad, prefer="ipc")

    def test_via_xattr(self):
        p = self.files["unaligned"]
        try:
            os.setxattr(p, m.XATTR_CUDA, json.dumps(self.raw[p]).encode())
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                self.skipTest(f"{self.tmp.name}: no user xattrs ({e.strerror})")
            raise
        try:
            d = weightfs.load_file(p)
            self.assertEqual(d["y"].device.type, "cuda")
            self.assertEqual(d["y"].tolist(), [3.25, -8.0])
            self.assertEqual(len(weightfs.gpu_pointer_ranges(p)), 1)
        finally:
            os.removexattr(p, m.XATTR_CUDA)

    @unittest.skipUnless(HAVE_TRANSFORMERS, "transformers not installed: model test skipped")
    def test_transformers_model(self):
        import transformers
        from safetensors.torch import save_file

        cfg = transformers.Qwen3Config(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=128, tie_word_embeddings=True)
        torch.manual_seed(0)
        ref = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        sd = {k: v.detach().contiguous().clone() for k, v in ref.state_dict().items()
              if k != "lm_head.weight"}
        folder = os.path.join(self.tmp.name, "qwen3-tiny")
        os.mkdir(folder)
        keys = sorted(sd)
        half = len(keys) // 2
        shards = {"model-00001-of-00002.safetensors": keys[:half],
                  "model-00002-of-00002.safetensors": keys[half:]}
        for name, ks in shards.items():
            save_file({k: sd[k] for k in ks}, os.path.join(folder, name), {"format": "pt"})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, f)
        paths = [os.path.join(folder, n) for n in shards]
        proc, recs = _start_exporter(paths)
        try:
            by_ino = {os.stat(p).st_ino: m.parse_cuda_manifest(json.dumps(recs[p]), p)
                      for p in paths}
            fake = lambda fd: by_ino.get(os.fstat(fd).st_ino)  # noqa: E731
            ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                want = ref.to(f"cuda:{self.dev}")(ids.to(f"cuda:{self.dev}")).logits
            for prefer in ("ipc", "read"):
                with mock.patch.object(tl, "read_cuda_manifest", fake), \
                        torch.device("meta"):
                    model = transformers.AutoModelForCausalLM.from_config(cfg)
                with mock.patch.object(tl, "read_cuda_manifest", fake):
                    weightfs.load_model_folder(model, folder, device=self.dev, prefer=prefer)
                model.eval()
                self.assertIs(model.lm_head.weight, model.model.embed_tokens.weight)
                left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                        if t.is_meta]
                self.assertEqual(left, [])
                if prefer == "ipc":
                    w = model.model.layers[0].mlp.up_proj.weight
                    ranges = weightfs.gpu_pointer_ranges(by_ino[os.stat(paths[0]).st_ino]) + \
                        weightfs.gpu_pointer_ranges(by_ino[os.stat(paths[1]).st_ino])
                    self.assertTrue(any(b <= w.data_ptr() < b + s for _, b, s in ranges))
                with torch.no_grad():
                    got = model(ids.to(f"cuda:{self.dev}")).logits
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=prefer)
                del model, got
        finally:
            _stop_exporter(proc)


if __name__ == "__main__":
    unittest.main()
