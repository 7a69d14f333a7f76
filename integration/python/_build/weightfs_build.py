"""The PEP 517 build backend of the weightfs package, standard library only.

Why our own: ``pip install ./integration/python`` with setuptools as the backend needs the
network (build isolation fetches setuptools) or, with ``--no-build-isolation``, setuptools and
wheel already installed. A pure-Python package needs neither: this module writes the wheel
(and the sdist) with ``zipfile``/``tarfile``, so with ``requires = []`` pip installs it offline
with nothing but itself.

What it reads: the ``[project]`` table of ``pyproject.toml`` (name, description, readme,
requires-python, dependencies, optional-dependencies) and ``weightfs/_version.py`` (the one
version string). What it writes: ``weightfs/*.py`` and ``weightfs/py.typed``, and a
``.dist-info`` with METADATA, WHEEL, top_level.txt and RECORD (sha256 of every file).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import tarfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "weightfs"
TAG = "py3-none-any"

__all__ = ["build_wheel", "build_sdist", "build_editable", "get_requires_for_build_wheel",
           "get_requires_for_build_sdist", "get_requires_for_build_editable", "project",
           "version"]


# -- metadata ----------------------------------------------------------------------------------


def version() -> str:
    """The version in weightfs/_version.py, read as text (importing the package here would
    run its ``__init__`` in the build environment)."""
    with open(os.path.join(ROOT, PACKAGE, "_version.py"), encoding="utf-8") as f:
        m = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M)
    if not m:
        raise RuntimeError(f"{PACKAGE}/_version.py: no line __version__ = \"...\"")
    return m.group(1)


def project() -> dict:
    """The ``[project]`` table of pyproject.toml, with ``optional-dependencies`` inside it.
    ``tomllib`` on Python 3.11+; on 3.10 :func:`_project_subset`, which reads the plain
    ``key = "string"`` / ``key = ["strings"]`` lines that this pyproject.toml uses (a test
    checks that both give the same table)."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        raw = f.read()
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return _project_subset(raw.decode("utf-8"))
    return tomllib.loads(raw.decode("utf-8"))["project"]


def _project_subset(text: str) -> dict:
    out: dict = {}
    table = None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            table = line.strip("[]").strip()
            continue
        if table not in ("project", "project.optional-dependencies"):
            continue
        key, sep, value = (s.strip() for s in line.partition("="))
        try:
            if not sep:
                raise ValueError("no '='")
            val = json.loads(value)  # a basic string or an array of them is also JSON
        except ValueError as e:
            raise RuntimeError(f"pyproject.toml:{n}: the Python 3.10 reader takes only "
                               f"key = \"string\" and key = [\"string\", ...] ({e})") from None
        if table == "project":
            out[key] = val
        else:
            out.setdefault("optional-dependencies", {})[key] = val
    return out


def metadata_text() -> str:
    """METADATA (core metadata 2.1) from the project table and the version."""
    p = project()
    if p.get("name") != PACKAGE:
        raise RuntimeError(f"pyproject.toml: [project] name must be {PACKAGE!r}")
    lines = ["Metadata-Version: 2.1", f"Name: {PACKAGE}", f"Version: {version()}"]
    if p.get("description"):
        lines.append(f"Summary: {p['description']}")
    if p.get("requires-python"):
        lines.append(f"Requires-Python: {p['requires-python']}")
    for dep in p.get("dependencies", []):
        lines.append(f"Requires-Dist: {dep}")
    for extra, deps in sorted(p.get("optional-dependencies", {}).items()):
        lines.append(f"Provides-Extra: {extra}")
        for dep in deps:
            lines.append(f'Requires-Dist: {dep}; extra == "{extra}"')
    body = ""
    readme = p.get("readme")
    if readme:
        lines.append("Description-Content-Type: text/markdown")
        with open(os.path.join(ROOT, readme), encoding="utf-8") as f:
            body = f.read()
    return "\n".join(lines) + "\n\n" + body


def _package_files() -> list:
    """(path in the wheel, path on disk) of the package: its modules and py.typed."""
    d = os.path.join(ROOT, PACKAGE)
    names = sorted(n for n in os.listdir(d) if n.endswith(".py") or n == "py.typed")
    if "py.typed" not in names:
        raise RuntimeError(f"{PACKAGE}/py.typed is missing: the package says it is typed")
    return [(f"{PACKAGE}/{n}", os.path.join(d, n)) for n in names]


# -- wheels ------------------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _write_wheel(directory: str, files: list) -> str:
    """Write ``files`` (``(name in the wheel, bytes)``) plus the dist-info; the wheel's name."""
    ver = version()
    dist_info = f"{PACKAGE}-{ver}.dist-info"
    files = list(files) + [
        (f"{dist_info}/METADATA", metadata_text().encode("utf-8")),
        (f"{dist_info}/WHEEL", ("Wheel-Version: 1.0\nGenerator: weightfs_build\n"
                                f"Root-Is-Purelib: true\nTag: {TAG}\n").encode("ascii")),
        (f"{dist_info}/top_level.txt", f"{PACKAGE}\n".encode("ascii")),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files)
    record += f"{dist_info}/RECORD,,\n"
    files.append((f"{dist_info}/RECORD", record.encode("utf-8")))
    wheel_name = f"{PACKAGE}-{ver}-{TAG}.whl"
    stamp = _date_time()
    with zipfile.ZipFile(os.path.join(directory, wheel_name), "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return wheel_name


def _date_time() -> tuple:
    """SOURCE_DATE_EPOCH when set (reproducible builds), else now; zip wants >= 1980."""
    t = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    return time.gmtime(max(t, 315532800))[:6]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None) -> str:
    """PEP 517: the wheel of the package (pure Python, ``py3-none-any``)."""
    return _write_wheel(wheel_directory, [(n, _read(p)) for n, p in _package_files()])


def build_editable(wheel_directory, config_settings=None, metadata_directory=None) -> str:
    """PEP 660: a wheel whose ``.pth`` file puts this source tree on ``sys.path``."""
    _package_files()  # the same checks as a real build
    pth = (ROOT + "\n").encode("utf-8")
    return _write_wheel(wheel_directory, [(f"__editable__.{PACKAGE}.pth", pth)])


def get_requires_for_build_wheel(config_settings=None) -> list:
    """Nothing: the standard library builds the wheel."""
    return []


def get_requires_for_build_sdist(config_settings=None) -> list:
    return []


def get_requires_for_build_editable(config_settings=None) -> list:
    return []


# -- sdist -------------------------------------------------------------------------------------


def build_sdist(sdist_directory, config_settings=None) -> str:
    """PEP 517: ``weightfs-VERSION.tar.gz`` with pyproject.toml, README.md, the backend, the
    package, plus PKG-INFO."""
    base = f"{PACKAGE}-{version()}"
    members = [("pyproject.toml", os.path.join(ROOT, "pyproject.toml")),
               ("README.md", os.path.join(ROOT, "README.md")),
               ("_build/weightfs_build.py", os.path.abspath(__file__))]
    members += _package_files()
    name = f"{base}.tar.gz"
    stamp = time.mktime(_date_time() + (0, 0, -1))
    with tarfile.open(os.path.join(sdist_directory, name), "w:gz", format=tarfile.PAX_FORMAT) as t:
        for arc, path in members + [("PKG-INFO", None)]:
            data = metadata_text().encode("utf-8") if path is None else _read(path)
            info = tarfile.TarInfo(f"{base}/{arc}")
            info.size, info.mode, info.mtime = len(data), 0o644, int(stamp)
            t.addfile(info, io.BytesIO(data))
    return name
