"""weightfs.versions: path parsing (pure Python) and, as root with /dev/fuse and Go, waiting on a
real mount across a ``weightfs load`` (the test builds and starts the daemon)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import unittest

import stfiles
from stfiles import build, f32

import mountd
import weightfs
from weightfs import versions as wv

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class TestSplitModelPath(unittest.TestCase):
    def test_names(self):
        self.assertEqual(wv.split_model_path("/mnt/weightfs/policy"), ("/mnt/weightfs", "policy"))
        self.assertEqual(wv.split_model_path("/mnt/weightfs/policy/"), ("/mnt/weightfs", "policy"))
        self.assertEqual(wv.split_model_path("/mnt/weightfs/policy@7"), ("/mnt/weightfs", "policy"))
        self.assertEqual(wv.split_model_path("/mnt/w/a@b@12"), ("/mnt/w", "a@b"))
        self.assertEqual(wv.split_model_path("/mnt/w/x@0"), ("/mnt/w", "x@0"))  # not a version
        rel = wv.split_model_path("policy")
        self.assertEqual(rel, (os.getcwd(), "policy"))

    def test_refused(self):
        for p in ["/", "/mnt/weightfs/.weightfs", "/mnt/weightfs/.hidden"]:
            with self.assertRaises(wv.NotOnMountError, msg=p):
                wv.split_model_path(p)
        self.assertTrue(issubclass(weightfs.NotOnMountError, ValueError))
        self.assertTrue(issubclass(weightfs.ModelGoneError, FileNotFoundError))

    def test_not_a_mount(self):
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(wv.NotOnMountError):
                wv.wait_version(os.path.join(d, "policy"))


def _write_model(dir_: str, seed: float) -> str:
    os.makedirs(dir_, exist_ok=True)
    with open(os.path.join(dir_, "model.safetensors"), "wb") as f:
        f.write(build({"w": ("F32", (2,), f32(seed, seed + 1))}))
    with open(os.path.join(dir_, "config.json"), "w") as f:
        json.dump({"model_type": "tiny"}, f)
    return dir_


def _skip_reason():
    if os.geteuid() != 0:
        return "skipping: mounting needs root (run the tests as root, as CI does)"
    if not os.path.exists("/dev/fuse"):
        return "skipping: mounting needs /dev/fuse"
    if shutil.which("go") is None:
        return "skipping: building the daemon needs the go tool on PATH"
    return None


@unittest.skipIf(_skip_reason() is not None, _skip_reason() or "")
class TestOnMount(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp, cls.mnt, cls.sock = mountd.workdir("weightfs-py-")
        cls.bin = os.path.join(cls.tmp, "weightfs")
        subprocess.run(["go", "build", "-o", cls.bin, "./cmd/weightfs"], cwd=REPO, check=True)
        cls.models = os.path.join(cls.tmp, "models")
        _write_model(os.path.join(cls.models, "v1"), 1.0)
        try:
            cls.daemon = mountd.start(
                cls.bin, cls.sock, cls.mnt, os.path.join(cls.tmp, "daemon.log"),
                ["--model", "policy=" + os.path.join(cls.models, "v1")],
                ready=lambda: os.path.exists(os.path.join(cls.mnt, "policy")))
        except BaseException:
            shutil.rmtree(cls.tmp, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        mountd.stop(cls.daemon)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def cli(self, *args):
        subprocess.run([self.bin, "--socket", self.sock, *args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def test_wait_across_a_load(self):
        path = os.path.join(self.mnt, "policy")
        n = weightfs.wait_version(path)
        self.assertGreaterEqual(n, 1)
        self.assertEqual(weightfs.wait_version(path, newer_than=n - 1), n)
        got = {}

        def waiter():
            try:
                got["v"] = weightfs.wait_version(path, newer_than=n, timeout=60)
                got["at"] = time.monotonic()
            except BaseException as e:  # noqa: BLE001 (reported below)
                got["err"] = e

        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.2)
        self.assertTrue(t.is_alive(), "wait_version returned before a new version: %r" % got)
        d = _write_model(os.path.join(self.models, "v%d" % (n + 1)), float(n + 1))
        self.cli("load", "policy", d)
        t.join(30)
        self.assertFalse(t.is_alive())
        self.assertEqual(got.get("v"), n + 1, got)
        self.assertEqual(os.readlink(path), "policy@%d" % (n + 1))

    def test_timeout_leaves_nothing(self):
        path = os.path.join(self.mnt, "policy")
        n = weightfs.wait_version(path)
        threads = threading.active_count()
        start = time.monotonic()
        with self.assertRaises(TimeoutError):
            weightfs.wait_version(path, newer_than=n, timeout=0.2)
        took = time.monotonic() - start
        self.assertLess(took, 10)
        self.assertEqual(threading.active_count(), threads)
        self.assertEqual(weightfs.wait_version(path), n)  # the mount is still fine

    def test_watch_and_gone(self):
        with self.assertRaises(weightfs.ModelGoneError):
            weightfs.wait_version(os.path.join(self.mnt, "nope"))
        with self.assertRaises(weightfs.ModelGoneError):
            next(weightfs.watch(os.path.join(self.mnt, "nope")))
        self.cli("load", "other", _write_model(os.path.join(self.models, "o1"), 5.0))
        seen = []

        def watcher():
            for v in weightfs.watch(os.path.join(self.mnt, "other")):
                seen.append(v)

        t = threading.Thread(target=watcher)
        t.start()
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        self.cli("load", "other", os.path.join(self.models, "o1"))
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        self.cli("unload", "other")  # the model goes: the generator ends
        t.join(10)
        self.assertFalse(t.is_alive())
        self.assertEqual(seen, [1, 2])


if __name__ == "__main__":
    unittest.main()
