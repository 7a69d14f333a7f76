"""weightfs.push / weightfs.Push (docs/PROTOCOL.md §8) without torch.

``TestWithFakeDaemon`` runs everywhere: an in-process daemon on a Unix socket speaks §8 (the
HTTP upgrade, the staged line with a real memfd passed by SCM_RIGHTS, write/commit/abort lines).
``TestOnRealDaemon`` pushes to the real daemon (bin/weightfs, or $WEIGHTFS_BIN) on a real mount
as root with /dev/fuse, and skips with the reason elsewhere or when the daemon has no push.
"""

from __future__ import annotations

import importlib
import json
import mmap
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unittest
from typing import Any, Callable, Optional
from unittest import mock

from stfiles import build, f32  # also puts the package on sys.path

import mountd
import weightfs
from weightfs.manifest import read_header

wp = importlib.import_module("weightfs.push")  # weightfs.push is the function

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# a fake daemon


class Session:
    """What the fake daemon saw on one connection."""

    def __init__(self) -> None:
        self.raw_request = b""
        self.body: Any = None
        self.ops: list[dict] = []
        self.received: dict[str, bytes] = {}
        self.max_in_flight = 0
        self.end = ""  # "commit", "abort", "eof"
        self.done = threading.Event()
        self.errors: list[str] = []
        self.gpus: list[str] = []


class FakeDaemon:
    """A Unix socket server in a thread; ``script(daemon, conn, session)`` serves each
    connection. ``stage_and_serve`` is the §8 daemon; tests pass others to refuse."""

    def __init__(self, script: Optional[Callable] = None, scratch_bytes: int = 1 << 20,
                 fd_with_head: bool = True, hold_first_answer: bool = False,
                 slab: Any = None):
        self.tmp = tempfile.mkdtemp(prefix="weightfs-fake-")
        self.path = os.path.join(self.tmp, "s.sock")
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(8)
        self.script = script or FakeDaemon.stage_and_serve
        self.scratch_bytes = scratch_bytes
        self.fd_with_head = fd_with_head
        self.hold_first_answer = hold_first_answer
        # a GPU slab (test_push_torch.py): .replicas(nbytes) -> [{"gpu", "handle"}],
        # .read(offset, size) -> bytes
        self.slab = slab
        self.sessions: list[Session] = []
        self.version = 0
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def close(self) -> None:
        self.srv.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            s = Session()
            self.sessions.append(s)
            threading.Thread(target=self._serve, args=(conn, s), daemon=True).start()

    def _serve(self, conn: socket.socket, s: Session) -> None:
        try:
            conn.settimeout(10)
            f = conn.makefile("rb")
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                b = f.read(1)
                if not b:
                    s.end = "eof"
                    return
                head += b
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":")[1])
            raw = f.read(n)
            s.raw_request = head + raw
            s.body = json.loads(raw) if raw else None
            self.script(self, conn, f, s)
        except Exception as e:  # reported by the tests through s.errors
            s.errors.append(repr(e))
        finally:
            conn.close()
            s.done.set()

    @staticmethod
    def answer(conn: socket.socket, status: int, obj: Any, chunked: bool = False) -> None:
        body = json.dumps(obj).encode()
        if chunked:
            half = len(body) // 2
            payload = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, body[:half], len(body) - half,
                                                             body[half:])
            head = b"Transfer-Encoding: chunked\r\n"
        else:
            payload, head = body, b"Content-Length: %d\r\n" % len(body)
        conn.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n%s\r\n" % (status, head)
                     + payload)

    def stage_and_serve(self, conn: socket.socket, f, s: Session) -> None:
        tensors, off = [], 0
        for t in s.body["tensors"]:
            size = wp._nbytes(t["name"], t["dtype"], t["shape"])
            tensors.append({"name": t["name"], "file": "model.safetensors", "dtype": t["dtype"],
                            "shape": t["shape"], "size": size, "slab_offset": off})
            off += -(-size // 256) * 256
        sizes = {t["name"]: t["size"] for t in tensors}
        offsets = {t["name"]: t["slab_offset"] for t in tensors}
        n = self.scratch_bytes
        fd = os.memfd_create("scratch", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, n)
        scratch = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) if n else None
        staged = json.dumps({"staged": {
            "name": s.body["name"], "base": self.version, "same_layout": False,
            "tensor_bytes": sum(sizes.values()), "scratch_bytes": n, "timeout_seconds": 600,
            "files": [{"path": "model.safetensors", "slab_bytes": max(off, 256),
                       "replicas": self.slab.replicas(max(off, 256)) if self.slab else []}],
            "tensors": tensors}}).encode() + b"\n"
        head = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: weightfs-push/1\r\n"
                b"Connection: Upgrade\r\n\r\n")
        if self.fd_with_head:  # the head, the staged line and the fd in one sendmsg
            socket.send_fds(conn, [head + staged], [fd])
        else:  # the head alone, then the fd with the staged line's first byte only
            conn.sendall(head)
            time.sleep(0.05)
            socket.send_fds(conn, [staged[:1]], [fd])
            time.sleep(0.05)
            conn.sendall(staged[1:])
        os.close(fd)
        pending: list[dict] = []
        done = 0

        def handle(op: dict) -> dict:
            nonlocal done
            if op["op"] == "write":
                for t in op["tensors"]:
                    name, at = t["name"], t["at"]
                    if name in s.received:
                        return {"error": {"code": "invalid", "message": f"{name} written twice"}}
                    size = sizes[name]
                    if at < 0 or at + size > n:
                        return {"error": {"code": "invalid", "message": f"{name} out of scratch"}}
                    s.received[name] = bytes(scratch[at:at + size]) if size else b""
                    done += size
                return {"ok": True, "done": done}
            if op["op"] == "written" and self.slab is not None:
                for name in op["tensors"]:
                    s.received[name] = self.slab.read(offsets[name], sizes[name])
                    s.gpus.append(op["gpu"])
                return {"ok": True, "done": done}
            if op["op"] == "commit":
                missing = [k for k in sizes if k not in s.received]
                if missing:
                    return {"error": {"code": "invalid", "message":
                                      f"push {s.body['name']}: commit: {len(missing)} of "
                                      f"{len(sizes)} tensors not written"}}
                self.version += 1
                return {"version": {"name": f"{s.body['name']}@{self.version}",
                                    "number": self.version}}
            if op["op"] == "abort":
                return {"aborted": True}
            return {"error": {"code": "invalid", "message": f"unknown op {op!r}"}}

        while True:
            line = f.readline()
            if not line:
                s.end = s.end or "eof"
                break
            op = json.loads(line)
            s.ops.append(op)
            pending.append(op)
            if self.hold_first_answer and len(s.ops) == 1 and op["op"] == "write":
                continue  # answer it with the next line: the writer must not wait for it
            s.max_in_flight = max(s.max_in_flight, len(pending))
            for p in pending:
                ans = handle(p)
                conn.sendall(json.dumps(ans).encode() + b"\n")
                if p["op"] in ("commit", "abort") and "error" not in ans:
                    s.end = p["op"]
            pending.clear()
            if s.end in ("commit", "abort"):
                break
        if scratch is not None:
            scratch.close()


