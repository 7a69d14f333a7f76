"""Load weights from a weightfs mount into torch, zero-copy when they are already on a GPU.

torch is imported inside the functions that need it, so this module imports without torch.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
import warnings
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple, TypeVar, Union

if TYPE_CHECKING:  # torch stays optional: only type checkers import it here
    import torch

from .manifest import (
    XATTR_CUDA,
    Header,
    Manifest,
    ManifestError,
    Replica,
    SlabEntry,
    normalize_gpu_uuid,
    open_direct,
    read_cuda_manifest,
    read_header,
    read_header_direct,
    torch_dtype_name,
)
from .errors import NoReplicaError, WeightfsError
from .handles import releasable, release, slab_versions
from .update import ModelMismatchError, plan_update
from .versions import resolve_version

#: What the loaders accept as a file or folder name.
PathLike = Union[str, "os.PathLike[str]"]
#: A device as torch spells it (``"cuda:0"``, ``torch.device``, an index), or None.
Device = Union[None, int, str, "torch.device"]
ModuleT = TypeVar("ModuleT", bound="torch.nn.Module")

__all__ = ["load_file", "state_dict", "load_model_folder", "load_model", "update_model",
           "gpu_pointer_ranges", "torch_dtype"]

log = logging.getLogger("weightfs")

_PREFER = ("auto", "ipc", "read")


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised on machines without torch
        raise ImportError("weightfs.load_file and friends need PyTorch (pip install torch); "
                          "weightfs.manifest works without it") from e
    return torch


def torch_dtype(st_dtype: str) -> "torch.dtype":
    """The torch dtype for a safetensors dtype string (``"BF16"`` -> ``torch.bfloat16``)."""
    torch = _torch()
    name = torch_dtype_name(st_dtype)
    dt = getattr(torch, name, None)
    if dt is None:
        raise TypeError(f"safetensors dtype {st_dtype} needs torch.{name}, which torch "
                        f"{torch.__version__} does not have; upgrade torch")
    return dt


# --------------------------------------------------------------------------------------------
# devices


def _normalize_device(device: Any):
    """None -> None; 3, "cuda", "cuda:1", torch.device -> torch.device with an index for CUDA."""
    if device is None:
        return None
    torch = _torch()
    if isinstance(device, int) and not isinstance(device, bool):
        dev = torch.device("cuda", device)
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


_visible_lock = threading.Lock()
_visible: dict[str, int] | None = None


def _visible_gpus() -> dict[str, int]:
    """UUID (lower case, no ``GPU-``) -> device index, for the GPUs this process sees."""
    global _visible
    with _visible_lock:
        if _visible is None:
            torch = _torch()
            found: dict[str, int] = {}
            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    found[normalize_gpu_uuid(str(torch.cuda.get_device_properties(i).uuid))] = i
            _visible = found
        return dict(_visible)


def _pick_replica(man: Manifest, target) -> tuple[Replica, int] | None:
    """The replica to use for ``target`` (None: any visible, the current device first)."""
    reps = man.replicas
    if not reps:
        return None
    visible = _visible_gpus()
    cands = [(r, visible[r.uuid]) for r in reps if r.uuid in visible]
    if target is not None:
        cands = [(r, i) for r, i in cands if i == target.index]
    if not cands:
        return None
    if target is None and len(cands) > 1:
        cur = _torch().cuda.current_device()
        for r, i in cands:
            if i == cur:
                return r, i
    return cands[0]


# --------------------------------------------------------------------------------------------
# slab cache: one open per slab and process; closed with its last storage


class _SlabRef:
    """A weak reference to an opened slab's storage, with what the release bookkeeping needs:
    the version folder the slab belongs to (None when unknown: a push's staged slab) and its
    device and base pointer (fixed while the mapping lives)."""

    def __init__(self, storage, uuid: str, gpu: str, dev: int, slab_bytes: int,
                 version: str | None = None):
        self.uuid = uuid
        self.gpu = gpu
        self.dev = dev
        self.slab_bytes = slab_bytes
        self.version = version
        self.ptr = storage.data_ptr()
        self._strong = None
        self._weak = None
        try:
            from torch.multiprocessing.reductions import StorageWeakRef

            self._weak = StorageWeakRef(storage)
        except Exception:  # private API moved: keep the slab open for the process's life
            self._strong = storage

    def alive(self) -> bool:
        """Whether the storage (so the mapping) is still there, without taking a reference."""
        if self._strong is not None:
            return True
        return self._weak is not None and not self._weak.expired()

    def get(self):
        if self._strong is not None:
            return self._strong
        if self._weak is None or self._weak.expired():
            return None
        torch = _torch()
        try:
            return torch.UntypedStorage._new_with_weak_ptr(self._weak.cdata)
        except Exception:
            return None


_slab_lock = threading.Lock()
_slabs: dict[tuple[str, bytes], _SlabRef] = {}


def _open_slab(replica: Replica, dev: int, version: str | None = None):
    """The storage of a slab, opened once per process; ``version``: the version folder it
    belongs to (``os.path.realpath`` of ``MOUNT/NAME@N``), recorded for :func:`update_model`'s
    release bookkeeping."""
    torch = _torch()
    key = (replica.uuid, replica.handle)
    with _slab_lock:
        ref = _slabs.get(key)
        st = ref.get() if ref is not None else None
        if st is not None:
            if ref.version is None:
                ref.version = version
            return st
        torch.cuda._lazy_init()
        with torch.cuda.device(dev):
            st = torch.UntypedStorage._new_shared_cuda(
                dev, replica.handle, replica.slab_bytes, 0, b"", 0, bytes(64), False)
        _slabs[key] = _SlabRef(st, replica.uuid, replica.gpu, dev, replica.slab_bytes, version)
        return st


def _open_slabs() -> list[tuple[str | None, int, int, int]]:
    """``(version, device, base, bytes)`` of every slab still open in this process; entries of
    closed slabs are dropped from the cache."""
    out = []
    with _slab_lock:
        for key, ref in list(_slabs.items()):
            if ref.alive():
                out.append((ref.version, ref.dev, ref.ptr, ref.slab_bytes))
            else:
                del _slabs[key]
    return out


def _slabs_closed(keys: Iterable[tuple[str, bytes]]) -> bool:
    """Whether every slab of ``keys`` (cache keys) is closed (or was never opened)."""
    with _slab_lock:
        return not any(k in _slabs and _slabs[k].alive() for k in keys)


def _cuda_pointers(tensors: Iterable[Any]) -> list[tuple[int, int]]:
    """``(device index, data pointer)`` of the CUDA tensors with elements."""
    return [(t.device.index, t.data_ptr()) for t in tensors
            if getattr(t, "is_cuda", False) and not t.is_meta and t.numel()]


def _release_closed(candidates: Iterable[str], keep: Iterable[str] = ()) -> list[str]:
    """Release (PROTOCOL §3.1) the candidate versions of which no slab is open any more in this
    process; the versions released.

    The caller has dropped its references and synchronized the devices. A slab whose last
    tensor is gone is unmapped at once by torch (reference counting); one that is still open
    may be kept alive by a reference cycle (a tensor captured by a cyclic structure, an
    exception's traceback), which only the cycle collector frees: ``gc.collect()`` runs, once,
    only in that case, before the check that decides.
    """
    cands = set(candidates) - set(keep)
    if not cands:
        return []
    todo = releasable(cands, (v for v, _, _, _ in _open_slabs()), keep)
    if len(todo) < len(cands):
        gc.collect()
        todo = releasable(cands, (v for v, _, _, _ in _open_slabs()), keep)
    done = []
    for ver in todo:
        try:
            release(ver)
            done.append(ver)
        except FileNotFoundError as e:  # the version already left the mount: nothing to tell
            log.debug("release %s: %s", ver, e)
        except (OSError, ValueError, WeightfsError) as e:
            log.warning("release %s: %s; the daemon still counts this process as a holder of "
                        "that version", ver, e)
    return done


def gpu_pointer_ranges(path_or_manifest: Union[None, PathLike, Manifest] = None
                       ) -> List[Tuple[str, int, int]]:
    """``(gpu, base_ptr, slab_bytes)`` for the slabs this process has open.

    With a path (or a :class:`Manifest`), only the slabs of that file; with no argument, every
    open slab. ``gpu`` is the replica's ``GPU-<uuid>`` as the manifest spells it. A tensor that
    :func:`load_file` returned zero-copy has ``base_ptr <= t.data_ptr() < base_ptr + slab_bytes``.
    """
    keys = None
    if path_or_manifest is not None:
        man = (path_or_manifest if isinstance(path_or_manifest, Manifest)
               else read_cuda_manifest(path_or_manifest))
        keys = set() if man is None else {(r.uuid, r.handle) for r in man.replicas}
    out = []
    with _slab_lock:
        for key, ref in list(_slabs.items()):
            if keys is not None and key not in keys:
                continue
            st = ref.get()
            if st is None:
                del _slabs[key]
                continue
            out.append((ref.gpu, st.data_ptr(), ref.slab_bytes))
    return out


# --------------------------------------------------------------------------------------------
# load_file


def load_file(path: PathLike, device: Device = None, copy: bool = False, *,
              prefer: str = "auto",
              manifest: Optional[Manifest] = None) -> Dict[str, "torch.Tensor"]:
    """Load a safetensors file into a ``{name: torch.Tensor}`` dict.

    When the file has a GPU replica (``user.weightfs.cuda``) on a GPU this process sees, matched
    by UUID, and ``device`` is None or that GPU, the tensors are zero-copy views of the daemon's
    slab (``copy=True``: private device-to-device copies of them). Otherwise the file is read:
    ``safetensors.torch.load_file`` when installed, else a standard-library parser and
    ``torch.frombuffer``; ``device=None`` then means CPU.

    ``prefer``: ``"auto"`` as above; ``"ipc"`` raises when no usable replica exists;
    ``"read"`` never looks at the replicas. ``manifest`` overrides the extended attribute (for
    callers that fetched the record by ioctl).

    The header is read with ``O_DIRECT`` and exact ``pread`` ranges (``read_header_direct``),
    so a version just pushed is mapped at once, without waiting for its host image to fill
    from the GPU (docs/PROTOCOL.md §8); only the fallback that reads the tensors waits.
    """
    if prefer not in _PREFER:
        raise ValueError(f"prefer must be one of {_PREFER}, got {prefer!r}")
    torch = _torch()
    target = _normalize_device(device)
    where = os.fsdecode(os.fspath(path))

    if prefer != "read":
        if target is not None and target.type != "cuda":
            if prefer == "ipc":
                raise ValueError(f"{where}: prefer='ipc' needs a CUDA device, got {target}")
        else:
            # The symlink MOUNT/NAME is resolved once: the descriptor, the handles and the
            # version recorded for the slab are of one version.
            real = os.path.realpath(os.fspath(path))
            fd = open_direct(real)
            try:
                header = read_header_direct(fd, path=where)
                man, why = manifest, ""
                if man is None:
                    try:
                        man = read_cuda_manifest(fd)
                    except PermissionError as e:
                        why = f"the daemon refused the GPU handles ({e.strerror})"
                        if prefer == "ipc":
                            raise PermissionError(e.errno, f"{where}: {why}") from None
                        log.info("%s: %s; reading the file", where, why)
                if man is not None:
                    man = _with_path(man, where)
                    out = _load_ipc(header, man, target, copy, where, prefer == "ipc",
                                    os.path.dirname(os.fsdecode(real)))
                    if out is not None:
                        return out
                elif prefer == "ipc":
                    raise NoReplicaError(f"{where}: no GPU replica (no {XATTR_CUDA} attribute); "
                                       "is the model loaded with --gpu?")
            finally:
                os.close(fd)
    return _load_read(path, target, where)


def _with_path(man: Manifest, where: str) -> Manifest:
    if man.path is not None:
        return man
    return Manifest(man.schema, man.file_size, man.data_offset, man.align, man.replicas, where,
                    man.extra)


def _load_ipc(header: Header, man: Manifest, target, copy: bool, where: str, must: bool,
              version: str | None = None):
    torch = _torch()
    slab = _slab_for(header, man, target, where, must, version, stacklevel=4)
    if slab is None:
        return None
    storage, device, layout = slab
    out = {}
    for name in header.tensors:  # the file's order
        t = _slab_view(storage, device, layout[name], name, where)
        out[name] = t.clone() if copy else t
    if copy:
        # The private copies are done before the slab may close; then this process maps no
        # slab of the version for this file, and says so unless another load still does
        # (PROTOCOL §3.1): a long-lived process does not keep the version it copied from.
        torch.cuda.synchronize(device)
        del storage, t, slab
        if version is not None:
            _release_closed([version])
    return out


def _slab_for(header: Header, man: Manifest, target, where: str, must: bool,
              version: str | None = None, stacklevel: int = 3):
    """``(storage, device, layout)`` of the replica of ``man`` to use for ``target`` (None:
    any visible GPU), or None when there is none to use (``must``: raise instead). Shared by
    :func:`load_file` and :class:`weightfs.safe_open`, so both pick and check slabs alike."""
    torch = _torch()
    picked = _pick_replica(man, target)
    if picked is None:
        msg = (f"{where}: no GPU replica on a visible GPU"
               + (f" matching {target}" if target is not None else "")
               + f" (replicas on {[r.gpu for r in man.replicas] or 'no GPU'}; this process "
               f"sees {sorted(_visible_gpus()) or 'no GPU'}; check CUDA_VISIBLE_DEVICES)")
        if must:
            raise NoReplicaError(msg)
        log.info("%s; reading the file", msg)
        return None
    replica, dev = picked
    try:
        layout = man.layout(header)
    except ManifestError:
        if must:
            raise
        warnings.warn(f"{where}: GPU manifest does not match the file; reading the file instead",
                      RuntimeWarning, stacklevel=stacklevel)
        return None
    return _open_slab(replica, dev, version), torch.device("cuda", dev), layout


def _slab_view(storage, device, e: SlabEntry, name: str, where: str):
    """The zero-copy tensor of slab entry ``e`` (a fresh empty tensor when it has no
    elements: a zero-size tensor occupies no bytes of the slab)."""
    torch = _torch()
    dt = torch_dtype(e.dtype)
    numel = 1
    for d in e.shape:
        numel *= d
    if numel == 0:
        return torch.empty(e.shape, dtype=dt, device=device)
    itemsize = dt.itemsize
    if e.offset % itemsize:
        raise ManifestError(f"{where}: slab offset {e.offset} of {name!r} is not a multiple "
                            f"of {itemsize}")
    return torch.empty(0, dtype=dt, device=device).set_(storage, e.offset // itemsize, e.shape)


def _load_read(path, target, where: str) -> dict:
    dev = "cpu" if target is None else str(target)
    try:
        from safetensors.torch import load_file as st_load
    except ImportError:
        st_load = None
    if st_load is not None:
        return st_load(path, device=dev)
    return _load_stdlib(path, dev)


def _load_stdlib(path, device: str = "cpu") -> dict:
    """Read a safetensors file with the standard-library parser and torch.frombuffer."""
    torch = _torch()
    with open(path, "rb") as f:
        header = read_header(f)
        f.seek(header.data_offset)
        buf = bytearray(header.data_size)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"{os.fsdecode(os.fspath(path))}: file ends inside the data")
            got += n
    out = {}
    for name, t in header.tensors.items():
        dt = torch_dtype(t.dtype)
        if t.numel == 0:
            x = torch.empty(t.shape, dtype=dt)
        else:
            x = torch.frombuffer(buf, dtype=torch.uint8, count=t.nbytes, offset=t.begin)
            if x.data_ptr() % dt.itemsize:
                x = x.clone()  # misaligned for its dtype: give it its own (aligned) storage
            x = x.view(dt).reshape(t.shape)
        if device != "cpu":
            x = x.to(device)
        out[name] = x
    return out


# --------------------------------------------------------------------------------------------
# folders and models


def _weight_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    return [os.path.join(folder, n) for n in names]


def state_dict(folder: PathLike, device: Device = None, copy: bool = False, *,
               prefer: str = "auto") -> Dict[str, "torch.Tensor"]:
    """Merged ``{name: tensor}`` of every weights file of a model folder (the files listed in
    ``model.safetensors.index.json`` when present, else every ``*.safetensors``). The folder's
    symlink (``qwen3-8b`` -> ``qwen3-8b@2``) is resolved once, so all files come from one
    version."""
    folder = os.path.realpath(os.fspath(folder))
    if os.path.isfile(folder):
        return load_file(folder, device, copy, prefer=prefer)
    merged: dict = {}
    for p in _weight_files(folder):
        part = load_file(p, device, copy, prefer=prefer)
        dup = merged.keys() & part.keys()
        if dup:
            raise ValueError(f"{p}: tensors also in an earlier file: {sorted(dup)[:5]}")
        merged.update(part)
    return merged


def load_model(model: ModuleT, folder: PathLike, device: Device = None, copy: bool = False,
               strict: bool = True, *, prefer: str = "auto") -> ModuleT:
    """Deprecated spelling of :func:`load_model_folder` (same arguments, same result).

    ``safetensors.torch.load_model(model, filename, strict=True, device="cpu")`` takes one file
    and returns ``(missing, unexpected)``; ours takes a folder and returns the model. Sharing
    the name invited calls with the other's arguments, so ours is now ``load_model_folder``.
    """
    warnings.warn("weightfs.load_model is deprecated: use weightfs.load_model_folder (same "
                  "arguments; the name differs from safetensors.torch.load_model, which takes "
                  "one file and returns (missing, unexpected))", DeprecationWarning, stacklevel=2)
    return load_model_folder(model, folder, device, copy, strict, prefer=prefer)


def load_model_folder(model: ModuleT, folder: PathLike, device: Device = None,
                      copy: bool = False, strict: bool = True, *,
                      prefer: str = "auto") -> ModuleT:
    """Assign the weights of a model folder into ``model`` (a ``torch.nn.Module``, typically
    built on the meta device) with ``load_state_dict(assign=True)``; returns ``model``.

    Keys absent from the checkpoint that the model ties to loaded ones (``lm_head.weight`` with
    tied embeddings) are filled by ``model.tie_weights()``. Non-persistent rotary buffers
    (``inv_freq``) left on the meta device are recomputed on the weights' device by building the
    rotary module again. With ``strict``, keys still missing or unexpected raise
    ``ModelMismatchError`` (a ``RuntimeError``);
    other tensors left on the meta device draw a RuntimeWarning.
    """
    state = state_dict(folder, device, copy, prefer=prefer)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = list(result.missing_keys)
    unexpected = list(result.unexpected_keys)
    if missing and callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
        loaded = {v.data_ptr() for v in state.values() if v.numel()}
        now = model.state_dict(keep_vars=True)
        missing = [k for k in missing
                   if not (k in now and not now[k].is_meta and now[k].data_ptr() in loaded)]
    target = next((v.device for v in state.values()), None)
    if target is not None:
        _materialize_meta_buffers(model, target)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        raise ModelMismatchError(f"{folder}: checkpoint does not match the model: "
                                 + "; ".join(parts), missing, unexpected)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        warnings.warn(f"{folder}: tensors still on the meta device after loading: {_short(left)}",
                      RuntimeWarning, stacklevel=2)
    return model


def update_model(model: "torch.nn.Module", folder: PathLike, copy: bool = True,
                 strict: bool = True, *, prefer: str = "auto") -> int:
    """Switch a built, loaded ``model`` to the weights of a weightfs version; returns its number.

    ``folder`` is ``MOUNT/NAME`` (the symlink, read once: one version even if a commit lands
    meanwhile) or ``MOUNT/NAME@N``. Every tensor of that version folder is opened zero-copy (read
    from the mount where no replica is visible), then every name, dtype and shape is checked
    against ``model.state_dict(keep_vars=True)`` (tied weights count once) before anything is
    touched: ``ModelMismatchError`` (a RuntimeError) names the mismatches. The headers are read
    with ``O_DIRECT``, so a version just pushed is switched to at once (its host image may still
    be filling from the GPU).

    ``copy=True``: device-to-device copies into the existing parameters and persistent buffers,
    so every ``data_ptr()`` stays the same and captured CUDA graphs stay valid; returns after
    ``torch.cuda.synchronize`` on the devices involved. Refused (before touching anything) when a
    target tensor is itself a view of a weightfs slab (a model loaded with ``copy=False``): the
    copy would write into the daemon's old version, which other processes read. The slab views
    of the version copied from are then dropped, and that version is released (PROTOCOL §3.1)
    unless a slab of it is still open in this process.
    ``copy=False``: each parameter's ``.data`` (and each buffer, in its module) is rebound to the
    zero-copy view of the new version's slab on the model's GPU; the views keep their slabs
    mapped. The version(s) the model's tensors pointed into before are released once no slab of
    them is left open in this process (the model's old tensors were their last references,
    unless the caller keeps others).
    ``strict=False`` skips names missing on either side; dtype and shape must still match.
    Non-persistent buffers (rotary ``inv_freq``) are not in checkpoints and are left alone.

    Releasing lets the daemon free versions that left the mount, so a long-lived engine that
    calls this every step does not keep every version it ever mapped. It is best effort: a
    version already gone from the mount is skipped (logged at debug), another failure is logged
    as a warning and does not fail the switch.
    """
    torch = _torch()
    ver = resolve_version(folder)
    where = ver.folder
    targets = model.state_dict(keep_vars=True)
    meta = [n for n, t in targets.items() if t.is_meta]
    if meta:
        raise ModelMismatchError(f"{where}: tensors on the meta device ({_short(meta)}): "
                                 "update_model switches a loaded model; use load_model_folder "
                                 "first")
    if copy:
        ranges = [(b, b + size) for _, b, size in gpu_pointer_ranges()]
        shared = [n for n, t in targets.items()
                  if t.is_cuda and t.numel() and any(lo <= t.data_ptr() < hi for lo, hi in ranges)]
        if shared:
            raise ModelMismatchError(
                f"{where}: {len(shared)} tensors of the model are zero-copy views of a weightfs "
                f"slab ({_short(shared)}); copying into them would change the daemon's version "
                "for every reader. Use copy=False, or load the model with copy=True first")
    devices = {t.device for t in targets.values() if not t.is_meta}
    one = next(iter(devices)) if len(devices) == 1 else None
    if one is not None and one.type == "cuda":
        with torch.cuda.device(one):  # load_file prefers the current device's replica
            state = state_dict(where, None if copy else one, copy=False, prefer=prefer)
    else:
        state = state_dict(where, None if copy else one, copy=False, prefer=prefer)

    def tie(t):
        if t.is_meta or not t.numel():
            return ("id", id(t))
        return (str(t.device), t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))

    names = plan_update({n: (t.dtype, tuple(t.shape), tie(t)) for n, t in targets.items()},
                        {n: (t.dtype, tuple(t.shape)) for n, t in state.items()},
                        strict=strict, where=where)
    slabs = _open_slabs()
    new = slab_versions(slabs, _cuda_pointers(state.values()))  # the version switched to
    if copy:
        cuda = _copy_into(targets, state, names)
        candidates, keep = new, set()
    else:
        old = slab_versions(slabs, _cuda_pointers(targets.values()))  # before rebinding
        old_devs = {d for v, d, _, _ in slabs if v in old and v not in new}
        for d in sorted(old_devs):  # nothing queued still reads the old slabs when they close
            torch.cuda.synchronize(d)
        cuda = _rebind(model, targets, state, names) | old_devs
        candidates, keep = old, new | {os.path.realpath(where)}
    for i in sorted(cuda):  # the copies are done before `state` (the slab views) may go
        torch.cuda.synchronize(i)
    # Drop this frame's references to slab views (copy=True: `state`, the version copied from;
    # copy=False: `targets`, which holds the model's old buffers) before deciding what is closed.
    del targets, state, slabs
    released = _release_closed(candidates, keep)
    log.info("%s: %s %d tensors of version %d%s", model.__class__.__name__,
             "copied" if copy else "rebound", len(names), ver.number,
             f"; released {', '.join(released)}" if released else "")
    return ver.number


def _copy_into(targets: dict, state: dict, names: Iterable[str]) -> set:
    """Copy ``state[n]`` into ``targets[n]`` for each name (queued); the CUDA devices involved.
    A function of its own, so that no loop variable outlives it."""
    torch = _torch()
    cuda = set()
    with torch.no_grad():
        for n in names:
            dst, src = targets[n], state[n]
            dst.detach().copy_(src, non_blocking=True)
            cuda.update(d.index for d in (dst.device, src.device) if d.type == "cuda")
    return cuda


def _rebind(model, targets: dict, state: dict, names: Iterable[str]) -> set:
    """Rebind each parameter's ``.data`` and each buffer to ``state[n]``; the CUDA devices of
    the private copies made where the new tensor was on another device. A function of its own,
    so that no loop variable keeps an old tensor alive after it returns."""
    torch = _torch()
    cuda = set()
    with torch.no_grad():
        params = {id(p) for p in model.parameters()}
        rebound: dict[int, Any] = {}  # id(old buffer) -> new tensor
        for n in names:
            dst, src = targets[n], state[n]
            if src.device != dst.device:
                src = src.to(dst.device)  # no replica on the model's device: a private copy
                cuda.update(d.index for d in (dst.device, state[n].device) if d.type == "cuda")
            if id(dst) in params:
                dst.data = src
            else:
                rebound[id(dst)] = src
        if rebound:
            for mod in model.modules():
                for k, b in list(mod._buffers.items()):
                    if b is not None and id(b) in rebound:
                        mod._buffers[k] = rebound[id(b)]
    return cuda


def _short(keys: Iterable[str], n: int = 10) -> str:
    keys = list(keys)
    s = ", ".join(keys[:n])
    return s + (f", … ({len(keys)} in all)" if len(keys) > n else "")


def _materialize_meta_buffers(model, device) -> None:
    """Recompute non-persistent rotary buffers (``inv_freq``, ``original_inv_freq``, per layer
    type variants) that building on the meta device left there.

    Every transformers rotary module takes ``(config, device=None)``: a fresh one is built on
    ``device`` and its buffers and scaling attributes are moved over.
    """
    torch = _torch()
    for mod in model.modules():
        if "Rotary" not in type(mod).__name__ or getattr(mod, "config", None) is None:
            continue
        metas = [n for n, t in mod._buffers.items()
                 if t is not None and t.is_meta and n in mod._non_persistent_buffers_set]
        if not metas:
            continue
        fresh = None
        for kwargs in ({}, {"device": device}):  # newer transformers deprecate `device`
            try:
                with torch.device(device):
                    fresh = type(mod)(mod.config, **kwargs)
                break
            except Exception as e:  # model-specific; reported by the warning below
                log.info("could not rebuild %s on %s: %s", type(mod).__name__, device, e)
        if fresh is None:
            continue
        for n in metas:
            t = fresh._buffers.get(n)
            if t is not None and not t.is_meta:
                mod._buffers[n] = t.to(device)
        for k, v in vars(fresh).items():
            if k.startswith("_"):
                continue
            old = mod.__dict__.get(k)
            if "attention_scaling" in k or (isinstance(old, torch.Tensor) and old.is_meta
                                            and isinstance(v, torch.Tensor) and not v.is_meta):
                setattr(mod, k, v)
