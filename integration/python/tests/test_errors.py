"""Every exception class the package defines derives from ``weightfs.WeightfsError`` and keeps
the builtin base callers may already catch."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import unittest

import stfiles  # noqa: F401  (puts the package on sys.path)

import weightfs


def package_exceptions() -> dict:
    """``{qualified name: class}`` of the exception classes defined in any weightfs module."""
    found = {}
    for mod in pkgutil.walk_packages(weightfs.__path__, "weightfs."):
        m = importlib.import_module(mod.name)  # every module imports without torch
        for _, obj in inspect.getmembers(m, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("weightfs"):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


class ErrorTests(unittest.TestCase):
    def test_every_error_is_a_weightfs_error(self):
        found = package_exceptions()
        self.assertGreaterEqual(len(found), 12, sorted(found))
        for name, cls in found.items():
            with self.subTest(name):
                self.assertTrue(issubclass(cls, weightfs.WeightfsError), cls.__mro__)

    def test_builtin_bases_kept(self):
        want = {
            weightfs.HeaderError: ValueError,
            weightfs.ManifestError: ValueError,
            weightfs.UnsupportedDtypeError: TypeError,
            weightfs.ModelMismatchError: RuntimeError,
            weightfs.ModelGoneError: FileNotFoundError,
            weightfs.NotOnMountError: ValueError,
            weightfs.DaemonUnreachableError: ConnectionError,
            weightfs.NoReplicaError: RuntimeError,
        }
        for cls, base in want.items():
            with self.subTest(cls.__name__):
                self.assertTrue(issubclass(cls, base))
        self.assertTrue(issubclass(weightfs.PushError, weightfs.DaemonError))
        self.assertTrue(issubclass(weightfs.HeaderError, weightfs.SafetensorError))

    def test_exported(self):
        for name in package_exceptions().values():
            self.assertIs(getattr(weightfs, name.__name__), name, name)

    def test_os_error_subclass_still_builds_like_one(self):
        e = weightfs.ModelGoneError(2, "gone", "/mnt/weightfs/x")
        self.assertEqual((e.errno, e.filename), (2, "/mnt/weightfs/x"))


if __name__ == "__main__":
    unittest.main()
