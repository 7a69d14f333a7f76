"""Push a new version of a model to the weightfs daemon (docs/PROTOCOL.md §8), as a trainer does.

Standard library only at import; torch is imported the first time a torch tensor is written.

The daemon stages the version (allocated, invisible) from the manifest sent when the push
opens, because it lays the files out from the names, dtypes and shapes (PROTOCOL §6). Then:

* a CUDA tensor is copied device to device into the staged slab on its own GPU (a peer copy
  when the daemon's replica is on another GPU), through the CUDA IPC handle of that slab, and
  announced with a ``written`` line once the device is synchronized;
* CPU bytes (a torch CPU tensor, any bytes-like object, or a CUDA tensor when the daemon has no
  replica this process can map) go through the *scratch*, a shared memfd the daemon passes
  with the staged message: this side fills one half while the daemon copies the other out, so
  nothing large crosses the socket and no copy waits for another needlessly;
* before the commit this side drops its mappings of the staged slabs and says so
  (``{"op": "commit", "released": true}``), so the daemon does not count the trainer as a holder
  of the version it pushed (PROTOCOL §3.1);
* the commit makes the version current atomically; anything else (an exception, an ``abort``,
  this process dying, the connection closing) leaves nothing visible: the connection is the
  daemon's lease on the staged version.
"""

from __future__ import annotations

import base64
import json
import mmap
import os
import socket as _socket
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .errors import DaemonError, DaemonUnreachableError, WeightfsError
from .manifest import DTYPE_BITS, TORCH_DTYPE_NAMES, _byte_size, normalize_gpu_uuid, read_header

__all__ = ["push", "Push", "PushError", "default_socket", "UPGRADE_PROTOCOL"]

#: The ``Upgrade`` token of the push connection.
UPGRADE_PROTOCOL = "weightfs-push/1"
#: Longest line either side may send (PROTOCOL §8).
MAX_LINE = 16 << 20
#: GPU bytes copied before a ``written`` line is sent: the daemon learns of progress (and
#: ``weightfs ls`` shows it) without a device synchronization per tensor.
WRITTEN_FLUSH_BYTES = 1 << 30
#: Offsets in the scratch are rounded up to this, so that every copy starts on a cache line.
SCRATCH_ALIGN = 64
#: A ``write`` line is sent before its JSON would reach this size, far below MAX_LINE.
_BATCH_LINE_BYTES = 4 << 20

#: Error codes after which the daemon has dropped the push (a timeout, a cancel, a close).
_PUSH_ENDED = ("cancelled", "closed")

_ST_DTYPE_OF_TORCH = {v: k for k, v in TORCH_DTYPE_NAMES.items() if v is not None}

Shape = Sequence[int]
ManifestLike = Union[Mapping[str, Any], Iterable[Sequence[Any]]]


class PushError(DaemonError):
    """The daemon refused the push or a line of it: ``code`` and ``message`` are its own
    (``busy``: ``push policy: a push is in progress by pid 4242 …``; ``no_memory`` with the
    numbers in ``budget``; ``forbidden``; ``invalid`` naming the tensor; ``cancelled`` when the
    push timed out or was cancelled; ``closed`` when the connection ended without an answer)."""


# --------------------------------------------------------------------------------------------
# the socket


def default_socket() -> str:
    """The control socket the CLI uses (CONTROL.md; ``control.DefaultSocket``):
    ``$WEIGHTFS_SOCKET``, else ``/run/weightfs/weightfs.sock`` for root, else
    ``$XDG_RUNTIME_DIR/weightfs/weightfs.sock``, else ``$TMPDIR/weightfs-UID/weightfs.sock``."""
    s = os.environ.get("WEIGHTFS_SOCKET")
    if s:
        return s
    if os.geteuid() == 0:
        return "/run/weightfs/weightfs.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "weightfs", "weightfs.sock")
    return os.path.join(os.environ.get("TMPDIR") or "/tmp", f"weightfs-{os.geteuid()}",
                        "weightfs.sock")