# --------------------------------------------------------------------------------------------


class TestSocketDiscovery(unittest.TestCase):
    def test_order(self):
        with mock.patch.dict(os.environ, {"WEIGHTFS_SOCKET": "/x/s.sock",
                                          "XDG_RUNTIME_DIR": "/run/user/1000"}):
            self.assertEqual(wp.default_socket(), "/x/s.sock")
        env = {k: v for k, v in os.environ.items() if k not in ("WEIGHTFS_SOCKET",)}
        env["XDG_RUNTIME_DIR"] = "/run/user/1000"
        with mock.patch.dict(os.environ, env, clear=True):
            with mock.patch("os.geteuid", return_value=0):
                self.assertEqual(wp.default_socket(), "/run/weightfs/weightfs.sock")
            with mock.patch("os.geteuid", return_value=1000):
                self.assertEqual(wp.default_socket(), "/run/user/1000/weightfs/weightfs.sock")
            del os.environ["XDG_RUNTIME_DIR"]
            os.environ["TMPDIR"] = "/tmpx"
            with mock.patch("os.geteuid", return_value=1000):
                self.assertEqual(wp.default_socket(), "/tmpx/weightfs-1000/weightfs.sock")

    def test_argument_wins_and_unreachable(self):
        with mock.patch.dict(os.environ, {"WEIGHTFS_SOCKET": "/nonexistent/env.sock"}):
            with self.assertRaises(weightfs.DaemonUnreachableError) as cm:
                weightfs.push("m", {"a": ("F32", [1], f32(1))}, socket="/nonexistent/arg.sock")
            self.assertIn("/nonexistent/arg.sock", str(cm.exception))
            with self.assertRaises(weightfs.DaemonUnreachableError) as cm:
                weightfs.push("m", {"a": ("F32", [1], f32(1))})
            self.assertIn("/nonexistent/env.sock", str(cm.exception))
            self.assertIsInstance(cm.exception, ConnectionError)
            self.assertIsInstance(cm.exception, weightfs.WeightfsError)


