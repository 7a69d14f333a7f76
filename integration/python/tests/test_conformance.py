"""The conformance corpus (store/safetensors/testdata/conformance, made by the Go generator:
``go test ./store/safetensors -run TestConformance -update``) through the stdlib parser and
the slab layout rule: the same verdict, class, tensors and slab offsets as the daemon's Go
parser, each verdict being the reference parser's."""

from __future__ import annotations

import json
import os
import unittest

import stfiles  # noqa: F401  (puts the package on sys.path)

from weightfs import manifest as m

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
CORPUS = os.path.join(REPO, "store", "safetensors", "testdata", "conformance")


def load_corpus() -> dict:
    with open(os.path.join(CORPUS, "cases.json"), encoding="utf-8") as f:
        return json.load(f)


class TestConformance(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.corpus = load_corpus()

    def test_classes(self):
        self.assertEqual(set(self.corpus["classes"]), set(m.HEADER_ERROR_CLASSES))
        used = {c.get("class") for c in self.corpus["cases"] if c["verdict"] == "refuse"}
        self.assertEqual(used, set(m.HEADER_ERROR_CLASSES))
        self.assertEqual(self.corpus["align"], m.DEFAULT_ALIGN)

    def test_cases(self):
        cases = self.corpus["cases"]
        self.assertGreater(len(cases), 90)
        for case in cases:
            with self.subTest(case["file"]):
                self.check(case)

    def check(self, case: dict):
        path = os.path.join(CORPUS, case["file"])
        with open(path, "rb") as f:
            data = f.read()
        if case["verdict"] == "refuse":
            for parse in (lambda: m.parse_header(data, len(data)), lambda: m.read_header(path)):
                with self.assertRaises(m.HeaderError) as cm:
                    parse()
                self.assertEqual(cm.exception.cls, case["class"], str(cm.exception))
            return
        self.assertEqual(case["verdict"], "accept")
        h = m.parse_header(data, len(data))
        h2 = m.read_header(path)
        self.assertEqual(h.tensors, h2.tensors)
        self.assertEqual(h.data_offset, case["data_offset"])
        self.assertEqual(h.metadata, case["metadata"])
        want = case["tensors"]  # in slab order
        self.assertEqual(sorted(h.tensors), sorted(t["name"] for t in want))
        for t in want:
            got = h.tensors[t["name"]]
            self.assertEqual((got.dtype, list(got.shape), list(got.data_offsets)),
                             (t["dtype"], t["shape"], t["data_offsets"]), t["name"])
        lay = m.slab_layout(h)
        self.assertEqual([(n, e.offset) for n, e in lay.items()],
                         [(t["name"], t["slab_offset"]) for t in want])
        self.assertEqual(m.slab_size(lay), case["slab_size"])


if __name__ == "__main__":
    unittest.main()
