"""update_model's torch-free parts: resolving a path to one version folder (resolve_version) and
checking names, dtypes and shapes before anything is touched (plan_update). A fake mount (a
folder with .weightfs/versions, NAME -> NAME@N symlinks) stands in for the daemon."""

from __future__ import annotations

import os
import tempfile
import unittest

import stfiles  # noqa: F401 (puts the package on sys.path)

import weightfs
from weightfs.update import ModelMismatchError, plan_update


class TestResolveVersion(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.mnt = self.tmp.name
        os.makedirs(os.path.join(self.mnt, ".weightfs", "versions"))
        for v in ("policy@6", "policy@7"):
            os.mkdir(os.path.join(self.mnt, v))
        os.symlink("policy@7", os.path.join(self.mnt, "policy"))

    def test_symlink_and_version_folder(self):
        want = weightfs.ModelVersion("policy", 7, os.path.join(self.mnt, "policy@7"))
        self.assertEqual(weightfs.resolve_version(os.path.join(self.mnt, "policy")), want)
        self.assertEqual(weightfs.resolve_version(os.path.join(self.mnt, "policy") + "/"), want)
        self.assertEqual(weightfs.resolve_version(os.path.join(self.mnt, "policy@6")),
                         weightfs.ModelVersion("policy", 6, os.path.join(self.mnt, "policy@6")))

    def test_resolved_once(self):
        v = weightfs.resolve_version(os.path.join(self.mnt, "policy"))
        # a commit lands: the symlink moves; the answer names the version folder, not the link
        os.mkdir(os.path.join(self.mnt, "policy@8"))
        os.replace(self._link("policy@8"), os.path.join(self.mnt, "policy"))
        self.assertEqual(v.number, 7)
        self.assertTrue(v.folder.endswith("policy@7"))
        self.assertEqual(weightfs.resolve_version(os.path.join(self.mnt, "policy")).number, 8)

    def _link(self, target):
        tmp = os.path.join(self.mnt, ".tmp-link")
        os.symlink(target, tmp)
        return tmp

    def test_gone(self):
        with self.assertRaises(weightfs.ModelGoneError):
            weightfs.resolve_version(os.path.join(self.mnt, "nope"))
        with self.assertRaises(weightfs.ModelGoneError):
            weightfs.resolve_version(os.path.join(self.mnt, "policy@9"))
        os.symlink("other@3", os.path.join(self.mnt, "other"))  # version unloaded meanwhile
        with self.assertRaises(weightfs.ModelGoneError):
            weightfs.resolve_version(os.path.join(self.mnt, "other"))
        self.assertTrue(issubclass(weightfs.ModelGoneError, FileNotFoundError))

    def test_not_a_model(self):
        os.mkdir(os.path.join(self.mnt, "plain"))
        os.symlink("policy@7", os.path.join(self.mnt, "alias"))  # another name's version
        os.symlink("/etc", os.path.join(self.mnt, "abs"))
        os.symlink("sub/policy@7", os.path.join(self.mnt, "deep"))
        for p in ("plain", "alias", "abs", "deep", ".weightfs", "/"):
            with self.assertRaises(weightfs.NotOnMountError, msg=p):
                weightfs.resolve_version(os.path.join(self.mnt, p))
        with tempfile.TemporaryDirectory() as d:  # no .weightfs/versions: not a mount
            os.mkdir(os.path.join(d, "policy@1"))
            os.symlink("policy@1", os.path.join(d, "policy"))
            for p in ("policy", "policy@1"):
                with self.assertRaisesRegex(weightfs.NotOnMountError, "not a weightfs mount"):
                    weightfs.resolve_version(os.path.join(d, p))


T = "torch.bfloat16"


class TestPlanUpdate(unittest.TestCase):
    # model: embed and lm_head tied (one tensor), a layer, a persistent buffer
    TARGETS = {
        "embed.weight": (T, (8, 4), "e"),
        "layer.weight": (T, (4, 4), "l"),
        "layer.bias": (T, (4,), "b"),
        "lm_head.weight": (T, (8, 4), "e"),
        "buf": ("torch.float32", (2,), "u"),
    }

    def sources(self, **change):
        s = {n: (dt, shape) for n, (dt, shape, _) in self.TARGETS.items() if n != "lm_head.weight"}
        for k, v in change.items():
            k = k.replace("__", ".")
            if v is None:
                del s[k]
            else:
                s[k] = v
        return s

    def test_match_and_ties(self):
        src = self.sources()
        self.assertEqual(plan_update(self.TARGETS, src), list(src))
        both = dict(src, **{"lm_head.weight": (T, (8, 4))})  # checkpoints that keep both names
        self.assertEqual(plan_update(self.TARGETS, both), list(both))
        only_head = self.sources(embed__weight=None)
        only_head["lm_head.weight"] = (T, (8, 4))
        self.assertEqual(plan_update(self.TARGETS, only_head), list(only_head))

    def test_mismatches_named(self):
        src = self.sources(layer__weight=("torch.float32", (4, 4)), layer__bias=(T, (5,)),
                           buf=None, extra=(T, (1,)))
        with self.assertRaises(ModelMismatchError) as cm:
            plan_update(self.TARGETS, src, where="/mnt/w/p@2")
        e = cm.exception
        self.assertIsInstance(e, RuntimeError)
        msg = str(e)
        for want in ("/mnt/w/p@2", "nothing was changed", "layer.weight (model torch.bfloat16 [4, 4], "
                     "checkpoint torch.float32 [4, 4])", "layer.bias", "missing keys: buf",
                     "unexpected keys: extra"):
            self.assertIn(want, msg)
        self.assertEqual(e.missing, ["buf"])
        self.assertEqual(e.unexpected, ["extra"])
        self.assertEqual([m[0] for m in e.mismatched], ["layer.weight", "layer.bias"])

    def test_tie_group_missing(self):
        with self.assertRaisesRegex(ModelMismatchError,
                                    "missing keys: embed.weight, lm_head.weight$"):
            plan_update(self.TARGETS, self.sources(embed__weight=None))

    def test_not_strict(self):
        src = self.sources(buf=None, extra=(T, (1,)))
        self.assertEqual(plan_update(self.TARGETS, src, strict=False),
                         [n for n in src if n != "extra"])
        with self.assertRaisesRegex(ModelMismatchError, "dtype or shape differs: layer.bias"):
            plan_update(self.TARGETS, self.sources(layer__bias=(T, (3,))), strict=False)


if __name__ == "__main__":
    unittest.main()
