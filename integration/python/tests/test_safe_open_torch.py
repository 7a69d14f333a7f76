"""torch tests of ``weightfs.safe_open`` against ``safetensors.safe_open`` (written for the GPU
machine; skipped here without torch, safetensors or CUDA).

An awkward file (unaligned offsets, zero-size, scalar, BOOL, FP8, many small tensors) is read
through both, every tensor and a set of slices compared bit for bit, dtype and shape; on a GPU
the zero-copy tensors must lie inside the slab that the helper process (``EXPORTER`` of
test_torch.py, standing in for the daemon) exports. A transformers model whose loader's
``safe_open``/``safe_load_file`` are swapped for weightfs' must answer with the same logits.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import tempfile
import unittest
from unittest import mock

import stfiles
from stfiles import build

import weightfs
from weightfs import manifest as m

from test_torch import (
    HAVE_CUDA,
    HAVE_SAFETENSORS,
    HAVE_TORCH,
    HAVE_TRANSFORMERS,
    _start_exporter,
    _stop_exporter,
)

if HAVE_TORCH:
    import torch

NO_TORCH = "torch is not installed: safe_open tensor tests skipped"
NO_ST = "safetensors is not installed: comparison with the reference skipped"
NO_CUDA = "no CUDA GPU visible to torch: zero-copy safe_open tests skipped"

#: Indexes tried on every tensor of enough rank (what engines use: TP shards are narrow slices).
SLICES = {
    0: [(...,), ()],
    1: [(slice(None),), (0,), (-1,), (slice(1, 3),), (slice(0, 0),), (slice(2, None),),
        (slice(None, None, 2),)],
    2: [(slice(None), 0), (slice(None), slice(1, 2)), (-1, slice(None)), (..., 0),
        (slice(1, None), slice(None, None, 2))],
}


def awkward(prefix: str = "", many: int = 300) -> bytes:
    """Unaligned offsets, zero-size, scalar, BOOL, FP8 and ``many`` small tensors, JSON order
    different from data order; every name starts with ``prefix`` (shards of one model)."""
    t = {
        "a.u8": ("U8", [3], b"\x01\x02\x03"),  # everything after it is unaligned
        "b.bf16": ("BF16", [2, 3], stfiles.bf16(1.0, -2.0, 0.5, 3.0, -0.25, 8.0)),
        "c.f32": ("F32", [3, 2], stfiles.f32(1.5, -1.0, 2.0, 0.0, -7.25, 1e-3)),
        "d.empty": ("F16", [0, 4], b""),
        "e.scalar": ("F64", [], stfiles.f64(-6.5)),
        "f.bool": ("BOOL", [2, 3], b"\x01\x00\x01\x00\x00\x01"),
        "g.fp8e4m3": ("F8_E4M3", [4, 2], bytes([0x38, 0xB8, 0x40, 0x00, 0x7E, 0x01, 0x44, 0xC0])),
        "h.fp8e5m2": ("F8_E5M2", [5], bytes([0x3C, 0xBC, 0x40, 0x00, 0x7B])),
        "i.i64": ("I64", [2, 2], stfiles.i64(-1, 2 ** 40, 0, 7)),
        "j.empty1": ("I32", [0], b""),
        "k.f16": ("F16", [3, 3], stfiles.f16(*range(9))),
    }
    for i in range(many):
        t[f"many.{i:03d}"] = ("I16", [i % 5 + 1], struct.pack(f"<{i % 5 + 1}h", *range(i % 5 + 1)))
    t = {prefix + k: v for k, v in t.items()}
    return build(t, metadata={"format": "pt", "note": "awkward"})


def _bits(t):
    """The bytes of a tensor (FP8 has no torch.equal on every build): dtype-agnostic. A fresh
    dense copy: a view with one element may keep a stride of 2 through contiguous()."""
    src = t.detach().to("cpu").reshape(-1)
    c = torch.empty(src.shape, dtype=src.dtype)
    c.copy_(src)
    return c.view(torch.uint8) if c.numel() else c


def _indexes(shape):
    out = list(SLICES[0])
    if len(shape) >= 1:
        out += SLICES[1]
    if len(shape) >= 2:
        out += SLICES[2]
    return out


class _Compare:
    def assertSameTensor(self, got, want, what):
        self.assertEqual(got.dtype, want.dtype, what)
        self.assertEqual(tuple(got.shape), tuple(want.shape), what)
        self.assertTrue(torch.equal(_bits(got), _bits(want)), what)

    def compare_files(self, path, reference, ours_kwargs, check=None):
        """Every tensor and slice of ``path`` through weightfs.safe_open equals
        ``reference``'s (a safe_open-like opener); ``check(name, tensor)`` on each of ours."""
        with weightfs.safe_open(path, framework="pt", **ours_kwargs) as f, \
                reference(path) as r:
            self.assertEqual(f.keys(), list(r.keys()))
            if hasattr(r, "offset_keys"):
                self.assertEqual(f.offset_keys(), list(r.offset_keys()))
            self.assertEqual(f.metadata(), r.metadata())
            for name in r.keys():
                got, want = f.get_tensor(name), r.get_tensor(name)
                self.assertSameTensor(got, want, name)
                if check:
                    check(name, got)
                gs, rs = f.get_slice(name), r.get_slice(name)
                self.assertEqual(gs.get_shape(), list(rs.get_shape()), name)
                self.assertEqual(gs.get_dtype(), rs.get_dtype(), name)
                for idx in _indexes(gs.get_shape()):
                    try:
                        w = rs[idx]
                    except Exception:  # noqa: BLE001 - a reference version that refuses this
                        continue  # index: weightfs (torch indexing) may serve it all the same
                    self.assertSameTensor(gs[idx], w, f"{name}{idx}")


