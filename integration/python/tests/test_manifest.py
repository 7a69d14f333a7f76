"""Standard-library tests of weightfs.manifest: safetensors header, slab layout, GPU manifest."""

from __future__ import annotations

import base64
import errno
import io
import json
import os
import struct
import tempfile
import unittest

import stfiles  # noqa: F401  (puts the package on sys.path)
from stfiles import build, raw_file

from weightfs import manifest as m


def _write(tmp: str, name: str, data: bytes) -> str:
    p = os.path.join(tmp, name)
    with open(p, "wb") as f:
        f.write(data)
    return p


HANDLE = bytes(range(64))


def _manifest_json(**over) -> dict:
    d = {
        "schema": 1,
        "file_size": 294,
        "data_offset": 270,
        "align": m.DEFAULT_ALIGN,
        "replicas": [{"gpu": "GPU-0A1B2C3D-1111-2222-3333-444455556666",
                      "handle": base64.b64encode(HANDLE).decode(),
                      "slab_bytes": 1 << 20}],
    }
    d.update(over)
    return d


class TestReadHeader(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def test_simple(self):
        data = stfiles.simple()
        p = _write(self.tmp.name, "simple.safetensors", data)
        h = m.read_header(p)
        self.assertEqual(list(h.tensors), ["b", "a"])  # JSON order kept
        self.assertEqual(h.metadata, {"format": "pt"})
        self.assertEqual(h.file_size, len(data))
        self.assertEqual(h.data_offset, 8 + struct.unpack("<Q", data[:8])[0])
        self.assertEqual(h.path, p)
        a = h.tensors["a"]
        self.assertEqual((a.dtype, a.shape, a.data_offsets, a.nbytes, a.numel),
                         ("F32", (2, 2), (0, 16), 16, 4))
        b = h.tensors["b"]
        self.assertEqual((b.dtype, b.shape, b.data_offsets), ("I64", (3,), (16, 40)))
        self.assertEqual(h.data_size, 40)

    def test_fileobj_and_bytes(self):
        data = stfiles.unaligned()
        h1 = m.read_header(io.BytesIO(data))
        h2 = m.parse_header(data, len(data))
        p = _write(self.tmp.name, "u.safetensors", data)
        with open(p, "rb") as f:
            f.read(5)  # read_header rewinds
            h3 = m.read_header(f)
        for h in (h1, h2, h3):
            self.assertEqual(h.tensors["x"].data_offsets, (0, 6))
            self.assertEqual(h.tensors["y"].data_offsets, (6, 14))
            self.assertEqual(h.file_size, len(data))

    def test_padded_header(self):
        data = stfiles.mixed()
        h = m.parse_header(data, len(data))
        self.assertEqual(h.data_offset, 4096)
        self.assertEqual(h.tensors["e"].shape, (0, 3))
        self.assertEqual(h.tensors["s"].shape, ())
        self.assertEqual(h.tensors["s"].numel, 1)

    def test_empty_file(self):
        data = raw_file(b"{}", b"")
        h = m.parse_header(data, len(data))
        self.assertEqual(h.tensors, {})
        self.assertEqual(m.slab_layout(h), {})

    def assertBad(self, data: bytes, needle: str, cls: str, strict: bool = True):
        p = _write(self.tmp.name, "bad.safetensors", data)
        with self.assertRaises(ValueError) as cm:
            m.read_header(p, strict=strict)
        self.assertIsInstance(cm.exception, m.HeaderError)
        self.assertIn(p, str(cm.exception))
        self.assertIn(needle, str(cm.exception))
        self.assertEqual(cm.exception.cls, cls, str(cm.exception))
        self.assertIn(cls, m.HEADER_ERROR_CLASSES)

    def test_malformed(self):
        good = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        d8 = bytes(8)

        def hdr(obj) -> bytes:
            return raw_file(json.dumps(obj).encode(), d8)

        self.assertBad(b"\x01\x00", "shorter than 8 bytes", "truncated")
        self.assertBad(struct.pack("<Q", 100_000_001) + b"{}", "exceeds", "header_too_large")
        self.assertBad(struct.pack("<Q", 50) + b"{}", "past the end", "truncated")
        self.assertBad(raw_file(b"[1, 2]", b""), "not a JSON object", "invalid_json")
        self.assertBad(raw_file(b"{not json}", b""), "not valid JSON", "invalid_json")
        # A repeated key is no error in itself (the last one counts), but each value is checked.
        self.assertBad(raw_file(b'{"a": 1, "a": 2}', b""), "not a JSON object", "bad_entry")
        self.assertBad(raw_file(b'{"a": NaN}', b""), "not valid JSON", "invalid_json")
        self.assertBad(raw_file(b"{\"a\": \"\xff\"}", b""), "not valid UTF-8", "invalid_utf8")
        self.assertBad(hdr({"t": [1]}), "not a JSON object", "bad_entry")
        self.assertBad(hdr({"t": {**good, "dtype": "F33"}}), "unknown dtype", "bad_dtype")
        self.assertBad(hdr({"t": {"shape": [2], "data_offsets": [0, 8]}}), "dtype", "bad_dtype")
        self.assertBad(hdr({"t": {**good, "shape": [-2]}}), "shape", "bad_shape")
        self.assertBad(hdr({"t": {**good, "shape": [True]}}), "shape", "bad_shape")
        self.assertBad(hdr({"t": {**good, "shape": 2}}), "shape", "bad_shape")
        self.assertBad(hdr({"t": {**good, "data_offsets": [8, 0]}}), "data_offsets", "bad_offsets")
        self.assertBad(hdr({"t": {**good, "data_offsets": [0]}}), "data_offsets", "bad_offsets")
        self.assertBad(hdr({"t": {**good, "shape": [3]}}), "needs 12", "size_mismatch")
        self.assertBad(hdr({"t": {**good, "shape": [4], "data_offsets": [0, 16]}}),
                       "past the end of the file", "truncated")
        self.assertBad(hdr({"t": {**good, "dtype": "F4", "shape": [3],
                                  "data_offsets": [0, 2]}}), "whole number of bytes",
                       "size_mismatch")
        self.assertBad(hdr({"__metadata__": {"k": 1}, "t": good}), "metadata", "bad_metadata")
        # strict: back to back from 0 to the end of the file
        gap = raw_file(json.dumps({"t": {**good, "data_offsets": [4, 12]}}).encode(), bytes(12))
        self.assertBad(gap, "gap", "bad_offsets")
        short = raw_file(json.dumps({"t": good}).encode(), bytes(12))
        self.assertBad(short, "tensors end at 8", "trailing_data")
        overlap = {"t": good, "u": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}
        self.assertBad(hdr(overlap), "overlap", "bad_offsets")
        self.assertBad(hdr(overlap), "overlap", "bad_offsets", strict=False)

    def test_reference_accepts(self):
        # What the reference parser (and the daemon) accepts, strict mode accepts too: leading
        # whitespace, unknown fields in a tensor entry, "__metadata__": null. These three were
        # refused before the conformance corpus.
        good = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        for header, md in ((b" \t\r\n" + json.dumps({"t": good}).encode(), None),
                           (json.dumps({"t": {**good, "extra": [1, {}]}}).encode(), None),
                           (json.dumps({"__metadata__": None, "t": good}).encode(), None),
                           (b'{"__metadata__": {"k": "1", "k": "2"}, "t": ' +
                            json.dumps(good).encode() + b"}", {"k": "2"})):
            data = raw_file(header, bytes(8))
            h = m.parse_header(data, len(data))
            self.assertEqual(list(h.tensors), ["t"], header)
            self.assertEqual(h.metadata, md, header)

    def test_non_strict_allows_gaps(self):
        good = {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}
        data = raw_file(json.dumps({"t": good}).encode(), bytes(16))
        with self.assertRaises(m.HeaderError):
            m.parse_header(data, len(data))
        h = m.parse_header(data, len(data), strict=False)
        self.assertEqual(h.tensors["t"].data_offsets, (4, 12))

    def test_sub_byte_dtypes_parse(self):
        t = {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}
        u = {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [2, 5]}
        data = raw_file(json.dumps({"t": t, "u": u}).encode(), bytes(5))
        h = m.parse_header(data, len(data))
        self.assertEqual(h.tensors["u"].nbytes, 3)


A = m.DEFAULT_ALIGN  # the slab layout rule's alignment


class TestSlabLayout(unittest.TestCase):
    def layout(self, data: bytes, align: int = m.DEFAULT_ALIGN):
        lay = m.slab_layout(m.parse_header(data, len(data)), align)
        return {n: (e.offset, e.nbytes) for n, e in lay.items()}, lay

    def test_simple(self):
        got, lay = self.layout(stfiles.simple())
        self.assertEqual(got, {"a": (0, 16), "b": (A, 24)})
        self.assertEqual(list(lay), ["a", "b"])  # slab order
        self.assertEqual(lay["a"].dtype, "F32")
        self.assertEqual(lay["a"].shape, (2, 2))
        self.assertEqual(m.slab_end(lay), A + 24)
        self.assertEqual(m.slab_size(lay), 2 * A)

    def test_unaligned_file(self):
        # BF16[3] ends at byte 6; the F32 goes to the next align boundary.
        got, lay = self.layout(stfiles.unaligned())
        self.assertEqual(got, {"x": (0, 6), "y": (A, 8)})
        self.assertEqual(m.slab_end(lay), A + 8)
        got, lay = self.layout(stfiles.unaligned(), align=16)
        self.assertEqual(got, {"x": (0, 6), "y": (16, 8)})
        self.assertEqual(m.slab_end(lay), 24)

    def test_ties_zero_size_scalar(self):
        # data offsets: w1 [0,10] e [10,10] w2 [10,18] s [18,26]; at the tie at 10 the zero-size
        # tensor (smaller end) comes first.
        got, lay = self.layout(stfiles.mixed())
        self.assertEqual(list(lay), ["w1", "e", "w2", "s"])
        self.assertEqual(got, {"w1": (0, 10), "e": (A, 0), "w2": (A, 8), "s": (2 * A, 8)})
        self.assertEqual(m.slab_end(lay), 2 * A + 8)
        got, _ = self.layout(stfiles.mixed(), align=16)
        self.assertEqual(got, {"w1": (0, 10), "e": (16, 0), "w2": (16, 8), "s": (32, 8)})

    def test_order_is_by_offset_not_name(self):
        data = build({"z": ("U8", [300], bytes(300)), "a": ("U8", [1], b"\x01"),
                      "m": ("F32", [1], stfiles.f32(1))})
        got, lay = self.layout(data)
        self.assertEqual(list(lay), ["z", "a", "m"])
        self.assertEqual(got, {"z": (0, 300), "a": (2 * A, 1), "m": (3 * A, 4)})  # 300 > A

    def test_bad_align(self):
        h = m.parse_header(stfiles.simple(), len(stfiles.simple()))
        for a in (0, -256, 1.5, True):
            with self.assertRaises(ValueError):
                m.slab_layout(h, a)


class TestDtypes(unittest.TestCase):
    def test_table(self):
        want = {
            "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
            "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64",
            "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
            "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
            "F8_E8M0": "float8_e8m0fnu", "F8_E4M3FNUZ": "float8_e4m3fnuz",
            "F8_E5M2FNUZ": "float8_e5m2fnuz",
        }
        for st, name in want.items():
            self.assertEqual(m.torch_dtype_name(st), name, st)
        self.assertEqual(set(m.DTYPE_BITS), set(m.TORCH_DTYPE_NAMES))

    def test_unsupported(self):
        for st in ("F4", "F6_E2M3", "F6_E3M2"):
            with self.assertRaises(m.UnsupportedDtypeError) as cm:
                m.torch_dtype_name(st)
            self.assertIn(st, str(cm.exception))
            self.assertIn("no torch dtype", str(cm.exception))
        with self.assertRaises(m.UnsupportedDtypeError):
            m.torch_dtype_name("Q4_K")


class TestManifestParse(unittest.TestCase):
    def test_valid(self):
        man = m.parse_cuda_manifest(json.dumps(_manifest_json()).encode(), "/mnt/w/x.safetensors")
        self.assertEqual((man.schema, man.file_size, man.data_offset, man.align),
                         (1, 294, 270, m.DEFAULT_ALIGN))
        self.assertEqual(len(man.replicas), 1)
        r = man.replicas[0]
        self.assertEqual(r.handle, HANDLE)
        self.assertEqual(r.slab_bytes, 1 << 20)
        self.assertEqual(r.gpu, "GPU-0A1B2C3D-1111-2222-3333-444455556666")
        self.assertEqual(r.uuid, "0a1b2c3d-1111-2222-3333-444455556666")
        self.assertEqual(man.path, "/mnt/w/x.safetensors")

    def test_str_input_and_extra_keys(self):
        man = m.parse_cuda_manifest(json.dumps(_manifest_json(future={"x": 1})))
        self.assertEqual(man.extra, {"future": {"x": 1}})
        self.assertIsNone(man.path)

    def test_no_replicas(self):
        man = m.parse_cuda_manifest(json.dumps(_manifest_json(replicas=[])))
        self.assertEqual(man.replicas, ())

    def assertBad(self, value, needle):
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        with self.assertRaises(ValueError) as cm:
            m.parse_cuda_manifest(raw, "/mnt/w/model.safetensors")
        self.assertIsInstance(cm.exception, m.ManifestError)
        self.assertIn("/mnt/w/model.safetensors", str(cm.exception))
        self.assertIn(needle, str(cm.exception))

    def test_malformed(self):
        rep = _manifest_json()["replicas"][0]
        self.assertBad(b"{", "not valid JSON")
        self.assertBad(b"\xff\xfe", "not valid JSON")
        self.assertBad([1], "not a JSON object")
        self.assertBad(_manifest_json(schema=2), "schema 2")
        self.assertBad(_manifest_json(schema="1"), "schema")
        self.assertBad(_manifest_json(schema=True), "schema")
        d = _manifest_json()
        del d["schema"]
        self.assertBad(d, "schema None")
        self.assertBad(_manifest_json(file_size=-1), "file_size")
        self.assertBad(_manifest_json(data_offset=4), "data_offset")
        self.assertBad(_manifest_json(align=100), "align")
        self.assertBad(_manifest_json(replicas={}), "replicas")
        self.assertBad(_manifest_json(replicas=[1]), "replicas[0]")
        self.assertBad(_manifest_json(replicas=[{**rep, "handle": "not base64!"}]), "base64")
        self.assertBad(_manifest_json(replicas=[{**rep, "handle": 5}]), "base64")
        short = base64.b64encode(bytes(63)).decode()
        self.assertBad(_manifest_json(replicas=[{**rep, "handle": short}]), "63 bytes")
        self.assertBad(_manifest_json(replicas=[{**rep, "slab_bytes": -5}]), "slab_bytes")
        self.assertBad(_manifest_json(replicas=[{**rep, "slab_bytes": 1.5}]), "slab_bytes")
        self.assertBad(_manifest_json(replicas=[{**rep, "gpu": None}]), "gpu")

    def test_layout_checks_file(self):
        data = stfiles.simple()
        h = m.parse_header(data, len(data))
        ok = _manifest_json(file_size=len(data), data_offset=h.data_offset)
        man = m.parse_cuda_manifest(json.dumps(ok), "f")
        self.assertEqual(man.layout(h)["b"].offset, m.DEFAULT_ALIGN)
        for bad, needle in (({"file_size": len(data) + 1}, "file_size"),
                            ({"data_offset": h.data_offset + 8}, "data_offset")):
            man = m.parse_cuda_manifest(json.dumps({**ok, **bad}), "f")
            with self.assertRaisesRegex(m.ManifestError, needle):
                man.layout(h)
        rep = {**ok["replicas"][0], "slab_bytes": 279}  # layout ends at A + 24 = 280
        man = m.parse_cuda_manifest(json.dumps({**ok, "replicas": [rep]}), "f")
        with self.assertRaisesRegex(m.ManifestError, "needs 280"):
            man.layout(h)
        rep = {**ok["replicas"][0], "slab_bytes": 280}
        man = m.parse_cuda_manifest(json.dumps({**ok, "replicas": [rep]}), "f")
        self.assertEqual(len(man.layout(h)), 2)


class TestManifestXattr(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.path = _write(self.tmp.name, "model.safetensors", stfiles.simple())

    def _set(self, value: bytes):
        if not hasattr(os, "setxattr"):
            self.skipTest("os.setxattr is not available on this platform")
        try:
            os.setxattr(self.path, m.XATTR_CUDA, value)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                self.skipTest(f"{self.tmp.name}: filesystem refuses user xattrs ({e.strerror})")
            raise

    def test_absent(self):
        # No attribute: ENODATA (or ENOTSUP where the filesystem has no user xattrs) -> None.
        self.assertIsNone(m.read_cuda_manifest(self.path))
        with open(self.path, "rb") as f:
            self.assertIsNone(m.read_cuda_manifest(f.fileno()))

    def test_missing_file(self):
        with self.assertRaises(FileNotFoundError):
            m.read_cuda_manifest(os.path.join(self.tmp.name, "nope"))

    def test_valid(self):
        self._set(json.dumps(_manifest_json()).encode())
        man = m.read_cuda_manifest(self.path)
        self.assertIsNotNone(man)
        self.assertEqual(man.replicas[0].handle, HANDLE)
        self.assertEqual(man.path, self.path)
        with open(self.path, "rb") as f:
            self.assertEqual(m.read_cuda_manifest(f.fileno()).replicas, man.replicas)

    def test_malformed(self):
        for value, needle in ((b"{oops", "not valid JSON"),
                              (json.dumps(_manifest_json(schema=7)).encode(), "schema 7")):
            self._set(value)
            with self.assertRaises(ValueError) as cm:
                m.read_cuda_manifest(self.path)
            self.assertIn(self.path, str(cm.exception))
            self.assertIn(needle, str(cm.exception))


class TestPackageImport(unittest.TestCase):
    def test_import_without_torch(self):
        import weightfs

        self.assertTrue(callable(weightfs.load_file))
        self.assertEqual(weightfs.XATTR_CUDA, "user.weightfs.cuda")
        for name in weightfs.__all__:
            self.assertTrue(hasattr(weightfs, name), name)


if __name__ == "__main__":
    unittest.main()