class _Conn:
    """One connection to the control socket: an HTTP/1.1 request, then (after ``101``) JSON
    lines. Every read goes through ``recv_fds``, because the daemon attaches the scratch to the
    ``sendmsg`` that carries the staged line's first byte, and that byte may arrive in the same
    read as the end of the HTTP answer or in any later one."""

    def __init__(self, path: str, timeout: Optional[float]):
        self.path = path
        self.fds: list[int] = []
        self._buf = bytearray()
        self._eof = False
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise DaemonUnreachableError(
                f"no weightfs daemon at {path} ({e.strerror}); start one with `weightfs mount`, "
                "or pass socket= or set WEIGHTFS_SOCKET") from None
        except PermissionError as e:
            sock.close()
            raise DaemonUnreachableError(
                f"permission denied on the control socket {path} ({e.strerror}): pushing needs "
                "the daemon's uid, root, or --push-allow-uid/--push-allow-gid") from None
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        self.sock.close()

    def _fill(self) -> bool:
        if self._eof:
            return False
        try:
            data, fds, _, _ = _socket.recv_fds(self.sock, 1 << 16, 4,
                                               getattr(_socket, "MSG_CMSG_CLOEXEC", 0))
        except ConnectionResetError:
            data, fds = b"", []
        self.fds.extend(fds)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _until(self, sep: bytes, limit: int, what: str) -> Optional[bytes]:
        """Bytes up to and including ``sep``; None at end of stream."""
        start = 0
        while True:
            i = self._buf.find(sep, start)
            if i >= 0:
                out = bytes(self._buf[:i + len(sep)])
                del self._buf[:i + len(sep)]
                return out
            if len(self._buf) > limit:
                raise PushError("invalid", f"the daemon sent {what} longer than {limit} bytes")
            start = max(0, len(self._buf) - len(sep) + 1)
            if not self._fill():
                return None

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise PushError("closed", f"the daemon closed the connection {self.path} "
                                          "in the middle of an answer")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def request(self, method: str, target: str, body: bytes = b"",
                headers: Sequence[tuple[str, str]] = ()) -> tuple[int, dict[str, str]]:
        """Send one request; answer its status and headers (lower-case names)."""
        lines = [f"{method} {target} HTTP/1.1", "Host: weightfs"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        head = self._until(b"\r\n\r\n", 1 << 20, "an HTTP header")
        if head is None:
            raise PushError("closed", f"the daemon at {self.path} closed the connection "
                                      f"without answering {method} {target}")
        first, *rest = head.decode("latin-1").split("\r\n")
        parts = first.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise PushError("invalid", f"not an HTTP answer from {self.path}: {first!r}")
        hdrs = {}
        for line in rest:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        return int(parts[1]), hdrs

    def body(self, headers: Mapping[str, str]) -> bytes:
        """The body of a non-upgrade answer (Content-Length, chunked, or up to the close)."""
        if "content-length" in headers:
            return self._exactly(int(headers["content-length"]))
        if "chunked" in headers.get("transfer-encoding", "").lower():
            out = bytearray()
            while True:
                size_line = self._until(b"\r\n", 1 << 10, "a chunk size")
                if size_line is None:
                    raise PushError("closed", "the daemon closed the connection inside a chunk")
                n = int(size_line.split(b";")[0].strip() or b"0", 16)
                if n == 0:
                    self._until(b"\r\n", 1 << 16, "a trailer")
                    return bytes(out)
                out += self._exactly(n + 2)[:n]
        while self._fill():
            pass
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def error(self, status: int, headers: Mapping[str, str], what: str) -> PushError:
        raw = self.body(headers)
        try:
            obj = json.loads(raw)
        except ValueError:
            return PushError("", f"{what}: HTTP {status}: {raw[:500].decode('utf-8', 'replace')}",
                             status)
        return PushError.from_answer(obj, status, f"{what}: ")

    def send_line(self, obj: Mapping[str, Any]) -> None:
        self.sock.sendall(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

    def read_line(self) -> Optional[dict]:
        """The next JSON line; None at end of stream."""
        raw = self._until(b"\n", MAX_LINE, "a line")
        if raw is None:
            return None
        try:
            obj = json.loads(raw)
        except ValueError:
            raise PushError("invalid", f"the daemon sent a line that is not JSON: {raw[:200]!r}")
        if not isinstance(obj, dict):
            raise PushError("invalid", f"the daemon sent a line that is not an object: {obj!r}")
        return obj


# --------------------------------------------------------------------------------------------
# the manifest and the data


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _nbytes(name: str, dtype: str, shape: Shape) -> int:
    """The byte size of a manifest entry, by the header parser's rule (``_byte_size``); a bad
    entry is a ValueError naming the tensor."""
    if dtype not in DTYPE_BITS:
        raise ValueError(f"tensor {name!r}: unknown safetensors dtype {dtype!r} (want one of "
                         f"{', '.join(DTYPE_BITS)})")
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise ValueError(f"tensor {name!r}: shape {list(shape)} must hold integers >= 0")
    return _byte_size(dtype, tuple(shape), lambda _cls, msg: ValueError(msg), name)


def _is_tensor(x: Any) -> bool:
    """A torch tensor, told without importing torch."""
    return hasattr(x, "data_ptr") and hasattr(x, "dtype") and hasattr(x, "shape")


def _st_dtype(dtype: Any, name: str) -> str:
    """The safetensors spelling of a dtype given as that spelling or as a torch dtype."""
    if isinstance(dtype, str):
        return dtype
    tname = str(dtype).removeprefix("torch.")
    st = _ST_DTYPE_OF_TORCH.get(tname)
    if st is None:
        raise ValueError(f"tensor {name!r}: {dtype} has no safetensors dtype")
    return st


def _entry(name: Any, spec: Any) -> _Entry:
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be str, got {name!r}")
    if _is_tensor(spec):
        dtype, shape = _st_dtype(spec.dtype, name), tuple(int(d) for d in spec.shape)
    elif isinstance(spec, (tuple, list)) and len(spec) in (2, 3):
        dtype, shape = _st_dtype(spec[0], name), tuple(spec[1])
    else:
        raise TypeError(f"tensor {name!r}: want a torch tensor, (dtype, shape) or "
                        f"(dtype, shape, data), got {type(spec).__name__}")
    return _Entry(name, dtype, shape, _nbytes(name, dtype, shape))


def _manifest(manifest: ManifestLike) -> list[_Entry]:
    """Entries in the writer's order from a mapping (name -> tensor, (dtype, shape) or
    (dtype, shape, data)) or a list of (name, dtype, shape)."""
    if isinstance(manifest, Mapping):
        out = [_entry(n, v) for n, v in manifest.items()]
    else:
        out = []
        for item in manifest:
            if not isinstance(item, (tuple, list)) or len(item) != 3:
                raise TypeError(f"a manifest list holds (name, dtype, shape), got {item!r}")
            out.append(_entry(item[0], (item[1], item[2])))
    if not out:
        raise ValueError("a push needs at least one tensor")
    seen: set[str] = set()
    for e in out:
        if e.name in seen:
            raise ValueError(f"tensor {e.name!r} appears twice in the manifest")
        seen.add(e.name)
    return out


def _byte_view(e: _Entry, data: Any) -> memoryview:
    """``data`` as flat bytes, checked against the manifest's size for ``e``."""
    try:
        mv = memoryview(data)
    except TypeError:
        raise TypeError(f"tensor {e.name!r}: data must be bytes-like (buffer protocol), got "
                        f"{type(data).__name__}") from None
    if mv.nbytes != e.nbytes:
        raise ValueError(f"tensor {e.name!r}: {mv.nbytes} bytes of data, but {e.dtype} "
                         f"{list(e.shape)} is {e.nbytes} bytes")
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def _check_data(e: _Entry, value: Any) -> Any:
    """What ``write`` will copy for ``e``: the torch tensor, or a byte view of (dtype, shape,
    data) / bytes-like; raises naming the tensor when the dtype, shape or size differ."""
    if _is_tensor(value):
        got = _st_dtype(value.dtype, e.name), tuple(int(d) for d in value.shape)
        if got != (e.dtype, e.shape):
            raise ValueError(f"tensor {e.name!r}: {got[0]} {list(got[1])} given, the manifest "
                             f"says {e.dtype} {list(e.shape)}")
        if getattr(value, "is_meta", False):
            raise ValueError(f"tensor {e.name!r} is on the meta device: it has no data to push")
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        raise TypeError(f"tensor {e.name!r}: (dtype, shape) without data; write a tensor, "
                        "bytes, or (dtype, shape, data)")
    if isinstance(value, (tuple, list)) and len(value) == 3:
        dtype, shape = _st_dtype(value[0], e.name), tuple(value[1])
        if (dtype, shape) != (e.dtype, e.shape):
            raise ValueError(f"tensor {e.name!r}: {dtype} {list(shape)} given, the manifest "
                             f"says {e.dtype} {list(e.shape)}")
        value = value[2]
    return _byte_view(e, value)


def _encode_files(files: Optional[Mapping[str, Any]]) -> Optional[dict[str, str]]:
    if not files:
        return None
    out = {}
    for path, data in files.items():
        if isinstance(data, str):
            data = data.encode("utf-8")
        try:
            out[path] = base64.b64encode(memoryview(data)).decode("ascii")
        except TypeError:
            raise TypeError(f"file {path!r}: want str or bytes-like, got "
                            f"{type(data).__name__}") from None
    return out


def _current_manifest(name: str, sock: str, timeout: Optional[float]) -> list[_Entry]:
    """The manifest of the model's current version (files in order, each file's tensors in
    header order), read from the mount that the daemon reports: ``Push(name)`` without a
    manifest pushes the same layout again, which keeps the same files (PROTOCOL §6.1)."""
    from .torch_loader import _weight_files  # torch-free at import
    from .versions import resolve_version

    conn = _Conn(sock, timeout)
    try:
        status, headers = conn.request("GET", "/v1/status", headers=[("Connection", "close")])
        if status != 200:
            raise conn.error(status, headers, f"push {name}: status")
        mnt = json.loads(conn.body(headers)).get("mountpoint")
    finally:
        conn.close()
    if not isinstance(mnt, str) or not mnt:
        raise PushError("invalid", f"push {name}: the daemon reports no mount point")
    try:
        folder = resolve_version(os.path.join(mnt, name)).folder
    except FileNotFoundError:
        raise ValueError(f"push {name}: no manifest given and {name!r} has no current version "
                         "to repeat; pass Push(name, manifest)") from None
    out = []
    for path in _weight_files(folder):
        for t in read_header(path).tensors.values():
            out.append(_Entry(t.name, t.dtype, t.shape, t.nbytes))
    return out


# --------------------------------------------------------------------------------------------
# torch (imported lazily)


def _torch():
    import torch  # only reached with a torch tensor in hand

    return torch


def _flat_u8(t: Any) -> Any:
    """The tensor's bytes as a flat uint8 tensor on its device (contiguous, conjugation and
    negation resolved): what the file holds, whatever the dtype (BF16 and FP8 included)."""
    torch = _torch()
    t = t.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t.contiguous().reshape(-1).view(torch.uint8)


# --------------------------------------------------------------------------------------------
# Push


class Push:
    """A push in progress: the daemon has staged a version laid out from ``manifest`` and waits
    for every tensor, then a commit.

    ``manifest``: a mapping name -> torch tensor (meta tensors will do), name -> ``(dtype,
    shape)`` or ``(dtype, shape, data)``, or a list of ``(name, dtype, shape)``; dtypes in the
    safetensors spelling (``"BF16"``) or torch dtypes. Its order is the writer's order (the
    layout of a new name follows it). ``None`` repeats the current version's manifest, so the
    version keeps the same files and headers. ``files``: non-weight files (``config.json`` ->
    str or bytes) that replace the base version's.

    ``p.staged`` is the daemon's staged message (``base``, ``same_layout``, ``files``, …);
    ``p.done`` the tensor bytes it has confirmed so far.

    Used as a context manager, leaving the block commits (``p.version`` is then the new
    version's number) and an exception aborts, with the exception's repr as the reason, and
    propagates. ``commit()`` and ``abort(reason)`` may be called explicitly. Not thread-safe.
    """

    def __init__(self, name: str, manifest: Optional[ManifestLike] = None, *,
                 files: Optional[Mapping[str, Any]] = None, socket: Optional[str] = None,
                 timeout: Optional[float] = None):
        self.name = name
        self.version: Optional[int] = None
        #: tensor bytes the daemon has confirmed written (its last ``done``)
        self.done = 0
        self.socket = socket or default_socket()
        self._open = False
        self._entries = (_manifest(manifest) if manifest is not None
                         else _current_manifest(name, self.socket, timeout))
        self._by_name = {e.name: e for e in self._entries}
        self._written: set[str] = set()
        body: dict[str, Any] = {"name": name, "tensors": [
            {"name": e.name, "dtype": e.dtype, "shape": list(e.shape)} for e in self._entries]}
        enc = _encode_files(files)
        if enc:
            body["files"] = enc
        self._scratch: Optional[mmap.mmap] = None
        self._view: Optional[memoryview] = None
        self._slabs: dict[tuple[str, str], Any] = {}
        self._slab_keys: set[tuple[str, bytes]] = set()  # torch_loader's cache keys
        self._sent = 0
        self._answered = 0
        self._conn = _Conn(self.socket, timeout)
        try:
            self._stage(json.dumps(body).encode())
        except BaseException:
            self._close()
            raise
        self._open = True

    # ---- opening

    def _stage(self, body: bytes) -> None:
        c = self._conn
        status, headers = c.request("POST", "/v1/push", body, [
            ("Connection", "Upgrade"), ("Upgrade", UPGRADE_PROTOCOL),
            ("Content-Type", "application/json")])
        if status != 101:
            raise c.error(status, headers, f"push {self.name}")
        msg = c.read_line()
        if msg is None:
            raise PushError("closed", f"push {self.name}: the daemon closed the connection "
                                      "before staging the version")
        if "staged" not in msg:
            raise PushError.from_answer(msg, 0, f"push {self.name}: ")
        staged = msg["staged"]
        self.staged = staged
        fds, c.fds[:] = list(c.fds), []
        for fd in fds[1:]:
            os.close(fd)
        fd = fds[0] if fds else -1
        try:
            self._check_staged(staged)
            n = int(staged["scratch_bytes"])
            self._scratch_bytes = n
            if n > 0:
                if fd < 0:
                    raise PushError("invalid", f"push {self.name}: the staged message came "
                                               "without the scratch file descriptor")
                self._scratch = mmap.mmap(fd, n, mmap.MAP_SHARED,
                                          mmap.PROT_READ | mmap.PROT_WRITE)
                self._view = memoryview(self._scratch)
        finally:
            if fd >= 0:
                os.close(fd)
        self._half = self._scratch_bytes // 2
        self._cur, self._fill = 0, 0
        self._half_seq = [0, 0]
        self._batch: list[dict[str, Any]] = []
        self._batch_len = 0
        self._gpu_names: dict[str, list[str]] = {}
        self._gpu_bytes = 0
        self._gpu_devs: set[int] = set()

    def _check_staged(self, staged: Any) -> None:
        where = f"push {self.name}: the staged message"
        if not isinstance(staged, dict) or not isinstance(staged.get("tensors"), list):
            raise PushError("invalid", f"{where} is malformed: {staged!r:.300}")
        self._places: dict[str, dict[str, Any]] = {}
        for t in staged["tensors"]:
            e = self._by_name.get(t.get("name"))
            if e is None:
                raise PushError("invalid", f"{where} names tensor {t.get('name')!r}, which the "
                                           "manifest does not have")
            if t.get("size") != e.nbytes:
                raise PushError("invalid", f"{where} gives tensor {e.name!r} {t.get('size')} "
                                           f"bytes, but {e.dtype} {list(e.shape)} is {e.nbytes}")
            self._places[e.name] = t
        lacking = [e.name for e in self._entries if e.name not in self._places]
        if lacking:
            raise PushError("invalid", f"{where} lacks tensors {lacking[:10]}")
        self._files = {f["path"]: f for f in staged.get("files") or []}

    # ---- writing

    def write(self, name: str, tensor: Any) -> None:
        """Write tensor ``name`` of the manifest: a torch tensor (CPU or CUDA, any layout), a
        bytes-like object, or ``(dtype, shape, data)``. Each tensor is written exactly once.
        The bytes are copied before this returns (CUDA copies are ordered on the current
        stream), so the caller may free or reuse its buffer."""
        self._check_open()
        e = self._by_name.get(name)
        if e is None:
            raise KeyError(f"push {self.name}: tensor {name!r} is not in the manifest")
        if name in self._written:
            raise ValueError(f"push {self.name}: tensor {name!r} was already written")
        data = _check_data(e, tensor)
        try:
            if isinstance(data, memoryview):
                self._to_scratch(e, lambda region: region.__setitem__(slice(None), data))
            elif data.is_cuda and e.nbytes and self._write_cuda(e, data):
                pass
            else:
                self._to_scratch(e, lambda region: self._copy_torch(region, data))
        except PushError as err:
            if err.code in _PUSH_ENDED:  # the daemon ended it: let go of the connection too
                self.abort(repr(err))
            raise
        self._written.add(name)

    @staticmethod
    def _copy_torch(region: memoryview, t: Any) -> None:
        torch = _torch()
        dst = torch.frombuffer(region, dtype=torch.uint8)
        dst.copy_(_flat_u8(t))  # device to host is synchronous into pageable memory
        del dst

    def _to_scratch(self, e: _Entry, fill: Any) -> None:
        n = e.nbytes
        if n > self._half:
            if n > self._scratch_bytes:
                raise PushError("invalid", f"push {self.name}: tensor {e.name!r} ({n} bytes) "
                                           f"does not fit the scratch ({self._scratch_bytes})")
            self._send_batch()
            self._await(self._sent)  # the whole scratch is free
            if n:
                fill(self._view[:n])
            self._batch.append({"name": e.name, "at": 0})
            seq = self._send_batch()
            self._half_seq = [seq, seq]
            self._cur, self._fill = 0, self._half  # the next tensor waits for this one
            return
        at = -(-self._fill // SCRATCH_ALIGN) * SCRATCH_ALIGN
        if at + n > self._half or self._batch_len > _BATCH_LINE_BYTES:
            self._half_seq[self._cur] = self._send_batch() or self._half_seq[self._cur]
            self._cur ^= 1
            self._await(self._half_seq[self._cur])  # the daemon is done with the other half
            at = 0
        off = self._cur * self._half + at
        if n:
            fill(self._view[off:off + n])
        self._fill = at + n
        self._batch.append({"name": e.name, "at": off})
        self._batch_len += len(e.name) + 32

    def _send_batch(self) -> int:
        """Send the pending ``write`` line; its sequence number (0: nothing pending)."""
        if not self._batch:
            return 0
        batch, self._batch, self._batch_len = self._batch, [], 0
        return self._send({"op": "write", "tensors": batch})

    def _write_cuda(self, e: _Entry, t: Any) -> bool:
        """Copy ``t`` into its staged slab; False when no replica is on a GPU we can see."""
        from .manifest import Replica
        from .torch_loader import _open_slab, _visible_gpus

        place = self._places[e.name]
        f = self._files.get(place.get("file"))
        reps = (f or {}).get("replicas") or []
        visible = _visible_gpus()
        cands = [(r, visible[normalize_gpu_uuid(r["gpu"])]) for r in reps
                 if normalize_gpu_uuid(r["gpu"]) in visible]
        if not cands:
            return False
        rep, dev = next(((r, d) for r, d in cands if d == t.device.index), cands[0])
        key = (f["path"], rep["gpu"])
        slab = self._slabs.get(key)
        if slab is None:
            replica = Replica(rep["gpu"], base64.b64decode(rep["handle"]), int(f["slab_bytes"]))
            slab = _open_slab(replica, dev)
            self._slabs[key] = slab
            self._slab_keys.add((replica.uuid, replica.handle))
        torch = _torch()
        dst = torch.empty(0, dtype=torch.uint8, device=torch.device("cuda", dev)).set_(
            slab, int(place["slab_offset"]), (e.nbytes,))
        dst.copy_(_flat_u8(t))
        del dst  # the slab's storage is referenced by self._slabs alone
        self._gpu_names.setdefault(rep["gpu"], []).append(e.name)
        self._gpu_devs.update((dev, t.device.index))
        self._gpu_bytes += e.nbytes
        if self._gpu_bytes >= WRITTEN_FLUSH_BYTES:
            self._send_written()
        return True

    def _send_written(self) -> None:
        """Synchronize the devices that copied, then tell the daemon which tensors are in."""
        if not self._gpu_names:
            return
        torch = _torch()
        for d in sorted(self._gpu_devs):
            torch.cuda.synchronize(d)
        for gpu, names in self._gpu_names.items():
            self._send({"op": "written", "gpu": gpu, "tensors": names})
        self._gpu_names, self._gpu_devs, self._gpu_bytes = {}, set(), 0

    # ---- lines

    def _send(self, obj: Mapping[str, Any]) -> int:
        try:
            self._conn.send_line(obj)
        except OSError as e:  # the daemon ended the push: say why if it said so
            try:
                while (ans := self._conn.read_line()) is not None:
                    if "error" in ans:
                        raise PushError.from_answer(ans, 0, f"push {self.name}: ") from None
            except OSError:
                pass
            raise PushError("closed", f"push {self.name}: the daemon closed the connection "
                                      f"({e.strerror or e})") from None
        self._sent += 1
        return self._sent

    def _await(self, seq: int) -> Optional[dict]:
        """Read answers up to line ``seq``; the last one read. An error answer raises."""
        ans = None
        while self._answered < seq:
            ans = self._conn.read_line()
            if ans is None:
                raise PushError("closed", f"push {self.name}: the daemon closed the connection "
                                          f"with {seq - self._answered} lines unanswered")
            self._answered += 1
            if "error" in ans:
                raise PushError.from_answer(ans, 0, f"push {self.name}: ")
            if isinstance(ans.get("done"), int):
                self.done = ans["done"]
        return ans

    # ---- ending

    def _check_open(self) -> None:
        if not self._open:
            state = "committed" if self.version is not None else "aborted"
            raise RuntimeError(f"push {self.name} is {state}")

    def commit(self) -> int:
        """Make the staged version current; its number. Every tensor must have been written.
        On any failure the push is aborted (nothing becomes visible) and the error raised."""
        self._check_open()
        try:
            missing = [e.name for e in self._entries if e.name not in self._written]
            if missing:
                raise ValueError(f"push {self.name}: commit: {len(missing)} of "
                                 f"{len(self._entries)} tensors not written: "
                                 + ", ".join(repr(n) for n in missing[:10])
                                 + (", …" if len(missing) > 10 else ""))
            self._send_batch()
            self._send_written()
            ans = self._await(self._send(self._commit_line()))
            ver = (ans or {}).get("version")
            if not isinstance(ver, dict) or not isinstance(ver.get("number"), int):
                raise PushError("invalid", f"push {self.name}: commit answered {ans!r}")
            self.version = ver["number"]
        except BaseException as exc:
            self.abort(f"commit failed: {exc!r}")
            raise
        self._open = False
        self._close()
        return self.version

    def _commit_line(self) -> dict[str, Any]:
        """The commit line. The copies into the staged slabs are complete (``_send_written``
        synchronized the devices), so every slab storage this push opened is dropped first;
        when none is still open (or none was opened) the commit says ``released`` and the daemon
        does not count this process as a holder of the new version (PROTOCOL §3.1, §8)."""
        keys = list(self._slab_keys)
        self._slabs.clear()  # the push's only references; the copies' temporaries are gone
        if keys:
            from .torch_loader import _slabs_closed

            if not _slabs_closed(keys):
                return {"op": "commit"}
        return {"op": "commit", "released": True}

    def abort(self, reason: str = "aborted by the writer") -> None:
        """Drop the staged version (nothing becomes visible) and close the connection. Does
        nothing once the push has ended."""
        if not self._open:
            return
        self._open = False
        try:
            self._conn.send_line({"op": "abort", "reason": reason})
            while True:  # answers to lines in flight, then {"aborted": true} or the close
                ans = self._conn.read_line()
                if ans is None or ans.get("aborted"):
                    break
        except (OSError, WeightfsError):
            pass  # the close below aborts as well
        finally:
            self._close()

    def _close(self) -> None:
        """Unmap the scratch, drop the slabs, close the connection (which alone aborts an open
        push on the daemon's side)."""
        self._slabs.clear()
        if self._view is not None:
            try:
                self._view.release()
            except BufferError:  # a region still exported: unmapped when collected
                pass
            self._view = None
        if self._scratch is not None:
            try:
                self._scratch.close()
            except BufferError:
                pass
            self._scratch = None
        self._conn.close()

    def __enter__(self) -> "Push":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self.abort(repr(exc))
        elif self._open:
            self.commit()
        return False

    def __repr__(self) -> str:
        state = ("open" if self._open else f"committed as version {self.version}"
                 if self.version is not None else "ended")
        return (f"<weightfs.Push {self.name!r} {state}, {len(self._written)} of "
                f"{len(self._entries)} tensors written>")


def push(name: str, tensors: Mapping[str, Any], *, files: Optional[Mapping[str, Any]] = None,
         socket: Optional[str] = None, timeout: Optional[float] = None) -> int:
    """Push ``tensors`` as the next version of model ``name`` and commit it; the new version's
    number. ``tensors``: a torch state dict (CPU or CUDA tensors) or name -> ``(dtype, shape,
    data)`` with a safetensors dtype string, a list of ints and any bytes-like object. Every
    tensor is checked (dtype, shape, byte size) before the daemon is contacted; on any failure
    nothing is left staged. ``timeout``: seconds any one wait on the daemon may last."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping name -> tensor, got {type(tensors).__name__}")
    entries = _manifest(tensors)
    data = {e.name: _check_data(e, tensors[e.name]) for e in entries}
    with Push(name, [(e.name, e.dtype, e.shape) for e in entries], files=files, socket=socket,
              timeout=timeout) as p:
        for e in entries:
            p.write(e.name, data[e.name])
    assert p.version is not None
    return p.version
