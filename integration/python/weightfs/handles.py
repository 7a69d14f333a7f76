"""Tell the daemon that this process no longer maps a version's GPU slabs (docs/PROTOCOL.md
§3.1), standard library only.

The daemon counts every process that took a version's CUDA IPC handles as a holder of that
version, and frees a version that left the mount (unload, retention) only once no live process
holds it. A long-lived engine that switches versions therefore releases the ones it has closed:
``weightfs.update_model`` does so itself; :func:`release` does it by hand. Release only what is
closed: the daemon then frees the memory, and a mapping still in use would read freed memory.

The bookkeeping that decides which versions ``update_model`` may release is here too, as plain
functions over ``(version, device, base pointer, bytes)`` records, so that it is tested without
torch.
"""

from __future__ import annotations

import errno
import os
from typing import Iterable, List, Optional, Set, Tuple, Union

from .errors import WeightfsError
from .manifest import open_direct
from .versions import resolve_version

__all__ = ["release", "ReleaseError", "IOCTL_RELEASE", "slab_versions", "releasable"]

#: ``_IO('W', 3)``: no argument; "this process has closed its mappings of this version".
IOCTL_RELEASE = 0x5703

_NOT_WEIGHTFS = (errno.ENOTTY, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


class ReleaseError(WeightfsError):
    """The release ioctl failed: ``path`` is the file it was issued on, ``errno`` the error.
    ``ENOTTY``: the file is not on a weightfs mount, or the daemon predates the ioctl."""

    def __init__(self, message: str, path: str, err: int):
        super().__init__(message)
        self.path = path
        self.errno = err


def _version_file(folder: str) -> str:
    """One file of a version folder: its first weights file, else its first regular file."""
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.is_file())
    except NotADirectoryError:
        raise ReleaseError(f"{folder}: not a folder", folder, errno.ENOTDIR) from None
    weights = [n for n in names if n.endswith(".safetensors")]
    pick = (weights or names or [None])[0]
    if pick is None:
        raise ReleaseError(f"{folder}: no file to release the version through", folder,
                           errno.ENOENT)
    return os.path.join(folder, pick)


def release(path: Union[str, "os.PathLike[str]"]) -> None:
    """Tell the daemon that this process has closed every mapping it had of a version's GPU
    slabs (all files of the version), so that it no longer counts it as a holder.

    ``path``: a model folder on a weightfs mount (``MOUNT/NAME``, its symlink read once, or
    ``MOUNT/NAME@N``) or a file of the version. The ioctl goes to one file of the version,
    opened with ``O_DIRECT`` so the open does not wait for a pushed version's host image.
    Answers quietly when this process held nothing. Raises ``ModelGoneError`` (a
    ``FileNotFoundError``) or ``FileNotFoundError`` when the version is no longer on the mount,
    ``NotOnMountError`` for a folder that is no model on a weightfs mount, and
    :class:`ReleaseError` (a ``WeightfsError``) naming the file when the ioctl fails (``ENOTTY``:
    not a weightfs file, or a daemon too old for the ioctl).

    Call it only once no tensor of that version is left in this process (and the device has
    finished with them): the daemon may free the memory at once.
    """
    import fcntl

    p = os.fsdecode(os.fspath(path))
    target = _version_file(resolve_version(p).folder) if os.path.isdir(p) else p
    fd = open_direct(target)
    try:
        fcntl.ioctl(fd, IOCTL_RELEASE)
    except OSError as e:
        if e.errno in _NOT_WEIGHTFS:
            raise ReleaseError(f"{target}: the release ioctl was refused ({e.strerror}): not a "
                               "file of a weightfs mount, or the daemon predates it",
                               target, e.errno) from None
        raise ReleaseError(f"{target}: the release ioctl failed ({e.strerror})", target,
                           e.errno or 0) from None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# which versions update_model may release

Slab = Tuple[Optional[str], int, int, int]  # (version folder, device index, base pointer, bytes)


def slab_versions(slabs: Iterable[Slab], pointers: Iterable[Tuple[int, int]]) -> Set[str]:
    """The version folders of the slabs that some ``(device index, data pointer)`` falls in.

    ``slabs``: the slabs this process has open, ``(version, device, base, bytes)``; slabs with
    no known version (``None``) are ignored. A pointer counts for a slab on the same device with
    ``base <= pointer < base + bytes``.
    """
    by_dev: dict = {}
    for ver, dev, base, size in slabs:
        if ver is not None and size > 0:
            by_dev.setdefault(dev, []).append((base, base + size, ver))
    out: Set[str] = set()
    if not by_dev:
        return out
    for dev, ptr in pointers:
        for lo, hi, ver in by_dev.get(dev, ()):
            if lo <= ptr < hi:
                out.add(ver)
    return out


def releasable(candidates: Iterable[str], still_open: Iterable[Optional[str]],
               keep: Iterable[str] = ()) -> List[str]:
    """The candidate versions to release: those of which no slab is still open in this process
    (``still_open``: the versions of the slabs still open) and that are not in ``keep`` (the
    version just switched to). Sorted, for a stable order."""
    return sorted(set(candidates) - set(still_open) - set(keep))
