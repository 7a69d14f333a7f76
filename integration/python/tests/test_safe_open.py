"""The torch-free part of ``weightfs.safe_open`` against the conformance corpus and the
reference's documented behaviour (``safetensors.safe_open``): ``keys()`` sorted,
``offset_keys()`` in data order, ``metadata()`` the ``__metadata__`` dict or None,
``get_slice(name).get_shape()`` a list and ``get_dtype()`` the dtype string, a
``SafetensorError`` saying "File does not contain tensor NAME" for an unknown name and
"File is closed" after the block; the header's verdicts those of the strict parser. None of it
may import torch (tested in a fresh interpreter)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import unittest
import warnings
from unittest import mock

import stfiles
from test_conformance import CORPUS, load_corpus

import weightfs
from weightfs import manifest as m

HAVE_TORCH = importlib.util.find_spec("torch") is not None
PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SafeOpenCorpusTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.corpus = load_corpus()

    def test_cases(self):
        for case in self.corpus["cases"]:
            with self.subTest(case["file"]):
                path = os.path.join(CORPUS, case["file"])
                if case["verdict"] == "refuse":
                    with self.assertRaises(weightfs.HeaderError) as cm:
                        weightfs.safe_open(path, framework="pt")
                    self.assertEqual(cm.exception.cls, case["class"])
                    self.assertIsInstance(cm.exception, weightfs.SafetensorError)
                    self.assertIn(path, str(cm.exception))
                    continue
                want = case["tensors"]  # in slab order: (begin, end, name)
                with weightfs.safe_open(path, framework="pt") as f:
                    self.assertEqual(f.keys(), sorted(t["name"] for t in want))
                    self.assertEqual(f.offset_keys(), [t["name"] for t in want])
                    self.assertEqual(f.metadata(), case["metadata"])
                    for t in want:
                        s = f.get_slice(t["name"])
                        self.assertEqual(s.get_shape(), t["shape"])
                        self.assertEqual(s.get_dtype(), t["dtype"])


class SafeOpenTests(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.mixed = os.path.join(tmp.name, "m.safetensors")
        with open(self.mixed, "wb") as f:
            f.write(stfiles.mixed())
        self.plain = os.path.join(tmp.name, "u.safetensors")
        with open(self.plain, "wb") as f:
            f.write(stfiles.unaligned())

    def test_keys_offsets_metadata(self):
        with weightfs.safe_open(self.mixed, "pt") as f:
            # JSON order is reversed by stfiles.build; the reference sorts keys
            self.assertEqual(f.keys(), ["e", "s", "w1", "w2"])
            # data order: w1 [0,10], e [10,10], w2 [10,18], s [18,26]
            self.assertEqual(f.offset_keys(), ["w1", "e", "w2", "s"])
            self.assertEqual(f.metadata(), {"format": "pt"})
            self.assertEqual(f.get_slice("s").get_shape(), [])
            self.assertEqual(f.get_slice("e").get_shape(), [0, 3])
            self.assertEqual(f.get_slice("w2").get_dtype(), "F16")
        with weightfs.safe_open(self.plain, framework="torch") as f:
            self.assertIsNone(f.metadata())
        # transformers passes the newer reference's backend= keyword: accepted as the reference does
        with weightfs.safe_open(self.mixed, framework="pt", device="cpu", backend=None) as f:
            self.assertEqual(f.keys(), ["e", "s", "w1", "w2"])

    def test_shim_signatures(self):
        """weightfs.shim has the reference's signatures; its "cpu" (the reference's default)
        means "the replica first" (device None), any other device is passed on."""
        from weightfs import shim

        with shim.safe_open(self.mixed, "pt", backend=None) as f:
            self.assertEqual(f.keys(), ["e", "s", "w1", "w2"])
            self.assertIsNone(f._device)
        for given, want in (("cpu", None), (None, None), ("cuda:1", "cuda:1"), (0, 0)):
            with self.subTest(device=given), shim.safe_open(self.mixed, device=given) as f:
                self.assertEqual(f._device, want)
        with mock.patch("weightfs.load_file") as lf:
            shim.load_file(self.mixed)
            shim.load_file(self.mixed, device="cuda:0")
        self.assertEqual([c.kwargs["device"] for c in lf.call_args_list], [None, "cuda:0"])

    def test_unknown_name(self):
        with weightfs.safe_open(self.mixed, "pt") as f:
            for get in (f.get_tensor, f.get_slice):
                with self.assertRaises(weightfs.SafetensorError) as cm:
                    get("nope")
                self.assertIn("File does not contain tensor nope", str(cm.exception))
                self.assertIn(self.mixed, str(cm.exception))
                self.assertIsInstance(cm.exception, weightfs.WeightfsError)

    def test_closed(self):
        f = weightfs.safe_open(self.mixed, "pt")
        with f:
            pass
        for call in (f.keys, f.offset_keys, f.metadata, lambda: f.get_slice("s")):
            with self.assertRaises(weightfs.SafetensorError) as cm:
                call()
            self.assertIn("File is closed", str(cm.exception))
        f.close()  # idempotent

    def test_framework_refused(self):
        for fw in ("np", "numpy", "tf", "flax", "mlx", "PT"):
            with self.subTest(fw), self.assertRaises(weightfs.SafetensorError) as cm:
                weightfs.safe_open(self.mixed, framework=fw)
            self.assertIn(repr(fw), str(cm.exception))
            self.assertIn("safetensors.safe_open", str(cm.exception))

    def test_missing_file(self):
        with self.assertRaises(FileNotFoundError):
            weightfs.safe_open(self.mixed + ".absent", "pt")

    def test_symlink_resolved_once(self):
        link = self.mixed + ".link"
        os.symlink(self.mixed, link)
        with weightfs.safe_open(link, "pt") as f:
            os.replace(self.plain, self.mixed)  # the name now points at another file
            self.assertEqual(f.keys(), ["e", "s", "w1", "w2"])

    def test_no_torch_imported(self):
        code = (
            "import sys, weightfs\n"
            f"with weightfs.safe_open({self.mixed!r}, framework='pt') as f:\n"
            "    f.keys(); f.offset_keys(); f.metadata()\n"
            "    s = f.get_slice('w2'); s.get_shape(); s.get_dtype()\n"
            "    try:\n"
            "        f.get_tensor('nope')\n"
            "    except weightfs.SafetensorError:\n"
            "        pass\n"
            "print('torch' in sys.modules)\n")
        env = dict(os.environ, PYTHONPATH=PKG_DIR)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "False")

    @unittest.skipIf(HAVE_TORCH, "torch is installed: the missing-torch message is not reachable")
    def test_tensor_needs_torch(self):
        with weightfs.safe_open(self.mixed, "pt") as f:
            with self.assertRaises(ImportError) as cm:
                f.get_tensor("w1")
            self.assertIn("PyTorch", str(cm.exception))
            with self.assertRaises(ImportError):
                f.get_slice("w1")[0:2]

    def test_header_matches_parser(self):
        with weightfs.safe_open(self.mixed, "pt") as f:
            self.assertEqual(f.header.tensors, m.read_header(self.mixed).tensors)


class LoadModelRenameTests(unittest.TestCase):
    def test_load_model_deprecated(self):
        with warnings.catch_warnings(record=True) as w, \
                mock.patch("weightfs.torch_loader.load_model_folder", return_value="m") as lmf:
            warnings.simplefilter("always")
            self.assertEqual(weightfs.load_model("model", "folder", strict=False), "m")
        lmf.assert_called_once_with("model", "folder", None, False, False, prefer="auto")
        self.assertTrue(any(issubclass(x.category, DeprecationWarning)
                            and "load_model_folder" in str(x.message) for x in w), w)


if __name__ == "__main__":
    unittest.main()