class TestWithFakeDaemon(unittest.TestCase):
    def daemon(self, **kw) -> FakeDaemon:
        d = FakeDaemon(**kw)
        self.addCleanup(d.close)
        return d

    def last(self, d: FakeDaemon) -> Session:
        s = d.sessions[-1]
        self.assertTrue(s.done.wait(10), "the fake daemon's connection did not end")
        self.assertEqual(s.errors, [])
        return s

    def test_upgrade_request(self):
        d = self.daemon()
        n = weightfs.push("policy", {"b": ("BF16", [2, 3], bytes(12)), "a": ("F32", [1], f32(2))},
                          files={"config.json": '{"x": 1}', "tok.bin": b"\x00\xff"},
                          socket=d.path)
        self.assertEqual(n, 1)
        s = self.last(d)
        head, _, body = s.raw_request.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[0], b"POST /v1/push HTTP/1.1")
        for h in (b"Host: weightfs", b"Connection: Upgrade", b"Upgrade: weightfs-push/1",
                  b"Content-Type: application/json", b"Content-Length: %d" % len(body)):
            self.assertIn(h, lines)
        self.assertEqual(json.loads(body), {
            "name": "policy",
            "tensors": [{"name": "b", "dtype": "BF16", "shape": [2, 3]},
                        {"name": "a", "dtype": "F32", "shape": [1]}],
            "files": {"config.json": "eyJ4IjogMX0=", "tok.bin": "AP8="}})
        self.assertEqual(s.received, {"b": bytes(12), "a": f32(2)})
        self.assertEqual(s.end, "commit")

    def test_refusals_carry_code_and_message(self):
        cases = [
            (409, {"error": {"code": "busy", "message":
                             "push policy: a push is in progress by pid 4242 (uid 0) since x"}},
             False),
            (507, {"error": {"code": "no_memory", "message": "push policy: needs 1.0 GiB of host "
                             "memory, 0.5 GiB free of the 2.0 GiB budget",
                             "budget": {"tier": "host", "need": 1 << 30}}}, True),
            (403, {"error": {"code": "forbidden", "message": "forbidden"}}, False),
        ]
        for status, obj, chunked in cases:
            with self.subTest(status=status):
                d = self.daemon(script=lambda d, c, f, s, st=status, o=obj, ch=chunked:
                                FakeDaemon.answer(c, st, o, ch))
                with self.assertRaises(weightfs.PushError) as cm:
                    weightfs.push("policy", {"a": ("F32", [1], f32(1))}, socket=d.path)
                e = cm.exception
                self.assertEqual((e.status, e.code, e.message),
                                 (status, obj["error"]["code"], obj["error"]["message"]))
                self.assertIn(obj["error"]["message"], str(e))
                self.assertEqual(e.budget, obj["error"].get("budget"))
                self.assertIsInstance(e, weightfs.DaemonError)
                self.assertIsInstance(e, weightfs.WeightfsError)

    def test_not_found_means_an_old_daemon(self):
        d = self.daemon(script=lambda d, c, f, s: FakeDaemon.answer(
            c, 404, {"error": {"code": "not_found", "message": "no such request POST /v1/push"}}))
        with self.assertRaises(weightfs.PushError) as cm:
            weightfs.push("policy", {"a": ("F32", [1], f32(1))}, socket=d.path)
        self.assertEqual(cm.exception.code, "not_found")

    def test_larger_than_the_scratch_pipelined(self):
        d = self.daemon(scratch_bytes=1024, hold_first_answer=True)
        tensors = {f"t{i}": ("U8", [100], bytes([i]) * 100) for i in range(20)}
        tensors["big"] = ("F32", [175], f32(*range(175)))   # 700 bytes: more than half
        tensors["empty"] = ("BF16", [0, 4], b"")
        tensors["mask"] = ("BOOL", [3], b"\x01\x00\x01")
        tensors["fp8"] = ("F8_E4M3", [2, 2], b"\x01\x02\x03\x04")
        for i in range(20, 30):
            tensors[f"t{i}"] = ("U8", [100], bytes([i]) * 100)
        n = weightfs.push("policy", tensors, socket=d.path)
        s = self.last(d)
        self.assertEqual(n, 1)
        self.assertEqual(s.received, {k: bytes(v[2]) for k, v in tensors.items()})
        writes = [op for op in s.ops if op["op"] == "write"]
        self.assertGreater(len(writes), 5)          # chunked: 3.4 KB through 1 KiB
        self.assertGreaterEqual(s.max_in_flight, 2)  # a write sent before the last was answered
        big = [w for w in writes if any(t["name"] == "big" for t in w["tensors"])]
        self.assertEqual(big[0]["tensors"], [{"name": "big", "at": 0}])  # alone
        for w in writes:  # each batch within one half, the big one aside
            if w is big[0]:
                continue
            ats = [t["at"] for t in w["tensors"]]
            self.assertTrue(all(a < 512 for a in ats) or all(a >= 512 for a in ats), w)
            self.assertTrue(all(a % wp.SCRATCH_ALIGN == 0 for a in ats))
        self.assertEqual([t["name"] for w in writes for t in w["tensors"]], list(tensors))
        self.assertEqual(s.ops[-1], {"op": "commit", "released": True})

    def test_fd_after_the_head(self):
        d = self.daemon(fd_with_head=False)
        self.assertEqual(weightfs.push("m", {"a": ("I64", [2], struct.pack("<2q", -1, 7))},
                                       socket=d.path), 1)
        self.assertEqual(self.last(d).received["a"], struct.pack("<2q", -1, 7))

    def test_bad_data_refused_before_connecting(self):
        d = self.daemon()
        bad = [
            ({"ok": ("F32", [2], f32(1, 2)), "w": ("BF16", [3, 2], bytes(11))},
             ValueError, "'w': 11 bytes of data, but BF16 [3, 2] is 12 bytes"),
            ({"w": ("BF17", [1], b"xx")}, ValueError, "'w': unknown safetensors dtype 'BF17'"),
            ({"w": ("F32", [-1], b"")}, ValueError, "'w': shape [-1]"),
            ({"w": ("F32", [1], 3.0)}, TypeError, "'w': data must be bytes-like"),
            ({"w": ("F4", [3], b"xx")}, ValueError, "'w': 3 elements of F4 are 12 bits"),
            ({}, ValueError, "at least one tensor"),
            ({"w": ("F32", [1])}, TypeError, "'w': (dtype, shape) without data"),
        ]
        for tensors, exc, msg in bad:
            with self.subTest(msg=msg):
                with self.assertRaises(exc) as cm:
                    weightfs.push("policy", tensors, socket=d.path)
                self.assertIn(msg, str(cm.exception))
        time.sleep(0.05)
        self.assertEqual(d.sessions, [])

    def test_buffers_of_any_shape(self):
        import array
        d = self.daemon()
        arr = array.array("f", [1.5, 2.5])
        mv2d = memoryview(bytearray(range(12))).cast("B", (3, 4))
        strided = memoryview(bytes(range(8)))[::2]
        n = weightfs.push("m", {"a": ("F32", [2], arr), "b": ("U8", [3, 4], mv2d),
                                "c": ("U8", [4], strided)}, socket=d.path)
        self.assertEqual(n, 1)
        r = self.last(d).received
        self.assertEqual(r, {"a": arr.tobytes(), "b": bytes(range(12)), "c": bytes([0, 2, 4, 6])})

    def test_streaming(self):
        d = self.daemon(scratch_bytes=256)
        manifest = [("x", "F32", [4]), ("y", "U8", [200]), ("z", "U8", [100])]
        with weightfs.Push("policy", manifest, socket=d.path) as p:
            self.assertEqual(p.staged["scratch_bytes"], 256)
            p.write("y", bytes(range(200)))
            p.write("x", ("F32", [4], f32(1, 2, 3, 4)))
            with self.assertRaisesRegex(ValueError, "'x' was already written"):
                p.write("x", f32(1, 2, 3, 4))
            with self.assertRaisesRegex(KeyError, "'nope' is not in the manifest"):
                p.write("nope", b"")
            with self.assertRaisesRegex(ValueError, "'z': F32 \\[25\\] given, the manifest "
                                                    "says U8 \\[100\\]"):
                p.write("z", ("F32", [25], bytes(100)))
            p.write("z", bytes(100))
        self.assertEqual(p.version, 1)
        s = self.last(d)
        self.assertEqual(s.received["y"], bytes(range(200)))
        self.assertEqual(p.done, 316)
        self.assertEqual(s.end, "commit")
        with self.assertRaisesRegex(RuntimeError, "committed"):
            p.write("x", b"")

    def test_torch_like_tensors_give_the_manifest(self):
        class Dtype:
            def __init__(self, name):
                self.name = name

            def __str__(self):
                return "torch." + self.name

        class FakeTensor:  # what the manifest reads of a torch tensor, without torch
            def __init__(self, dtype, shape):
                self.dtype, self.shape, self.is_meta = Dtype(dtype), shape, True

            def data_ptr(self):
                return 0

        d = self.daemon()
        sd = {"w": FakeTensor("bfloat16", (2, 3)), "s": FakeTensor("float8_e4m3fn", ()),
              "m": FakeTensor("bool", (4,))}
        p = weightfs.Push("policy", sd, socket=d.path)
        self.addCleanup(p.abort)
        self.assertEqual([(t["name"], t["dtype"], t["shape"]) for t in p.staged["tensors"]],
                         [("w", "BF16", [2, 3]), ("s", "F8_E4M3", []), ("m", "BOOL", [4])])
        with self.assertRaisesRegex(ValueError, "'w': F16 \\[2, 3\\] given, the manifest says "
                                                "BF16 \\[2, 3\\]"):
            p.write("w", FakeTensor("float16", (2, 3)))
        with self.assertRaisesRegex(ValueError, "'w' is on the meta device"):
            p.write("w", sd["w"])
        with self.assertRaisesRegex(ValueError, "'x': torch.complex32 has no safetensors dtype"):
            weightfs.Push("policy", {"x": FakeTensor("complex32", (1,))}, socket=d.path)

    def test_exception_in_block_aborts(self):
        d = self.daemon()
        with self.assertRaisesRegex(ZeroDivisionError, "boom"):
            with weightfs.Push("policy", {"a": ("F32", [1])}, socket=d.path) as p:
                raise ZeroDivisionError("boom")
        s = self.last(d)
        self.assertEqual(s.ops, [{"op": "abort", "reason": "ZeroDivisionError('boom')"}])
        self.assertEqual(s.end, "abort")
        self.assertIsNone(p.version)
        with self.assertRaisesRegex(RuntimeError, "aborted"):
            p.commit()

    def test_explicit_abort_closes(self):
        def abort_then_wait_for_eof(d, conn, f, s):
            FakeDaemon.stage_and_serve(d, conn, f, s)  # returns after answering the abort
            s.after_abort = f.read()  # b"" once the writer has closed its end
        d = self.daemon(script=abort_then_wait_for_eof)
        p = weightfs.Push("policy", {"a": ("F32", [1])}, socket=d.path)
        p.write("a", f32(3))
        p.abort("changed my mind")
        s = self.last(d)
        self.assertEqual(s.ops[-1], {"op": "abort", "reason": "changed my mind"})
        self.assertEqual(s.after_abort, b"")
        p.abort("twice is fine")

    def test_commit_with_missing_tensors_aborts(self):
        d = self.daemon()
        p = weightfs.Push("policy", [("a", "F32", [1]), ("b", "F32", [1])], socket=d.path)
        p.write("a", f32(1))
        with self.assertRaisesRegex(ValueError, "commit: 1 of 2 tensors not written: 'b'"):
            p.commit()
        s = self.last(d)
        self.assertEqual(s.end, "abort")
        self.assertIn("not written", s.ops[-1]["reason"])

    def test_daemon_error_line_raises(self):
        # --push-timeout or `weightfs cancel`: an error line, then the daemon closes
        def close_after_stage(d, conn, f, s):
            fd = os.memfd_create("scratch")
            os.ftruncate(fd, 64)
            staged = {"staged": {"name": "m", "scratch_bytes": 64, "files": [], "tensors": [
                {"name": "a", "file": "model.safetensors", "size": 4, "slab_offset": 0}]}}
            socket.send_fds(conn, [b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
                                   + json.dumps(staged).encode() + b"\n"], [fd])
            os.close(fd)
            s.ops.append(json.loads(f.readline()))
            conn.sendall(b'{"error": {"code": "cancelled", "message": "push m: timed out"}}\n')
        d2 = self.daemon(script=close_after_stage)
        with self.assertRaises(weightfs.PushError) as cm:
            weightfs.push("m", {"a": ("F32", [1], f32(1))}, socket=d2.path)
        self.assertEqual((cm.exception.code, cm.exception.message), ("cancelled", "push m: timed out"))

    def test_repeat_layout_without_manifest(self):
        mnt = tempfile.mkdtemp(prefix="weightfs-mnt-")
        self.addCleanup(shutil.rmtree, mnt, True)
        os.makedirs(os.path.join(mnt, ".weightfs", "versions"))
        os.makedirs(os.path.join(mnt, "policy@3"))
        os.symlink("policy@3", os.path.join(mnt, "policy"))
        with open(os.path.join(mnt, "policy@3", "model.safetensors"), "wb") as f:
            f.write(build({"w": ("F32", (2,), f32(1, 2)), "b": ("BF16", (1,), b"\0\0")}))

        def status_then_push(d, conn, f, s):
            if s.raw_request.startswith(b"GET /v1/status "):
                FakeDaemon.answer(conn, 200, {"mountpoint": mnt}, chunked=True)
            else:
                d.stage_and_serve(conn, f, s)
        d = self.daemon(script=status_then_push)
        with weightfs.Push("policy", socket=d.path) as p:
            p.write("w", f32(5, 6))
            p.write("b", b"\1\1")
        s = self.last(d)
        self.assertEqual({t["name"]: (t["dtype"], t["shape"]) for t in s.body["tensors"]},
                         {"w": ("F32", [2]), "b": ("BF16", [1])})
        self.assertEqual(p.version, 1)


