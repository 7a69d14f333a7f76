"""Header reads with O_DIRECT, weightfs.release (the ioctl of PROTOCOL §3.1), the bookkeeping
that decides which versions update_model releases, and push's commit line; no torch needed."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import tempfile
import unittest
from unittest import mock

from stfiles import build, f32

import weightfs
from weightfs import handles, manifest as m, torch_loader as tl
from weightfs.push import Push

FILE = build({"a": ("F32", [2], f32(1.0, 2.0)), "b": ("I8", [3], b"\x01\x02\x03")},
             metadata={"format": "pt"})


def _einval(*_a, **_k):
    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))


class TestReadHeaderDirect(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.path = os.path.join(self.tmp.name, "m.safetensors")
        with open(self.path, "wb") as f:
            f.write(FILE)

    def check(self, h):
        want = m.read_header(self.path)
        self.assertEqual(h.tensors, want.tensors)
        self.assertEqual(h.metadata, {"format": "pt"})
        self.assertEqual(h.header_size, want.header_size)
        self.assertEqual(h.file_size, len(FILE))

    def test_local_disk(self):  # a disk wants aligned O_DIRECT reads: EINVAL, then plain reads
        self.check(m.read_header_direct(self.path))

    @unittest.skipUnless(os.path.isdir("/dev/shm"), "no /dev/shm")
    def test_tmpfs(self):
        with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
            p = os.path.join(d, "m.safetensors")
            with open(p, "wb") as f:
                f.write(FILE)
            h = m.read_header_direct(p)
        self.assertEqual(sorted(h.tensors), ["a", "b"])

    def test_exact_ranges(self):
        calls = []
        real = os.pread

        def pread(fd, n, off):
            calls.append((n, off))
            return real(fd, n, off)

        with mock.patch.object(m.os, "pread", pread):
            h = m.read_header_direct(self.path)
        self.assertEqual(calls[0], (8, 0))
        self.assertEqual(calls[-1], (h.header_size, 8))
        self.assertTrue(all(off + n <= 8 + h.header_size for n, off in calls), calls)

    def test_open_einval_falls_back(self):
        real, seen = os.open, []

        def fake_open(path, flags, *a):
            seen.append(flags)
            if flags & os.O_DIRECT and len(seen) == 1:
                _einval()
            return real(path, flags, *a)

        with mock.patch.object(m.os, "open", fake_open):
            self.check(m.read_header_direct(self.path))
        self.assertEqual(len(seen), 2)
        self.assertTrue(seen[0] & os.O_DIRECT)
        self.assertFalse(seen[1] & os.O_DIRECT)
        self.assertEqual(seen[1] & os.O_ACCMODE, os.O_RDONLY)

    def test_open_other_errors_raise(self):
        with self.assertRaises(FileNotFoundError):
            m.read_header_direct(os.path.join(self.tmp.name, "nope.safetensors"))

    def test_pread_einval_clears_o_direct(self):
        fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_DIRECT)
        except OSError:
            self.skipTest("this file system refuses O_DIRECT")
        if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            self.skipTest("O_DIRECT did not stick")
        real, n = os.pread, [0]

        def pread(fd_, k, off):
            n[0] += 1
            if n[0] == 1:
                _einval()
            return real(fd_, k, off)

        with mock.patch.object(m.os, "pread", pread):
            self.check(m.read_header_direct(fd, path=self.path))
        self.assertFalse(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)

    def test_pread_einval_without_o_direct_raises(self):
        fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        with mock.patch.object(m.os, "pread", _einval):
            with self.assertRaises(OSError) as cm:
                m.read_header_direct(fd)
        self.assertEqual(cm.exception.errno, errno.EINVAL)

    def test_errors_name_the_path(self):
        bad = os.path.join(self.tmp.name, "bad.safetensors")
        with open(bad, "wb") as f:
            f.write(FILE[:20])
        with self.assertRaisesRegex(m.HeaderError, "bad.safetensors"):
            m.read_header_direct(bad)


class _FakeMount:
    """MOUNT/.weightfs/versions, MOUNT/m@3/{config.json, 2 weights files}, MOUNT/m -> m@3."""

    def __init__(self, root: str):
        self.root = root
        os.makedirs(os.path.join(root, ".weightfs", "versions"))
        self.v3 = os.path.join(root, "m@3")
        os.mkdir(self.v3)
        for n in ("config.json", "model-00002-of-00002.safetensors",
                  "model-00001-of-00002.safetensors"):
            with open(os.path.join(self.v3, n), "wb") as f:
                f.write(FILE if n.endswith(".safetensors") else b"{}")
        os.symlink("m@3", os.path.join(root, "m"))


class TestRelease(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.mnt = _FakeMount(self.tmp.name)
        self.calls = []

    def fake_ioctl(self, fd, req, *args):
        self.calls.append((os.readlink(f"/proc/self/fd/{fd}"), req, args,
                           fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE))
        return 0

    def test_ioctl_on_a_weights_file_of_the_version(self):
        with mock.patch.object(fcntl, "ioctl", self.fake_ioctl):
            self.assertIsNone(weightfs.release(os.path.join(self.tmp.name, "m")))
            weightfs.release(self.mnt.v3)
            f = os.path.join(self.mnt.v3, "config.json")
            weightfs.release(f)
        first = os.path.realpath(os.path.join(self.mnt.v3, "model-00001-of-00002.safetensors"))
        self.assertEqual(self.calls, [(first, 0x5703, (), os.O_RDONLY),
                                      (first, 0x5703, (), os.O_RDONLY),
                                      (os.path.realpath(f), 0x5703, (), os.O_RDONLY)])
        self.assertEqual(handles.IOCTL_RELEASE, 0x5703)

    def test_not_weightfs(self):  # a real ioctl on a regular file: ENOTTY
        f = os.path.join(self.mnt.v3, "model-00001-of-00002.safetensors")
        with self.assertRaises(weightfs.ReleaseError) as cm:
            weightfs.release(f)
        self.assertIsInstance(cm.exception, weightfs.WeightfsError)
        self.assertIn(f, str(cm.exception))
        self.assertEqual(cm.exception.path, f)
        self.assertIn(cm.exception.errno, (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP))

    def test_other_ioctl_error(self):
        def eio(fd, req, *a):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        with mock.patch.object(fcntl, "ioctl", eio):
            with self.assertRaisesRegex(weightfs.ReleaseError, "failed"):
                weightfs.release(self.mnt.v3)

    def test_gone_and_not_a_mount(self):
        with self.assertRaises(FileNotFoundError):  # ModelGoneError or a plain one
            weightfs.release(os.path.join(self.tmp.name, "m@9"))
        with self.assertRaises(FileNotFoundError):
            weightfs.release(os.path.join(self.mnt.v3, "gone.safetensors"))
        other = tempfile.TemporaryDirectory()
        self.addCleanup(other.cleanup)
        os.mkdir(os.path.join(other.name, "x@1"))
        with self.assertRaises(weightfs.NotOnMountError):
            weightfs.release(os.path.join(other.name, "x@1"))

    def test_empty_version_folder(self):
        os.mkdir(os.path.join(self.tmp.name, "m@4"))
        with self.assertRaisesRegex(weightfs.ReleaseError, "no file"):
            weightfs.release(os.path.join(self.tmp.name, "m@4"))


class TestBookkeeping(unittest.TestCase):
    SLABS = [("/m/p@1", 0, 1000, 100), ("/m/p@1", 1, 1000, 100), ("/m/p@2", 0, 5000, 100),
             (None, 0, 9000, 100)]

    def test_slab_versions(self):
        sv = handles.slab_versions
        self.assertEqual(sv(self.SLABS, [(0, 1000), (0, 1099)]), {"/m/p@1"})
        self.assertEqual(sv(self.SLABS, [(0, 1100), (0, 999), (2, 1000)]), set())
        self.assertEqual(sv(self.SLABS, [(1, 1050), (0, 5000)]), {"/m/p@1", "/m/p@2"})
        self.assertEqual(sv(self.SLABS, [(0, 9050)]), set())  # a slab of no known version
        self.assertEqual(sv([], [(0, 1)]), set())

    def test_releasable(self):
        r = handles.releasable
        self.assertEqual(r({"a", "b", "c"}, ["b", None]), ["a", "c"])
        self.assertEqual(r({"a", "b"}, [], keep={"a"}), ["b"])
        self.assertEqual(r(set(), ["a"]), [])


class _Ref:
    """Stands in for torch_loader._SlabRef."""

    def __init__(self, version, dev=0, ptr=0, size=64, alive=True):
        self.version, self.dev, self.ptr, self.slab_bytes, self.live = version, dev, ptr, size, alive

    def alive(self):
        return self.live


class TestReleaseClosed(unittest.TestCase):
    def setUp(self):
        saved = dict(tl._slabs)
        tl._slabs.clear()
        self.addCleanup(lambda: (tl._slabs.clear(), tl._slabs.update(saved)))
        self.released = []
        p = mock.patch.object(tl, "release", self.released.append)
        p.start()
        self.addCleanup(p.stop)
        g = mock.patch.object(tl.gc, "collect")
        self.collect = g.start()
        self.addCleanup(g.stop)

    def test_only_closed_versions(self):
        tl._slabs[("u", b"1")] = _Ref("/m/p@1", alive=False)
        tl._slabs[("u", b"2")] = _Ref("/m/p@2", alive=True)
        tl._slabs[("u", b"3")] = _Ref("/m/p@2", alive=False)
        done = tl._release_closed({"/m/p@1", "/m/p@2", "/m/p@3"}, keep={"/m/p@3"})
        self.assertEqual(done, ["/m/p@1"])
        self.assertEqual(self.released, ["/m/p@1"])
        self.assertEqual(sorted(tl._slabs), [("u", b"2")])  # closed entries dropped
        self.collect.assert_called_once()  # p@2 still open: the cycle collector ran once

    def test_collect_frees_a_cycle(self):
        ref = _Ref("/m/p@1", alive=True)
        tl._slabs[("u", b"1")] = ref
        self.collect.side_effect = lambda: setattr(ref, "live", False)
        self.assertEqual(tl._release_closed({"/m/p@1"}), ["/m/p@1"])

    def test_no_collect_when_all_closed(self):
        self.assertEqual(tl._release_closed({"/m/p@1"}), ["/m/p@1"])
        self.collect.assert_not_called()
        self.assertEqual(tl._release_closed(set()), [])

    def test_best_effort(self):
        def fail(ver):
            if ver.endswith("1"):
                raise weightfs.ModelGoneError("gone")
            raise weightfs.ReleaseError("refused", ver, errno.ENOTTY)

        with mock.patch.object(tl, "release", fail):
            with self.assertLogs("weightfs", logging.DEBUG) as logs:
                self.assertEqual(tl._release_closed({"/m/p@1", "/m/p@2"}), [])
        levels = {r.getMessage().split(":")[0]: r.levelno for r in logs.records}
        self.assertEqual(levels, {"release /m/p@1": logging.DEBUG,
                                  "release /m/p@2": logging.WARNING})


class TestPushCommitLine(unittest.TestCase):
    def push(self, keys):
        p = Push.__new__(Push)
        p._slabs = {("f", "GPU-x"): object()} if keys else {}
        p._slab_keys = set(keys)
        return p

    def setUp(self):
        saved = dict(tl._slabs)
        tl._slabs.clear()
        self.addCleanup(lambda: (tl._slabs.clear(), tl._slabs.update(saved)))

    def test_no_slab_opened(self):
        self.assertEqual(self.push([])._commit_line(), {"op": "commit", "released": True})

    def test_slabs_closed(self):
        tl._slabs[("u", b"h")] = _Ref(None, alive=False)
        p = self.push([("u", b"h")])
        self.assertEqual(p._commit_line(), {"op": "commit", "released": True})
        self.assertEqual(p._slabs, {})

    def test_slab_still_open(self):
        tl._slabs[("u", b"h")] = _Ref(None, alive=True)
        self.assertEqual(self.push([("u", b"h")])._commit_line(), {"op": "commit"})


if __name__ == "__main__":
    unittest.main()
