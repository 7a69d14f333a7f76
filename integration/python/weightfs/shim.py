"""Drop-in replacements with the reference's signatures, for swapping into an engine's loader.

``safetensors.safe_open(filename, framework, device="cpu")`` and
``safetensors.torch.load_file(filename, device="cpu")`` default to the CPU, and engines pass
``device="cpu"`` explicitly (transformers does for every shard, even with ``device_map`` on a
GPU). Here ``"cpu"`` means "wherever the daemon has a replica" (``device=None`` of
:func:`weightfs.safe_open` and :func:`weightfs.load_file`): the GPU slab's views when a visible
GPU holds one, the file read onto the CPU otherwise. Any other device is passed on as given. A
loader then gets GPU tensors where it asked for CPU ones; loaders that copy into their own
parameters (``param.copy_(t)``, ``.to(device)``) accept both (docs/ENGINES.md).

    from transformers import modeling_utils
    from weightfs import shim
    modeling_utils.safe_open = shim.safe_open
    modeling_utils.safe_load_file = shim.load_file
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from .safeopen import Device, PathLike
from .safeopen import safe_open as _safe_open

if TYPE_CHECKING:
    import torch

__all__ = ["safe_open", "load_file"]


def _replica_first(device: Device) -> Device:
    return None if device is None or device == "cpu" else device


def safe_open(filename: PathLike, framework: str = "pt", device: Device = "cpu",
              **kwargs: Any) -> _safe_open:
    """``safetensors.safe_open``'s signature; ``"cpu"`` (its default) takes a replica first.
    Keywords (``backend``, ``copy``, ``manifest``) go to :func:`weightfs.safe_open`."""
    return _safe_open(filename, framework, device=_replica_first(device), **kwargs)


def load_file(filename: PathLike, device: Device = "cpu") -> Dict[str, "torch.Tensor"]:
    """``safetensors.torch.load_file``'s signature; ``"cpu"`` (its default) takes a replica
    first."""
    from . import load_file as _load_file

    return _load_file(filename, device=_replica_first(device))
