"""weightfs: load model weights from a weightfs mount, zero-copy from GPU memory when the daemon
holds them there.

``weightfs.manifest`` (header parsing, slab layout, the ``user.weightfs.cuda`` record) needs only
the standard library. ``safe_open`` has the interface of ``safetensors.safe_open`` (what engines
call) and serves zero-copy views of the slabs; it imports torch at the first tensor.
``load_file``, ``state_dict``, ``load_model_folder`` and ``gpu_pointer_ranges`` import torch
when called (``load_model`` is its deprecated spelling). ``wait_version`` and ``watch`` (stdlib) hear of a model's new versions;
``update_model`` (torch) switches a loaded model to one in place, ``resolve_version`` (stdlib)
tells which version folder a path names.

Long-lived engines: the daemon counts a process that opened a version's GPU handles as a holder
of that version and frees a version that left the mount only once no live process holds it.
``update_model`` therefore releases (docs/PROTOCOL.md §3.1) the version it copied from
(``copy=True``) or rebound away from (``copy=False``) once no slab of it is left open in the
process; ``release(folder)`` (stdlib) does it by hand, for tensors of ``load_file`` or
``state_dict`` the caller has dropped. The loaders read headers with ``O_DIRECT``
(``read_header_direct``), so a version just pushed is mapped without waiting for its host image
to fill from the GPU.

``push`` and ``Push`` (stdlib; torch only for torch tensors) write a new version of a model from
a trainer's memory through the control socket (docs/PROTOCOL.md §8): CUDA tensors straight into
the daemon's staged GPU slabs, CPU bytes through a shared scratch; the version becomes visible
atomically at the commit, and nothing does on any failure. The pusher drops its mappings of the
staged slabs before the commit and says so (``released``), so it holds no version it pushed. The daemon's refusals raise
``PushError`` (a ``DaemonError``, a ``WeightfsError``) with its ``code`` and ``message``.
"""

from .manifest import (
    DEFAULT_ALIGN,
    HEADER_ERROR_CLASSES,
    IPC_HANDLE_SIZE,
    TORCH_DTYPE_NAMES,
    XATTR_CUDA,
    Header,
    HeaderError,
    Manifest,
    ManifestError,
    Replica,
    SlabEntry,
    TensorInfo,
    UnsupportedDtypeError,
    parse_cuda_manifest,
    parse_header,
    read_cuda_manifest,
    open_direct,
    read_header,
    read_header_direct,
    slab_end,
    slab_layout,
    slab_size,
    torch_dtype_name,
)
from ._version import __version__
from .errors import (
    DaemonError,
    DaemonUnreachableError,
    NoReplicaError,
    SafetensorError,
    WeightfsError,
)
from .safeopen import SafeSlice, safe_open
from .push import Push, PushError, default_socket, push
from .handles import ReleaseError, release
from .update import ModelMismatchError
from .versions import (
    ModelGoneError,
    ModelVersion,
    NotOnMountError,
    resolve_version,
    split_model_path,
    wait_version,
    watch,
)
from .torch_loader import (
    gpu_pointer_ranges,
    load_file,
    load_model,
    load_model_folder,
    state_dict,
    torch_dtype,
    update_model,
)

__all__ = [
    "DEFAULT_ALIGN",
    "HEADER_ERROR_CLASSES",
    "IPC_HANDLE_SIZE",
    "TORCH_DTYPE_NAMES",
    "XATTR_CUDA",
    "Header",
    "HeaderError",
    "Manifest",
    "ManifestError",
    "DaemonError",
    "DaemonUnreachableError",
    "ModelGoneError",
    "ModelMismatchError",
    "ModelVersion",
    "NotOnMountError",
    "Push",
    "PushError",
    "Replica",
    "SlabEntry",
    "TensorInfo",
    "UnsupportedDtypeError",
    "WeightfsError",
    "default_socket",
    "gpu_pointer_ranges",
    "load_file",
    "load_model",
    "load_model_folder",
    "NoReplicaError",
    "SafeSlice",
    "SafetensorError",
    "safe_open",
    "parse_cuda_manifest",
    "parse_header",
    "push",
    "read_cuda_manifest",
    "open_direct",
    "read_header",
    "read_header_direct",
    "release",
    "ReleaseError",
    "resolve_version",
    "slab_end",
    "slab_layout",
    "slab_size",
    "split_model_path",
    "state_dict",
    "torch_dtype",
    "torch_dtype_name",
    "update_model",
    "wait_version",
    "watch",
    "__version__",
]
