#!/usr/bin/env python3
"""Checks of the torch-free helpers of gpu_test.py, push_roles.py and gpu_bench.py, runnable on
any machine (no GPU, no torch): python3 -m unittest integration/gpu/test_helpers.py -v

gpu_test.py imports torch at the top; a stub stands in for it here, since none of the helpers
checked touches it.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import types
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))

if "torch" not in sys.modules:
    sys.modules["torch"] = types.ModuleType("torch")  # gpu_test imports it; the helpers do not use it

import gpu_bench  # noqa: E402
import gpu_test  # noqa: E402
import push_roles  # noqa: E402

FAKE_ROLE = textwrap.dedent(r"""
    import json, sys, time
    role = sys.argv[1]
    if role == "engine":
        print(json.dumps({"ready": 1}), flush=True)
        for line in sys.stdin:
            c = json.loads(line)
            if c["op"] == "exit":
                print(json.dumps({"bye": True}), flush=True); break
            if c["op"] == "fail":
                print(json.dumps({"ok": False, "error": "ValueError: no", "trace": "T"}), flush=True); continue
            if c["op"] == "slow":
                time.sleep(5)
            print(json.dumps({"ok": True, "echo": c}), flush=True)
    elif role == "trainer":
        print(json.dumps({"progress": 1}), flush=True)
        print(json.dumps({"version": 3}), flush=True)
    elif role == "half-writer":
        sys.stderr.write("push policy: a push is in progress by pid 42\n")
        sys.exit(1)
""")


class RoleProcTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.fake = os.path.join(self.dir, "fake_roles.py")
        with open(self.fake, "w") as f:
            f.write(FAKE_ROLE)
        self.saved = gpu_test.ROLES
        gpu_test.ROLES = self.fake

    def tearDown(self):
        gpu_test.ROLES = self.saved

    def test_engine_protocol(self):
        e = gpu_test.engine_proc("sock", "src", timeout=30)
        try:
            a = e.call("load", path="/x", timeout=10)
            self.assertEqual(a["echo"], {"op": "load", "path": "/x"})
            e.send("update", copy=False)  # answered later, as push-a does around the trainer
            self.assertEqual(e.answer(10)["echo"]["copy"], False)
            with self.assertRaisesRegex(AssertionError, "ValueError: no"):
                e.call("fail", timeout=10)
            with self.assertRaisesRegex(AssertionError, "no answer within 1s"):
                e.call("slow", timeout=1)
            self.assertEqual(e.answer(10)["echo"]["op"], "slow")  # the late answer is still read in order
        finally:
            e.close()
        self.assertEqual(e.p.returncode, 0)

    def test_result_is_last_line(self):
        r = gpu_test.RoleProc("trainer", "sock").result(timeout=30)
        self.assertEqual(r, {"version": 3})

    def test_failure_quotes_stderr(self):
        p = gpu_test.RoleProc("half-writer", "sock")
        with self.assertRaisesRegex(AssertionError, "in progress by pid 42"):
            p.result(timeout=30)


class HeadersEqualTest(unittest.TestCase):
    def write(self, folder, name, header, data=b"\0" * 8):
        os.makedirs(folder, exist_ok=True)
        h = json.dumps(header).encode()
        with open(os.path.join(folder, name), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + data)

    def test_same_and_different(self):
        d = tempfile.mkdtemp()
        a, b, c = (os.path.join(d, x) for x in "abc")
        hdr = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
        self.write(a, "model.safetensors", hdr, b"\1" * 8)
        self.write(b, "model.safetensors", hdr, b"\2" * 8)  # other tensor bytes: fine
        self.assertEqual(gpu_test.headers_equal(a, b), 1)
        self.write(c, "model.safetensors", {"x": {"dtype": "F32", "shape": [2, 1], "data_offsets": [0, 8]}})
        with self.assertRaisesRegex(AssertionError, "headers differ"):
            gpu_test.headers_equal(a, c)
        with open(os.path.join(b, "config.json"), "w") as f:
            f.write("{}")
        with self.assertRaisesRegex(AssertionError, "files differ"):
            gpu_test.headers_equal(a, b)


class MiscTest(unittest.TestCase):
    def test_wait_until(self):
        n = iter([0, 0, 5])
        self.assertEqual(gpu_test.wait_until("x", lambda: next(n), timeout=5, every=0.01), 5)
        with self.assertRaisesRegex(AssertionError, "never: not within"):
            gpu_test.wait_until("never", lambda: None, timeout=0.05, every=0.01)

    def test_plain_tensors(self):
        t = push_roles.plain_tensors()
        self.assertEqual(t, push_roles.plain_tensors())  # deterministic: the parent regenerates it
        for name, (dt, shape, data) in t.items():
            self.assertEqual(len(data), push_roles.numel(shape) * push_roles.ITEMSIZE[dt], name)
        self.assertIn("U8", {dt for dt, _, _ in t.values()})

    def test_plain_push_role_imports_no_torch(self):
        # the role's import path: weightfs (torch-free) and push_roles itself, no torch
        code = ("import sys; sys.path.insert(0, %r); sys.path.insert(0, %r); import push_roles, weightfs; "
                "print('torch' in sys.modules)") % (os.path.join(HERE, "..", "python"), HERE)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        self.assertEqual(out.stdout.strip(), "False")

    def test_bench_summary(self):
        s = gpu_bench._summary([0.3, None, 0.1, 0.2])
        self.assertEqual((s["min"], s["median"], s["max"]), (0.1, 0.2, 0.3))
        self.assertIsNone(gpu_bench._summary([None]))

    def test_bench_rpc(self):
        import multiprocessing as mp

        a, b = mp.Pipe()
        b.send({"error": "Traceback: boom"})
        with self.assertRaisesRegex(RuntimeError, "trainer:\nTraceback: boom"):
            gpu_bench._rpc_recv(a, "trainer", 5)
        with self.assertRaisesRegex(RuntimeError, "no answer within"):
            gpu_bench._rpc_recv(a, "engine", 0.05)
        b.close()
        with self.assertRaisesRegex(RuntimeError, "died"):
            gpu_bench._rpc_recv(a, "engine", 5)

    def test_bench_qwen_size(self):
        total = sum(2 * gpu_bench._numel(s) for _, s in gpu_bench.qwen3_8b_tensors())
        self.assertAlmostEqual(total / 1e9, 16.38, places=1)
        names = [n for n, _ in gpu_bench.qwen3_8b_tensors()]
        self.assertEqual(len(names), len(set(names)))


if __name__ == "__main__":
    unittest.main()