# --------------------------------------------------------------------------------------------
# the real daemon


def _bin() -> Optional[str]:
    b = os.environ.get("WEIGHTFS_BIN") or os.path.join(REPO, "bin", "weightfs")
    return b if os.access(b, os.X_OK) else None


def _skip_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "skipping: mounting needs root (run the tests as root, as CI does)"
    if not os.path.exists("/dev/fuse"):
        return "skipping: mounting needs /dev/fuse"
    if _bin() is None:
        return "skipping: no daemon binary (make build writes bin/weightfs; or set WEIGHTFS_BIN)"
    return None


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[3])
    import weightfs
    p = weightfs.Push(sys.argv[1], [("w", "U8", [4096])], socket=sys.argv[2])
    p.write("w", bytes(4096))
    print("staged", flush=True)
    time.sleep(600)
""")


@unittest.skipIf(_skip_reason() is not None, _skip_reason() or "")
class TestOnRealDaemon(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp, cls.mnt, cls.sock = mountd.workdir("weightfs-push-")
        try:
            cls.daemon = mountd.start(
                _bin(), cls.sock, cls.mnt, os.path.join(cls.tmp, "daemon.log"),
                ready=lambda: os.path.isdir(os.path.join(cls.mnt, ".weightfs", "versions")))
        except BaseException:
            shutil.rmtree(cls.tmp, ignore_errors=True)
            raise
        try:
            weightfs.push("probe", {"p": ("U8", [1], b"\x01")}, socket=cls.sock)
        except weightfs.PushError as e:
            if e.status == 404:
                cls.tearDownClass()
                raise unittest.SkipTest(f"skipping: this daemon has no POST /v1/push ({e})")
            raise

    @classmethod
    def tearDownClass(cls):
        mountd.stop(cls.daemon)
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def versions(self, name: str) -> list[int]:
        out = subprocess.run([_bin(), "--socket", self.sock, "ls", "--json"], check=True,
                             capture_output=True, text=True).stdout
        models = json.loads(out).get("models") or []
        return sorted(v["number"] for m in models if m["name"] == name
                      for v in m.get("versions") or [])

    def read_folder(self, folder: str) -> dict[str, tuple[str, list[int], bytes]]:
        out = {}
        for fn in sorted(os.listdir(folder)):
            if not fn.endswith(".safetensors"):
                continue
            path = os.path.join(folder, fn)
            h = read_header(path)
            with open(path, "rb") as f:
                data = f.read()
            for t in h.tensors.values():
                a = h.data_offset + t.begin
                out[t.name] = (t.dtype, list(t.shape), data[a:a + t.nbytes])
        return out

    def model(self, seed: int) -> dict:
        big = bytes((i * 7 + seed) % 251 for i in range(3 << 20))  # larger than any small scratch
        return {
            "embed.weight": ("BF16", [64, 32], bytes((i + seed) % 256 for i in range(4096))),
            "mask": ("BOOL", [5], bytes([1, 0, 1, 1, seed % 2])),
            "empty": ("F32", [0, 8], b""),
            "scale": ("F8_E4M3", [16], bytes(range(seed, seed + 16))),
            "ids": ("I64", [3], struct.pack("<3q", -seed, 0, seed)),
            "big": ("U8", [len(big)], big),
        }

    def test_push_read_back_and_again(self):
        path = os.path.join(self.mnt, "policy")
        m1 = self.model(1)
        n1 = weightfs.push("policy", m1, files={"config.json": '{"model_type": "tiny"}'},
                           socket=self.sock)
        self.assertEqual(weightfs.resolve_version(path).number, n1)
        self.assertEqual(weightfs.wait_version(path), n1)
        folder1 = weightfs.resolve_version(path).folder
        self.assertEqual(self.read_folder(folder1), {k: (d, s, b) for k, (d, s, b) in m1.items()})
        with open(os.path.join(folder1, "config.json")) as f:
            self.assertEqual(json.load(f), {"model_type": "tiny"})
        heads1 = {fn: read_header(os.path.join(folder1, fn)) for fn in os.listdir(folder1)
                  if fn.endswith(".safetensors")}

        got = {}
        t = threading.Thread(target=lambda: got.setdefault(
            "v", weightfs.wait_version(path, newer_than=n1, timeout=60)))
        t.start()
        m2 = self.model(2)
        with weightfs.Push("policy", socket=self.sock) as p:  # the same layout as n1
            for k, (d, s, b) in m2.items():
                p.write(k, b)
        t.join(60)
        self.assertEqual(got.get("v"), p.version)
        self.assertGreater(p.version, n1)
        self.assertTrue(p.staged["same_layout"])
        folder2 = weightfs.resolve_version(path).folder
        self.assertEqual(self.read_folder(folder2), {k: (d, s, b) for k, (d, s, b) in m2.items()})
        heads2 = {fn: read_header(os.path.join(folder2, fn)) for fn in os.listdir(folder2)
                  if fn.endswith(".safetensors")}
        self.assertEqual(set(heads1), set(heads2))
        for fn in heads1:
            with open(os.path.join(folder1, fn), "rb") as a, open(os.path.join(folder2, fn),
                                                                  "rb") as b:
                self.assertEqual(a.read(heads1[fn].data_offset), b.read(heads2[fn].data_offset))
        with open(os.path.join(folder2, "config.json")) as f:  # from the base
            self.assertEqual(json.load(f), {"model_type": "tiny"})

    def test_abort_leaves_nothing(self):
        before = self.versions("aborted")
        with self.assertRaisesRegex(RuntimeError, "stop"):
            with weightfs.Push("aborted", {"w": ("F32", [2])}, socket=self.sock) as p:
                p.write("w", f32(1, 2))
                raise RuntimeError("stop")
        self.assertEqual(self.versions("aborted"), before)
        self.assertFalse(os.path.lexists(os.path.join(self.mnt, "aborted")))
        # the name is free again
        self.assertGreater(weightfs.push("aborted", {"w": ("F32", [2], f32(3, 4))},
                                         socket=self.sock), 0)

    def test_second_push_is_busy(self):
        with weightfs.Push("busy", {"w": ("F32", [1])}, socket=self.sock) as p:
            with self.assertRaises(weightfs.PushError) as cm:
                weightfs.Push("busy", {"w": ("F32", [1])}, socket=self.sock)
            self.assertEqual(cm.exception.code, "busy")
            self.assertIn(f"pid {os.getpid()}", cm.exception.message)
            p.write("w", f32(1))

    def test_killed_writer_leaves_nothing(self):
        w = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, "killed", self.sock, PKG],
                             stdout=subprocess.PIPE, text=True)
        try:
            self.assertEqual(w.stdout.readline().strip(), "staged")
        finally:
            w.send_signal(signal.SIGKILL)
            w.wait()
            w.stdout.close()
        self.assertFalse(os.path.lexists(os.path.join(self.mnt, "killed")))
        self.assertEqual(self.versions("killed"), [])
        deadline = time.monotonic() + 10
        while True:  # the daemon notices the closed connection and frees the name
            try:
                n = weightfs.push("killed", {"w": ("U8", [4096], bytes([9]) * 4096)},
                                  socket=self.sock)
                break
            except weightfs.PushError as e:
                if e.code != "busy" or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.assertEqual(self.read_folder(os.path.join(self.mnt, f"killed@{n}"))["w"][2],
                         bytes([9]) * 4096)

    def test_cancel_aborts(self):
        p = weightfs.Push("cancelled", [("a", "F32", [1]), ("b", "F32", [1])], socket=self.sock)
        p.write("a", f32(1))
        subprocess.run([_bin(), "--socket", self.sock, "cancel", "cancelled"], check=True,
                       capture_output=True)
        with self.assertRaises(weightfs.PushError) as cm:
            p.write("b", f32(2))
            p.commit()
        self.assertEqual(cm.exception.code, "cancelled", cm.exception)
        self.assertIn("weightfs cancel", cm.exception.message)
        self.assertFalse(os.path.lexists(os.path.join(self.mnt, "cancelled")))
        self.assertEqual(self.versions("cancelled"), [])


_AS_USER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[3])
    import weightfs
    try:
        print(weightfs.push(sys.argv[1], {"w": ("U8", [3], b"abc")}, socket=sys.argv[2]))
    except weightfs.PushError as e:
        print(e.code, e.message)
""")


