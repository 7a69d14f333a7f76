"""Hear of a model's new versions on a weightfs mount, as any user who may read the mount.

Standard library only. ``wait_version`` and ``watch`` read ``MOUNT/.weightfs/versions/NAME``
(docs/PROTOCOL.md, "Watching versions"): a read at offset 0 answers the current version at once
(``b"7\\n"``); a read at any other offset blocks in the daemon until the current version differs
from the one this open file last answered; end of file means the model is gone. A timeout is
set on the open file by ioctl, so no thread and no signal is needed, and a blocked read ends
with ``TimeoutError`` (``ETIMEDOUT``); Ctrl-C interrupts it as any read.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import struct
import time
from typing import Iterator, NamedTuple, Optional, Tuple

from .errors import WeightfsError

VERSIONS_DIR = ".weightfs/versions"
# _IOW('W', 2, uint32): milliseconds a blocked read of this open file waits (0: no limit).
IOCTL_WATCH_TIMEOUT = 0x40045702

_VERSIONED = re.compile(r"^(.+)@([1-9][0-9]*)$")


class NotOnMountError(WeightfsError, ValueError):
    """The path is not a model on a weightfs mount (``MOUNT/NAME`` or ``MOUNT/NAME@N``)."""


class ModelGoneError(WeightfsError, FileNotFoundError):
    """The model is not on the mount, or it went (was unloaded) while we waited."""


def split_model_path(path: str) -> Tuple[str, str]:
    """``/mnt/weightfs/policy`` (or ``policy@7``, or with a trailing slash) -> (mount root,
    model name). The path is not resolved: ``NAME`` is a symlink to ``NAME@N``."""
    p = os.path.normpath(os.path.abspath(os.fspath(path)))
    root, name = os.path.split(p)
    m = _VERSIONED.match(name)
    if m:
        name = m.group(1)
    if not name or name.startswith(".") or root == p:
        raise NotOnMountError(f"{path!r} names no model: want MOUNT/NAME, e.g. /mnt/weightfs/policy")
    return root, name


class ModelVersion(NamedTuple):
    """One version of a model on a weightfs mount: ``folder`` is ``MOUNT/NAME@NUMBER``."""

    name: str
    number: int
    folder: str


def resolve_version(path: str) -> ModelVersion:
    """The version folder that ``path`` names, resolved once.

    ``path`` is a model on a weightfs mount: ``MOUNT/NAME`` (the symlink to the current version,
    read once with ``readlink``, so a commit landing afterwards does not change the answer) or a
    version folder ``MOUNT/NAME@N``. The version folder stays readable, with the same bytes, for
    as long as the version is kept, whatever happens to the symlink. Raises ``ModelGoneError``
    when the model (or that version) is not there, ``NotOnMountError`` for a path that is no
    model on a weightfs mount (no ``.weightfs/versions`` beside it, or a symlink to anything but
    ``NAME@N`` in the same folder).
    """
    root, name = split_model_path(path)
    p = os.path.normpath(os.path.abspath(os.fspath(path)))
    base = os.path.basename(p)
    if not os.path.isdir(os.path.join(root, VERSIONS_DIR)):
        raise NotOnMountError(f"{root} is not a weightfs mount (it has no {VERSIONS_DIR})")
    m = _VERSIONED.match(base)
    if m is None:
        try:
            target = os.readlink(p)
        except FileNotFoundError:
            raise ModelGoneError(f"no model {name!r} on the weightfs mount {root}") from None
        except OSError as e:  # EINVAL: a folder or file, not the NAME symlink
            raise NotOnMountError(f"{path!r} is not the symlink of a weightfs model "
                                  f"({e.strerror})") from None
        m = _VERSIONED.match(target)
        if "/" in target or m is None or m.group(1) != name:
            raise NotOnMountError(f"{path!r} points to {target!r}, not to {name}@N as a weightfs "
                                  "model does")
        base = target
    folder = os.path.join(root, base)
    if not os.path.isdir(folder):
        raise ModelGoneError(f"{name}: version {base} is not on the weightfs mount {root}")
    return ModelVersion(name, int(m.group(2)), folder)


def _open(path: str) -> Tuple[int, str]:
    root, name = split_model_path(path)
    if not os.path.isdir(os.path.join(root, VERSIONS_DIR)):
        raise NotOnMountError(f"{root} is not a weightfs mount (it has no {VERSIONS_DIR})")
    try:
        return os.open(os.path.join(root, VERSIONS_DIR, name), os.O_RDONLY | os.O_CLOEXEC), name
    except FileNotFoundError:
        raise ModelGoneError(f"no model {name!r} on the weightfs mount {root}") from None


def _read(fd: int, offset: int, name: str) -> Tuple[int, int]:
    """One line at offset: (version, bytes read); ModelGoneError at end of file."""
    data = os.pread(fd, 64, offset)
    if not data:
        raise ModelGoneError(f"model {name!r} is no longer on the mount")
    return int(data), len(data)


def _set_timeout(fd: int, seconds: Optional[float]) -> None:
    ms = 0 if seconds is None else min(max(1, math.ceil(seconds * 1000)), 0xFFFFFFFF)
    fcntl.ioctl(fd, IOCTL_WATCH_TIMEOUT, struct.pack("<I", ms))


def wait_version(path: str, newer_than: Optional[int] = None, timeout: Optional[float] = None) -> int:
    """The current version number of the model at ``path`` once it is greater than
    ``newer_than`` (at once when it already is, or when ``newer_than`` is None); otherwise block
    until a commit (or a rollback) makes it so. Raises ``TimeoutError`` after ``timeout``
    seconds, ``ModelGoneError`` if the model is not there or goes, ``NotOnMountError`` for a
    path that is no model on a weightfs mount."""
    fd, name = _open(path)
    try:
        n, off = _read(fd, 0, name)
        deadline = None if timeout is None else time.monotonic() + timeout
        while newer_than is not None and n <= newer_than:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"{name}: no version newer than {newer_than} within {timeout} s (current: {n})")
            _set_timeout(fd, left)
            try:
                n, k = _read(fd, off, name)
            except TimeoutError:
                raise TimeoutError(
                    f"{name}: no version newer than {newer_than} within {timeout} s (current: {n})") from None
            off += k
        return n
    finally:
        os.close(fd)


def watch(path: str) -> Iterator[int]:
    """The current version number of the model at ``path``, then each new one as it becomes
    current (a commit, an unload of the current version, a rollback). Ends when the model goes;
    ``ModelGoneError`` if it is not there to begin with."""
    fd, name = _open(path)
    try:
        off = 0
        while True:
            try:
                n, k = _read(fd, off, name)
            except ModelGoneError:
                if off == 0:
                    raise
                return
            off += k
            yield n
    finally:
        os.close(fd)