def _write_awkward(cls) -> None:
    cls.tmp = tempfile.TemporaryDirectory()
    cls.path = os.path.join(cls.tmp.name, "awkward.safetensors")
    with open(cls.path, "wb") as f:
        f.write(awkward())


@unittest.skipUnless(HAVE_TORCH, NO_TORCH)
class SafeOpenReadTests(unittest.TestCase, _Compare):
    """No replica: the file is read (CPU), by the safetensors library or the stdlib reader."""

    @classmethod
    def setUpClass(cls):
        _write_awkward(cls)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @unittest.skipUnless(HAVE_SAFETENSORS, NO_ST)
    def test_matches_reference(self):
        from safetensors import safe_open as ref

        opener = lambda p: ref(p, framework="pt", device="cpu")  # noqa: E731
        self.compare_files(self.path, opener, {"device": "cpu"})
        with weightfs.safe_open(self.path, "pt", device="cpu") as f:
            self.assertFalse(f.zero_copy)

    @unittest.skipUnless(HAVE_SAFETENSORS, NO_ST)
    def test_stdlib_reader_matches_reference(self):
        from safetensors import safe_open as ref

        opener = lambda p: ref(p, framework="pt", device="cpu")  # noqa: E731
        with mock.patch.dict("sys.modules", {"safetensors": None}):  # ours cannot import it
            with weightfs.safe_open(self.path, "pt", device="cpu") as f:
                self.assertEqual(type(f._source()).__name__, "_ReadSource")
            self.compare_files(self.path, opener, {"device": "cpu"})

    def test_stdlib_reader_values(self):
        with mock.patch.dict("sys.modules", {"safetensors": None}):
            with weightfs.safe_open(self.path, "pt") as f:
                self.assertEqual(f.get_tensor("b.bf16").tolist(), [[1.0, -2.0, 0.5], [3.0, -0.25, 8.0]])
                self.assertEqual(f.get_tensor("e.scalar").item(), -6.5)
                self.assertEqual(f.get_tensor("d.empty").shape, (0, 4))
                self.assertEqual(f.get_tensor("f.bool").dtype, torch.bool)
                self.assertEqual(f.get_slice("c.f32")[1:, 0].tolist(), [2.0, -7.25])

    def test_unknown_and_closed(self):
        f = weightfs.safe_open(self.path, "pt")
        with self.assertRaisesRegex(weightfs.SafetensorError, "does not contain tensor x"):
            f.get_tensor("x")
        f.close()
        with self.assertRaisesRegex(weightfs.SafetensorError, "File is closed"):
            f.get_tensor("a.u8")