def _own_daemon(test: unittest.TestCase, tmp: str, mnt: str, sock: str, args: list) -> None:
    """A daemon with flags of its own for one test, stopped at its end; the test is skipped
    when the binary predates the flags."""
    try:
        daemon = mountd.start(_bin(), sock, mnt, os.path.join(tmp, "daemon.log"), args,
                              ready=lambda: os.path.isdir(os.path.join(mnt, ".weightfs",
                                                                       "versions")))
    except RuntimeError as e:
        if "unknown flag" in str(e):
            test.skipTest(f"skipping: this daemon has no {args[0]} ({e})")
        raise
    test.addCleanup(mountd.stop, daemon)


def _world_python() -> Optional[str]:
    """An interpreter that any uid may run (pyenv's under /root is not)."""
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        path = os.path.realpath(cand)
        parts = path.split(os.sep)
        dirs = [os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts))]
        try:
            if (all(os.stat(d).st_mode & 0o001 for d in dirs) and os.stat(path).st_mode & 0o001
                    and sys.version_info[:2] >= (3, 10)):
                return path
        except OSError:
            continue
    return None


@unittest.skipIf(_skip_reason() is not None, _skip_reason() or "")
@unittest.skipIf(_world_python() is None, "skipping: no Python interpreter other uids may run")
class TestPushAllowUID(unittest.TestCase):
    """--push-allow-uid: that uid may push and do nothing else; another is refused, verbatim."""

    def test_allowed_and_refused(self):
        tmp, mnt, sock = mountd.workdir("weightfs-allow-")
        self.addCleanup(shutil.rmtree, tmp, True)
        pkg = os.path.join(tmp, "pkg")  # a copy the other uids can read
        shutil.copytree(os.path.join(PKG, "weightfs"), os.path.join(pkg, "weightfs"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        for root, dirs, files in os.walk(pkg):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        _own_daemon(self, tmp, mnt, sock, ["--push-allow-uid", "65534"])

        def as_uid(uid: int) -> str:
            return subprocess.run(
                [_world_python(), "-c", _AS_USER, "shared", sock, pkg], capture_output=True,
                text=True, timeout=60, user=uid, group=uid, extra_groups=[],
                env={"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"},
            ).stdout.strip()

        n = as_uid(65534)
        self.assertTrue(n.isdigit(), n)
        with open(os.path.join(mnt, f"shared@{n}", "model.safetensors"), "rb") as f:
            h = read_header(f)
            f.seek(h.data_offset)
            self.assertEqual(f.read(3), b"abc")
        refused = as_uid(65533)
        self.assertTrue(refused.startswith("forbidden permission denied on the control socket "),
                        refused)


@unittest.skipIf(_skip_reason() is not None, _skip_reason() or "")
class TestPushTimeout(unittest.TestCase):
    def test_timeout_aborts(self):
        tmp, mnt, sock = mountd.workdir("weightfs-timeout-")
        self.addCleanup(shutil.rmtree, tmp, True)
        _own_daemon(self, tmp, mnt, sock, ["--push-timeout", "1s"])
        p = weightfs.Push("slow", [("a", "F32", [1])], socket=sock)
        self.assertEqual(p.staged["timeout_seconds"], 1)
        time.sleep(1.5)
        with self.assertRaises(weightfs.PushError) as cm:
            p.write("a", f32(1))
            p.commit()
        self.assertEqual(cm.exception.code, "cancelled", cm.exception)
        self.assertIn("push timeout", cm.exception.message)
        self.assertFalse(os.path.lexists(os.path.join(mnt, "slow")))


if __name__ == "__main__":
    unittest.main()
