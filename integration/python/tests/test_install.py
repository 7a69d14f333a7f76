"""The offline install of the README, in a fresh venv: ``pip install --no-index`` with build
isolation and with ``--no-build-isolation``. The in-tree backend (``_build/weightfs_build.py``)
needs nothing but the standard library, so neither may reach the network; the installed
package must report the one version and ship ``py.typed``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import unittest
import zipfile

import stfiles  # noqa: F401  (puts the package on sys.path)

import weightfs

PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(PKG_DIR, "_build"))
import weightfs_build  # noqa: E402

HAVE_VENV = (importlib.util.find_spec("venv") is not None
             and importlib.util.find_spec("ensurepip") is not None)
NO_VENV = ("the venv or ensurepip module is missing (Debian: apt-get install python3-venv): "
           "offline install test skipped")


def _env() -> dict:
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("PIP_") or k in ("PYTHONPATH", "VIRTUAL_ENV"):
            del env[k]
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


class BackendTests(unittest.TestCase):
    def test_one_version(self):
        self.assertEqual(weightfs_build.version(), weightfs.__version__)

    def test_project_readers_agree(self):
        with open(os.path.join(PKG_DIR, "pyproject.toml"), encoding="utf-8") as f:
            text = f.read()
        self.assertEqual(weightfs_build._project_subset(text), weightfs_build.project())
        self.assertEqual(weightfs_build.project()["dynamic"], ["version"])

    def test_wheel(self):
        with tempfile.TemporaryDirectory() as d:
            name = weightfs_build.build_wheel(d)
            self.assertEqual(name, f"weightfs-{weightfs.__version__}-py3-none-any.whl")
            with zipfile.ZipFile(os.path.join(d, name)) as z:
                names = z.namelist()
                self.assertIn("weightfs/py.typed", names)
                self.assertIn("weightfs/safeopen.py", names)
                di = f"weightfs-{weightfs.__version__}.dist-info"
                meta = z.read(f"{di}/METADATA").decode()
                self.assertIn(f"Version: {weightfs.__version__}\n", meta)
                self.assertIn('Requires-Dist: torch>=2.1; extra == "torch"', meta)
                self.assertIn("Root-Is-Purelib: true", z.read(f"{di}/WHEEL").decode())
                record = z.read(f"{di}/RECORD").decode().splitlines()
                listed = {line.split(",")[0]: line for line in record}
                self.assertEqual(set(listed), set(names))
                for n in names:
                    if n.endswith("RECORD"):
                        continue
                    data = z.read(n)
                    self.assertEqual(listed[n],
                                     f"{n},{weightfs_build._record_hash(data)},{len(data)}")

    def test_sdist(self):
        import tarfile

        with tempfile.TemporaryDirectory() as d:
            name = weightfs_build.build_sdist(d)
            with tarfile.open(os.path.join(d, name)) as t:
                got = set(t.getnames())
            base = f"weightfs-{weightfs.__version__}"
            for want in ("pyproject.toml", "PKG-INFO", "_build/weightfs_build.py",
                         "weightfs/py.typed", "weightfs/__init__.py"):
                self.assertIn(f"{base}/{want}", got)


@unittest.skipUnless(HAVE_VENV, NO_VENV)
class OfflineInstallTests(unittest.TestCase):
    def install(self, *flags: str, editable: bool = False) -> None:
        with tempfile.TemporaryDirectory() as d:
            venv = os.path.join(d, "v")
            subprocess.run([sys.executable, "-m", "venv", venv], check=True,
                           capture_output=True, env=_env())
            py = os.path.join(venv, "bin", "python")
            target = ["-e", PKG_DIR] if editable else [PKG_DIR]
            r = subprocess.run([py, "-m", "pip", "install", "--no-index", *flags, *target],
                               capture_output=True, text=True, env=_env(), cwd=d)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            probe = ("import os, weightfs; d = os.path.dirname(weightfs.__file__); "
                     "print(weightfs.__version__, os.path.isfile(os.path.join(d, 'py.typed')), d)")
            r = subprocess.run([py, "-c", probe], capture_output=True, text=True, env=_env(),
                               cwd=d)
            self.assertEqual(r.returncode, 0, r.stderr)
            ver, typed, where = r.stdout.split()
            self.assertEqual((ver, typed), (weightfs.__version__, "True"))
            want = os.path.join(PKG_DIR, "weightfs") if editable else venv
            self.assertTrue(where.startswith(want), (where, want))  # which copy is imported

    def test_install_offline(self):
        self.install()

    def test_install_offline_no_build_isolation(self):
        self.install("--no-build-isolation")

    def test_install_offline_editable(self):
        self.install(editable=True)


if __name__ == "__main__":
    unittest.main()
