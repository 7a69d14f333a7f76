"""``weightfs.safe_open``: the interface of ``safetensors.safe_open``, zero-copy from the slabs.

Engines (vLLM's weights iterator, SGLang's loader, transformers) read checkpoints through
``safetensors.safe_open(path, framework="pt", device=...)``. The same interface here lets them
get zero-copy views of the daemon's GPU slab by changing one import (docs/ENGINES.md).

Opening, ``keys``, ``offset_keys``, ``metadata`` and ``get_slice(...).get_shape()/get_dtype()``
use only the standard library: the header is read once with the package's strict parser
(``read_header_direct``) and the ``user.weightfs.cuda`` record with ``read_cuda_manifest``.
torch is imported when the first tensor is asked for; only then is the source chosen, because
which GPUs the process sees is known only through torch:

* a replica on the requested GPU (``device`` None: any visible one, the current device first):
  each tensor is a view of the slab (``copy=True``: a private copy on that GPU), through the
  same machinery as :func:`weightfs.load_file`;
* otherwise the file is read: by ``safetensors.safe_open`` when installed, else by the
  standard-library reader (exact ``pread`` of the tensor's bytes, ``torch.frombuffer``), on
  ``device`` (``None``: CPU, as the reference's default ``"cpu"``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Union

from .errors import SafetensorError
from .manifest import (
    Header,
    Manifest,
    TensorInfo,
    _pread_exact,
    _rule_order,
    open_direct,
    read_cuda_manifest,
    read_header_direct,
)

if TYPE_CHECKING:  # torch stays optional: only type checkers import it here
    import torch

__all__ = ["safe_open", "SafeSlice", "FRAMEWORKS"]

#: The ``framework`` values accepted: the reference's spellings of PyTorch.
FRAMEWORKS = ("pt", "torch", "pytorch")

PathLike = Union[str, "os.PathLike[str]"]
Device = Union[None, int, str, "torch.device"]


class safe_open:  # noqa: N801 - the reference's name, so that a swapped import reads the same
    """Open a safetensors file lazily; tensors on demand, zero-copy from a GPU replica.

    ``safe_open(filename, framework="pt", device=None, copy=False)``, a context manager like
    ``safetensors.safe_open``. ``device``: ``None`` (a replica on any visible GPU, else CPU),
    ``"cpu"`` (always read the file), ``"cuda"``, ``"cuda:N"``, an index or a ``torch.device``
    (only a replica on that GPU counts; otherwise the file is read onto it). ``copy=True``:
    private device copies of the slab's tensors instead of views. ``manifest`` (keyword only)
    overrides the ``user.weightfs.cuda`` attribute, as :func:`weightfs.load_file`'s does.
    ``backend`` (keyword only; newer safetensors releases take it and transformers passes it)
    is handed to ``safetensors.safe_open`` when the file is read by it, and has no effect on
    zero-copy views.

    The symlink ``MOUNT/NAME`` is resolved once and the file held open until :meth:`close`, so
    every tensor comes from one version. Views share the daemon's memory: treat them as
    read-only (docs/PROTOCOL.md §5).
    """

    def __init__(self, filename: PathLike, framework: str = "pt", device: Device = None,
                 copy: bool = False, *, manifest: Optional[Manifest] = None,
                 backend: Optional[str] = None):
        self._where = os.fsdecode(os.fspath(filename))
        if framework not in FRAMEWORKS:
            raise SafetensorError(
                f"{self._where}: framework {framework!r} is not supported by weightfs.safe_open "
                f"(it serves torch tensors: one of {', '.join(FRAMEWORKS)}); use "
                "safetensors.safe_open for numpy, tensorflow, flax or mlx")
        self._device = device
        self._copy = bool(copy)
        self._backend = backend
        self._real = os.path.realpath(os.fspath(filename))
        self._fd: Optional[int] = open_direct(self._real)
        try:
            self._header: Header = read_header_direct(self._fd, path=self._where)
            self._manifest: Optional[Manifest] = manifest
            self._manifest_error = ""
            if manifest is None:
                try:
                    self._manifest = read_cuda_manifest(self._fd)
                except PermissionError as e:  # the daemon refuses the handles to this user
                    self._manifest_error = e.strerror or str(e)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        self._src: Optional[_Source] = None

    # -- the reference's interface ---------------------------------------------------------

    def __enter__(self) -> "safe_open":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def keys(self) -> List[str]:
        """Tensor names, sorted (the reference sorts them too)."""
        return sorted(self._open().tensors)

    def offset_keys(self) -> List[str]:
        """Tensor names in the order of their data offsets (the reference's ``offset_keys``):
        reading them in this order reads the file front to back. Ties (zero-size tensors) are
        broken by end offset, then name, as the slab layout rule does."""
        return [t.name for t in sorted(self._open().tensors.values(), key=_rule_order)]

    def metadata(self) -> Optional[Dict[str, str]]:
        """The header's ``__metadata__`` (a new dict), or None when the file has none."""
        md = self._open().metadata
        return None if md is None else dict(md)

    def get_tensor(self, name: str) -> "torch.Tensor":
        """The tensor ``name``; ``SafetensorError`` when the file has no such tensor."""
        info = self._info(name)
        return self._source().tensor(info)

    def get_slice(self, name: str) -> "SafeSlice":
        """A lazy handle on tensor ``name``: ``get_shape()``, ``get_dtype()`` without torch,
        ``[...]`` for part of it."""
        return SafeSlice(self, self._info(name))

    # -- beyond the reference --------------------------------------------------------------

    def close(self) -> None:
        """Drop the file and the source; idempotent. With ``copy=True`` the version the copies
        came from is released (docs/PROTOCOL.md §3.1) once no slab of it is open here."""
        src, self._src = self._src, None
        if src is not None:
            src.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def header(self) -> Header:
        """The parsed header (dtypes, shapes, data offsets of every tensor)."""
        return self._open()

    @property
    def zero_copy(self) -> bool:
        """Whether tensors are views of a GPU slab: a replica is used and ``copy`` is False
        (chooses the source: imports torch)."""
        return isinstance(self._source(), _SlabSource) and not self._copy

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:  # not closed by a with block: at least give the descriptor back
            os.close(fd)

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else f"{len(self._header.tensors)} tensors"
        return f"weightfs.safe_open({self._where!r}, {state})"

    # -- internals -------------------------------------------------------------------------

    def _open(self) -> Header:
        if self._fd is None:
            raise SafetensorError(f"{self._where}: File is closed")
        return self._header

    def _info(self, name: str) -> TensorInfo:
        info = self._open().tensors.get(name)
        if info is None:
            raise SafetensorError(f"File does not contain tensor {name} ({self._where})")
        return info

    def _source(self) -> "_Source":
        self._open()
        if self._src is None:
            self._src = self._choose()
        return self._src

    def _choose(self) -> "_Source":
        from . import torch_loader as tl

        tl._torch()
        target = tl._normalize_device(self._device)
        if self._manifest is not None and (target is None or target.type == "cuda"):
            man = tl._with_path(self._manifest, self._where)
            slab = tl._slab_for(self._header, man, target, self._where, False,
                                os.path.dirname(self._real), stacklevel=5)
            if slab is not None:
                return _SlabSource(*slab, self._copy, os.path.dirname(self._real), self._where)
        elif self._manifest_error:
            tl.log.info("%s: the daemon refused the GPU handles (%s); reading the file",
                        self._where, self._manifest_error)
        dev = "cpu" if target is None else str(target)
        try:
            from safetensors import safe_open as st_open
        except ImportError:
            return _ReadSource(self._fd, self._header, dev, self._where)
        extra = {} if self._backend is None else {"backend": self._backend}
        return _LibSource(st_open(self._real, framework="pt", device=dev, **extra))


class SafeSlice:
    """What ``get_slice`` returns, as the reference's ``PySafeSlice``: the shape and dtype of
    the whole tensor, and ``[...]`` (ints, slices, Ellipsis, ``None``: whatever torch indexing
    takes, as the reference applies it to the whole tensor) for part of it."""

    def __init__(self, owner: safe_open, info: TensorInfo):
        self._owner = owner
        self._info = info

    def get_shape(self) -> List[int]:
        """The whole tensor's shape, a list as the reference returns it."""
        return list(self._info.shape)

    def get_dtype(self) -> str:
        """The safetensors dtype string (``"BF16"``, ``"F8_E4M3"``, ``"BOOL"``, …)."""
        return self._info.dtype

    def __getitem__(self, index: Any) -> "torch.Tensor":
        return self._owner._source().slice(self._info, index)

    def __repr__(self) -> str:
        return f"SafeSlice({self._info.name!r}, {self._info.dtype}, {list(self._info.shape)})"


class _Source:
    """Where tensors come from once torch is there: a slab, the safetensors library, or the
    file read by the standard library."""

    def tensor(self, info: TensorInfo):
        raise NotImplementedError

    def slice(self, info: TensorInfo, index: Any):
        return self.tensor(info)[index]

    def close(self) -> None:
        pass


class _SlabSource(_Source):
    def __init__(self, storage, device, layout, copy: bool, version: str, where: str):
        self.storage, self.device, self.layout = storage, device, layout
        self.copy, self.version, self.where = copy, version, where

    def _view(self, info: TensorInfo):
        from .torch_loader import _slab_view

        return _slab_view(self.storage, self.device, self.layout[info.name], info.name,
                          self.where)

    def tensor(self, info: TensorInfo):
        t = self._view(info)
        return t.clone() if self.copy else t

    def slice(self, info: TensorInfo, index: Any):
        t = self._view(info)[index]
        return t.clone() if self.copy else t

    def close(self) -> None:
        from . import torch_loader as tl

        self.storage = None
        if self.copy:  # the copies are private: this process need not hold the version
            tl._torch().cuda.synchronize(self.device)
            tl._release_closed([self.version])


class _LibSource(_Source):
    def __init__(self, f):
        self.f = f

    def tensor(self, info: TensorInfo):
        return self.f.get_tensor(info.name)

    def slice(self, info: TensorInfo, index: Any):
        return self.f.get_slice(info.name)[index]

    def close(self) -> None:
        self.f.__exit__(None, None, None)


class _ReadSource(_Source):
    def __init__(self, fd: int, header: Header, device: str, where: str):
        self.fd, self.header, self.device, self.where = fd, header, device, where

    def tensor(self, info: TensorInfo):
        from .torch_loader import _torch, torch_dtype

        torch = _torch()
        dt = torch_dtype(info.dtype)
        if info.numel == 0:
            return torch.zeros(info.shape, dtype=dt, device=self.device)
        raw = bytearray(_pread_exact(self.fd, info.nbytes, self.header.data_offset + info.begin))
        if len(raw) != info.nbytes:
            raise SafetensorError(f"{self.where}: file ends inside tensor {info.name} "
                                  f"({len(raw)} of {info.nbytes} bytes)")
        t = torch.frombuffer(raw, dtype=torch.uint8).view(dt).reshape(info.shape)
        return t if self.device == "cpu" else t.to(self.device)