@unittest.skipUnless(HAVE_TORCH, NO_TORCH)
@unittest.skipUnless(HAVE_CUDA, NO_CUDA)
class SafeOpenZeroCopyTests(unittest.TestCase, _Compare):
    @classmethod
    def setUpClass(cls):
        _write_awkward(cls)
        cls.proc, raw = _start_exporter([cls.path])
        cls.man = m.parse_cuda_manifest(json.dumps(raw[cls.path]), cls.path)
        cls.dev = torch.cuda.current_device()

    @classmethod
    def tearDownClass(cls):
        _stop_exporter(cls.proc)
        cls.tmp.cleanup()

    def in_slab(self, t) -> bool:
        (_, base, size), = weightfs.gpu_pointer_ranges(self.man)
        return base <= t.data_ptr() < base + size

    def reference(self):
        if HAVE_SAFETENSORS:
            from safetensors import safe_open as ref

            return lambda p: ref(p, framework="pt", device=f"cuda:{self.dev}")
        return lambda p: weightfs.safe_open(p, "pt", device=f"cuda:{self.dev}",
                                            manifest=m.Manifest(1, self.man.file_size,
                                                                self.man.data_offset,
                                                                self.man.align, ()))

    def test_zero_copy_matches_reference(self):
        def check(name, t):
            self.assertEqual(t.device, torch.device("cuda", self.dev), name)
            if t.numel():
                self.assertTrue(self.in_slab(t), name)

        for device in (None, self.dev, f"cuda:{self.dev}"):
            with self.subTest(device=device):
                self.compare_files(self.path, self.reference(),
                                   {"device": device, "manifest": self.man}, check)
                with weightfs.safe_open(self.path, "pt", device=device, manifest=self.man) as f:
                    self.assertTrue(f.zero_copy)
                    self.assertTrue(self.in_slab(f.get_slice("c.f32")[1:, 0]))

    def test_copy(self):
        def check(name, t):
            if t.numel():
                self.assertFalse(self.in_slab(t), name)

        self.compare_files(self.path, self.reference(),
                           {"copy": True, "manifest": self.man}, check)
        with weightfs.safe_open(self.path, "pt", copy=True, manifest=self.man) as f:
            self.assertFalse(f.zero_copy)  # the slab is read, the tensors are private copies

    def test_cpu_reads_file(self):
        with weightfs.safe_open(self.path, "pt", device="cpu", manifest=self.man) as f:
            self.assertFalse(f.zero_copy)
            self.assertEqual(f.get_tensor("e.scalar").device.type, "cpu")

    @unittest.skipUnless(HAVE_TRANSFORMERS and HAVE_SAFETENSORS
                         and importlib.util.find_spec("accelerate") is not None,
                         "transformers/safetensors/accelerate not installed: swap test skipped")
    def test_transformers_swap_same_logits(self):
        import transformers
        from transformers import modeling_utils

        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, tie_word_embeddings=False)
        torch.manual_seed(0)
        folder = os.path.join(self.tmp.name, "tiny")
        transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
        ids = torch.tensor([[1, 5, 9, 17, 33]], device=f"cuda:{self.dev}")
        base = transformers.AutoModelForCausalLM.from_pretrained(
            folder, torch_dtype=torch.bfloat16).to(f"cuda:{self.dev}")
        with torch.no_grad():
            want = base(ids).logits
        files = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                       if n.endswith(".safetensors"))
        proc, raw = _start_exporter(files)
        try:
            mans = {p: m.parse_cuda_manifest(json.dumps(raw[p]), p) for p in files}

            def wf_open(path, framework="pt", device="cpu", **kw):
                p = os.fspath(path)  # "cpu" is the reference's default: take the replica
                dev = None if device in (None, "cpu") else device
                return weightfs.safe_open(p, framework, device=dev, manifest=mans.get(p), **kw)

            def wf_load(path, device="cpu"):
                p = os.fspath(path)
                return weightfs.load_file(p, manifest=mans.get(p))

            patches = [mock.patch.object(modeling_utils, "safe_open", wf_open)]
            if hasattr(modeling_utils, "safe_load_file"):
                patches.append(mock.patch.object(modeling_utils, "safe_load_file", wf_load))
            for pt in patches:
                pt.start()
            try:
                model = transformers.AutoModelForCausalLM.from_pretrained(
                    folder, torch_dtype=torch.bfloat16, device_map=f"cuda:{self.dev}")
            finally:
                for pt in patches:
                    pt.stop()
            with torch.no_grad():
                got = model(ids).logits
            self.assertTrue(torch.equal(got, want))
            del model, got
        finally:
            _stop_exporter(proc)


if __name__ == "__main__":
    unittest.main()
