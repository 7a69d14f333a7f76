"""The weightfs file protocol, standard library only.

Three things live here:

* a strict parser for the safetensors header (8-byte little-endian length ``n``, then ``n``
  bytes of a JSON object whose keys are tensor names, plus an optional ``__metadata__``);
* the slab layout rule that places a weights file's tensors in its GPU slab;
* the ``user.weightfs.cuda`` extended attribute: the JSON record that says on which GPUs the
  file is resident and carries the CUDA IPC handle of each slab.

Nothing here imports torch; :mod:`weightfs.torch_loader` builds tensors from what this module
computes.
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Mapping, Union

from .errors import SafetensorError, WeightfsError

__all__ = [
    "XATTR_CUDA",
    "MAX_HEADER_SIZE",
    "DEFAULT_ALIGN",
    "IPC_HANDLE_SIZE",
    "DTYPE_BITS",
    "TORCH_DTYPE_NAMES",
    "HEADER_ERROR_CLASSES",
    "HeaderError",
    "ManifestError",
    "UnsupportedDtypeError",
    "TensorInfo",
    "Header",
    "SlabEntry",
    "Replica",
    "Manifest",
    "read_header",
    "read_header_direct",
    "open_direct",
    "parse_header",
    "slab_layout",
    "slab_end",
    "slab_size",
    "torch_dtype_name",
    "parse_cuda_manifest",
    "read_cuda_manifest",
    "normalize_gpu_uuid",
]

#: Extended attribute that carries the GPU manifest of a weights file.
XATTR_CUDA = "user.weightfs.cuda"
#: Largest header accepted (same limit as the safetensors library).
MAX_HEADER_SIZE = 100_000_000
#: The slab layout rule's alignment (docs/PROTOCOL.md §2), the one definition of it in Python;
#: the daemon's is ``store.SlabAlign``. A file's manifest says which one applies (``align``).
DEFAULT_ALIGN = 256
#: Size of a legacy ``CUipcMemHandle``.
IPC_HANDLE_SIZE = 64

#: safetensors dtype -> bits per element.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}

#: safetensors dtype -> name of the torch dtype (``getattr(torch, name)``); ``None``: torch has
#: no such dtype.
TORCH_DTYPE_NAMES: dict[str, str | None] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F4": None,
    "F6_E2M3": None,
    "F6_E3M2": None,
}

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


#: Why a file is refused: the ``cls`` of a :class:`HeaderError`. The same classes as the Go
#: parser's (``safetensors.Class``); store/safetensors/testdata/conformance/cases.json documents
#: each one and pins the verdict of both parsers on every file of the conformance corpus.
HEADER_ERROR_CLASSES = (
    "truncated",
    "header_too_large",
    "invalid_utf8",
    "invalid_json",
    "duplicate_field",
    "bad_metadata",
    "bad_entry",
    "bad_dtype",
    "bad_shape",
    "bad_offsets",
    "size_mismatch",
    "trailing_data",
)


class HeaderError(SafetensorError, ValueError):
    """The safetensors header of a file is malformed. ``cls`` is the reason, one of
    :data:`HEADER_ERROR_CLASSES`. A ``SafetensorError`` (what the reference raises for a bad
    header) and, as before, a ``ValueError``."""

    def __init__(self, message: str, cls: str = "invalid_json"):
        super().__init__(message)
        self.cls = cls


class ManifestError(WeightfsError, ValueError):
    """The ``user.weightfs.cuda`` record of a file is malformed."""


class UnsupportedDtypeError(WeightfsError, TypeError):
    """A safetensors dtype has no torch equivalent."""


def _where(path: Any) -> str:
    if path is None:
        return "<bytes>"
    if isinstance(path, bytes):
        return os.fsdecode(path)
    if isinstance(path, int):
        return f"<fd {path}>"
    return os.fspath(path) if isinstance(path, os.PathLike) else str(path)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# --------------------------------------------------------------------------------------------
# safetensors header


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header. ``data_offsets`` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def begin(self) -> int:
        return self.data_offsets[0]

    @property
    def end(self) -> int:
        return self.data_offsets[1]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header.

    ``header_size`` is the ``n`` of the 8-byte prefix; the data section starts at
    ``data_offset = 8 + n``. ``file_size`` is ``None`` when the header was parsed from a buffer
    of unknown total size. ``tensors`` keeps the order of the JSON object.
    """

    header_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None = None
    file_size: int | None = None
    path: str | None = None

    @property
    def data_offset(self) -> int:
        return 8 + self.header_size

    @property
    def data_size(self) -> int:
        """End of the last tensor (the data section length of a valid file)."""
        return max((t.end for t in self.tensors.values()), default=0)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


class _Pairs(list):
    """A JSON object as the list of its (key, value) pairs, repeated keys kept."""


class _NegZero:
    """``-0``, which serde_json reads as a float and Python as the integer 0."""


_NEG_ZERO = _NegZero()
_MAX_DEPTH = 127  # serde_json's recursion limit is 128
_I64_MAX = (1 << 63) - 1
_U64_MAX = (1 << 64) - 1


def _parse_int(s: str) -> Any:
    if s == "-0":
        return _NEG_ZERO
    if len(s) > 300 and math.isinf(float(s)):
        raise ValueError(f"number {s[:40]} is out of range")
    return int(s)


def _parse_float(s: str) -> float:
    f = float(s)
    if math.isinf(f):
        raise ValueError(f"number {s[:40]} is out of range")
    return f


def _check_strict(v: Any, depth: int = 0) -> str | None:
    """What serde_json refuses that :func:`json.loads` lets through: lone UTF-16 surrogates
    (from ``\\u`` escapes) and nesting deeper than 127. Returns a problem or ``None``."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return "lone UTF-16 surrogate in a string"
        return None
    if isinstance(v, list):
        depth += 1
        if depth > _MAX_DEPTH:
            return f"nests deeper than {_MAX_DEPTH} levels"
        items = (x for kv in v for x in kv) if isinstance(v, _Pairs) else iter(v)
        for x in items:
            p = _check_strict(x, depth)
            if p:
                return p
    return None


def _json_kind(v: Any) -> str:
    if isinstance(v, _Pairs):
        return "an object"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, bool):
        return "a boolean"
    if v is None:
        return "null"
    return "a number"


def _ints(v: Any, what: str, fail, cls: str) -> list[int]:
    """A JSON array of integers in 0..2^63-1 (the Go parser's int64), else HeaderError."""
    if not isinstance(v, list) or isinstance(v, _Pairs):
        raise fail(cls, f"{what} is {_json_kind(v)}, not an array")
    for i, d in enumerate(v):
        if not _is_int(d) or not 0 <= d <= _I64_MAX:
            raise fail(cls, f"{what} element {i} is not an integer in 0..2^63-1: {d!r}")
    return v


def _byte_size(dtype: str, shape: tuple[int, ...], fail, name: str) -> int:
    """Bytes of ``shape`` x ``dtype``, multiplied left to right in 64 unsigned bits as the
    reference (usize::checked_mul) does."""
    n = 1
    for d in shape:
        n *= d
        if n > _U64_MAX:
            raise fail("bad_shape", f"tensor {name!r}: element count of shape {list(shape)} "
                                    "overflows")
    nbits = n * DTYPE_BITS[dtype]
    if nbits > _U64_MAX:
        raise fail("bad_shape", f"tensor {name!r}: bit size of shape {list(shape)} of {dtype} "
                                "overflows")
    if nbits % 8:
        raise fail("size_mismatch", f"tensor {name!r}: {n} elements of {dtype} are {nbits} bits, "
                                    "not a whole number of bytes")
    return nbits // 8


def _parse_entry(name: str, entry: Any, fail) -> TensorInfo:
    if not isinstance(entry, _Pairs):
        raise fail("bad_entry", f"tensor {name!r}: entry is {_json_kind(entry)}, not a JSON object")
    got: dict[str, Any] = {}
    for key, v in entry:
        if key not in ("dtype", "shape", "data_offsets"):
            continue  # the reference ignores unknown fields
        if key in got:
            raise fail("duplicate_field", f"tensor {name!r}: duplicate field {key!r}")
        if key == "dtype":
            if not isinstance(v, str):
                raise fail("bad_dtype", f"tensor {name!r}: dtype is {_json_kind(v)}, not a string")
            if v not in DTYPE_BITS:
                raise fail("bad_dtype", f"tensor {name!r}: unknown dtype {v!r}")
        elif key == "shape":
            v = tuple(_ints(v, f"tensor {name!r}: shape", fail, "bad_shape"))
        else:
            v = _ints(v, f"tensor {name!r}: data_offsets", fail, "bad_offsets")
            if len(v) != 2:
                raise fail("bad_offsets", f"tensor {name!r}: data_offsets has {len(v)} elements, "
                                          "not 2")
            if v[0] > v[1]:
                raise fail("bad_offsets", f"tensor {name!r}: data_offsets {v} begin after end")
            v = (v[0], v[1])
        got[key] = v
    for key, cls in (("dtype", "bad_dtype"), ("shape", "bad_shape"),
                     ("data_offsets", "bad_offsets")):
        if key not in got:
            raise fail(cls, f"tensor {name!r}: missing field {key!r}")
    return TensorInfo(name, got["dtype"], got["shape"], got["data_offsets"])


def _rule_order(t: TensorInfo) -> tuple[int, int, bytes]:
    """The slab layout rule's order of tensors (docs/PROTOCOL.md §2): ascending
    (data_offsets begin, end, name as UTF-8 bytes)."""
    return (t.begin, t.end, t.name.encode("utf-8"))


def _parse_header_json(raw: bytes, header_size: int, file_size: int | None, where: str,
                       strict: bool) -> Header:
    """Validate a JSON header as the reference parser (the Rust ``safetensors`` crate) and the
    Go parser of the daemon do; the conformance corpus pins both. ``strict=False`` also lets
    the tensors leave gaps (zero-size tensors may then sit inside others) and the data section
    run on past the last tensor."""

    def fail(cls: str, msg: str) -> HeaderError:
        return HeaderError(f"{where}: invalid safetensors header: {msg}", cls)

    if not raw:
        raise fail("invalid_json", "header is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail("invalid_utf8", f"header is not valid UTF-8: {e}") from None
    try:
        obj = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_reject_constant,
                         parse_int=_parse_int, parse_float=_parse_float)
    except (ValueError, RecursionError) as e:
        raise fail("invalid_json", f"not valid JSON: {e}") from None
    if not isinstance(obj, _Pairs):
        raise fail("invalid_json", "header is not a JSON object")
    problem = _check_strict(obj)
    if problem:
        raise fail("invalid_json", f"not valid JSON: {problem}")

    metadata: dict[str, str] | None = None
    seen_metadata = False
    tensors: dict[str, TensorInfo] = {}
    for name, info in obj:
        if name == "__metadata__":
            if seen_metadata:
                raise fail("duplicate_field", "duplicate '__metadata__' key")
            seen_metadata = True
            if info is None:  # the reference reads an Option: null is absent
                continue
            if not isinstance(info, _Pairs):
                raise fail("bad_metadata", f"__metadata__ is {_json_kind(info)}, not a JSON object")
            metadata = {}
            for k, v in info:
                if not isinstance(v, str):
                    raise fail("bad_metadata", f"metadata value for {k!r} is not a string but "
                                               f"{_json_kind(v)}")
                metadata[k] = v  # a repeated key: the last value counts, as in the reference
            continue
        # A repeated tensor name: every entry must be valid, the last one counts.
        tensors[name] = _parse_entry(name, info, fail)

    data_size = None if file_size is None else file_size - 8 - header_size
    pos, prev = 0, None
    for t in sorted(tensors.values(), key=_rule_order):
        if t.begin < pos and (strict or t.nbytes):
            raise fail("bad_offsets", f"tensor {t.name!r}: data_offsets {list(t.data_offsets)} "
                                      f"overlap previous tensor {prev!r} ending at {pos}")
        if t.begin > pos and strict:
            raise fail("bad_offsets", f"tensor {t.name!r}: data_offsets {list(t.data_offsets)} "
                                      f"leave a gap of {t.begin - pos} bytes (expected {pos})")
        size = _byte_size(t.dtype, t.shape, fail, t.name)
        if size != t.nbytes:
            raise fail("size_mismatch", f"tensor {t.name!r}: shape {list(t.shape)} of {t.dtype} "
                                        f"needs {size} bytes but data_offsets "
                                        f"{list(t.data_offsets)} span {t.nbytes}")
        if t.end >= pos:
            pos, prev = t.end, t.name
    if data_size is not None and pos > data_size:
        raise fail("truncated", f"tensor {prev!r}: data_offsets end at {pos}, past the end of "
                                f"the file (data section is {data_size} bytes)")
    if strict and data_size is not None and pos < data_size:
        raise fail("trailing_data", f"data section is {data_size} bytes but the tensors end at "
                                    f"{pos}: {data_size - pos} trailing bytes")
    return Header(header_size=header_size, tensors=tensors, metadata=metadata,
                  file_size=file_size, path=None if where == "<bytes>" else where)


def _check_prefix(prefix: bytes, file_size: int | None, where: str) -> int:
    if len(prefix) < 8:
        raise HeaderError(f"{where}: invalid safetensors header: file is shorter than 8 bytes",
                          "truncated")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_SIZE:
        raise HeaderError(f"{where}: invalid safetensors header: header length {n} exceeds "
                          f"{MAX_HEADER_SIZE}", "header_too_large")
    if file_size is not None and 8 + n > file_size:
        raise HeaderError(f"{where}: invalid safetensors header: header length {n} runs past the "
                          f"end of the file ({file_size} bytes)", "truncated")
    return n


def parse_header(data: bytes | bytearray | memoryview, file_size: int | None = None, *,
                 strict: bool = True, path: PathLike | None = None) -> Header:
    """Parse a safetensors header from the first bytes of a file.

    ``data`` holds at least the 8-byte prefix and the JSON header. ``file_size`` (the whole
    file's size) enables the bounds checks; when ``data`` is the whole file pass ``len(data)``.
    """
    where = _where(path)
    data = bytes(data[: 8 + MAX_HEADER_SIZE]) if not isinstance(data, bytes) else data
    n = _check_prefix(data[:8], file_size, where)
    if len(data) < 8 + n:
        raise HeaderError(f"{where}: invalid safetensors header: need {8 + n} bytes, got "
                          f"{len(data)}", "truncated")
    return _parse_header_json(data[8:8 + n], n, file_size, where, strict)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _file_size(f: BinaryIO) -> int | None:
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    try:
        pos = f.tell()
        size = f.seek(0, os.SEEK_END)
        f.seek(pos)
        return size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def read_header(path_or_fileobj: PathLike | BinaryIO, *, strict: bool = True) -> Header:
    """Read and validate the safetensors header of a file (path or binary file object).

    A file object is read from offset 0 when it is seekable. Raises :class:`HeaderError` (a
    ``ValueError``) naming the file when the header is malformed.
    """
    if isinstance(path_or_fileobj, (str, bytes, os.PathLike)):
        with open(path_or_fileobj, "rb") as f:
            return _read_header_from(f, _where(path_or_fileobj), strict)
    f = path_or_fileobj
    where = _where(getattr(f, "name", None) or "<file object>")
    try:
        if f.seekable():
            f.seek(0)
    except (AttributeError, OSError):
        pass
    return _read_header_from(f, where, strict)


def _read_header_from(f: BinaryIO, where: str, strict: bool) -> Header:
    size = _file_size(f)
    prefix = _read_exact(f, 8)
    n = _check_prefix(prefix, size, where)
    raw = _read_exact(f, n)
    if len(raw) != n:
        raise HeaderError(f"{where}: invalid safetensors header: file ends inside the header",
                          "truncated")
    h = _parse_header_json(raw, n, size, where, strict)
    return Header(h.header_size, h.tensors, h.metadata, h.file_size, where)


def open_direct(path: PathLike) -> int:
    """Open ``path`` read-only with ``O_DIRECT`` (and ``O_CLOEXEC``); a plain read-only open
    where the file system refuses ``O_DIRECT`` (``EINVAL``: some tmpfs and overlay setups) or
    the platform has no such flag. Returns the descriptor; the caller closes it.

    On a weightfs mount an ``O_DIRECT`` open answers at once, and reads of the header do too,
    while a pushed version's host image is still filling from the GPU (docs/PROTOCOL.md §8);
    a plain open waits for the fill (seconds for a large model).
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        try:
            return os.open(path, flags | direct)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    return os.open(path, flags)


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (fewer only at the end of the file), by ``os.pread`` of
    exactly that range. A file system that wants aligned ``O_DIRECT`` transfers (a local disk)
    answers ``EINVAL``: ``O_DIRECT`` is then cleared on the descriptor and the read retried."""
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = os.pread(fd, n - len(buf), offset + len(buf))
        except OSError as e:
            if e.errno != errno.EINVAL or not _clear_direct(fd):
                raise
            continue
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _clear_direct(fd: int) -> bool:
    """Clear ``O_DIRECT`` on ``fd``; False when it was not set (or cannot be cleared)."""
    direct = getattr(os, "O_DIRECT", 0)
    try:
        import fcntl

        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        if not direct or not fl & direct:
            return False
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~direct)
    except (ImportError, OSError):
        return False
    return True


def read_header_direct(path_or_fd: PathLike | int, *, strict: bool = True,
                       path: PathLike | None = None) -> Header:
    """Read and validate the safetensors header of a file without reading anything past it.

    ``path_or_fd``: a path, opened with :func:`open_direct` (``O_DIRECT``, falling back to a
    plain open on ``EINVAL``) and closed again, or an open descriptor (``path`` then names the
    file in errors). The 8-byte prefix and the header are read with ``os.pread`` of exactly
    those ranges: no buffered read-ahead reaches the tensor bytes, which on a weightfs mount
    may wait for a pushed version's host image to fill (docs/PROTOCOL.md §8). Use it where the
    headers are all that is read (the tensors come from the GPU slabs); a file read for its
    tensor bytes is better read normally.
    """
    if isinstance(path_or_fd, int) and not isinstance(path_or_fd, bool):
        return _read_header_fd(path_or_fd, _where(path if path is not None else path_or_fd),
                               strict)
    fd = open_direct(path_or_fd)
    try:
        return _read_header_fd(fd, _where(path if path is not None else path_or_fd), strict)
    finally:
        os.close(fd)


def _read_header_fd(fd: int, where: str, strict: bool) -> Header:
    try:
        size: int | None = os.fstat(fd).st_size
    except OSError:
        size = None
    prefix = _pread_exact(fd, 8, 0)
    n = _check_prefix(prefix, size, where)
    raw = _pread_exact(fd, n, 8)
    if len(raw) != n:
        raise HeaderError(f"{where}: invalid safetensors header: file ends inside the header",
                          "truncated")
    h = _parse_header_json(raw, n, size, where, strict)
    return Header(h.header_size, h.tensors, h.metadata, h.file_size, where)


# --------------------------------------------------------------------------------------------
# slab layout


@dataclass(frozen=True)
class SlabEntry:
    """Where one tensor lives in a GPU slab (``offset`` in bytes from the slab's start)."""

    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def slab_layout(header: Header | Mapping[str, TensorInfo],
                align: int = DEFAULT_ALIGN) -> dict[str, SlabEntry]:
    """Place the tensors of ``header`` in a slab by the slab layout rule, stated once in
    docs/PROTOCOL.md §2 ("The slab layout rule"): tensors in ascending order of (data_offsets
    begin, end, name as UTF-8 bytes); the first starts at 0, each next one at the previous
    one's end rounded up to ``align``. The result is ordered by that rule. The conformance
    corpus (store/safetensors/testdata/conformance) pins the offsets.
    """
    if not _is_int(align) or align <= 0:
        raise ValueError(f"align must be a positive integer, got {align!r}")
    tensors = header.tensors if isinstance(header, Header) else header
    out: dict[str, SlabEntry] = {}
    prev_end: int | None = None
    for t in sorted(tensors.values(), key=_rule_order):
        off = 0 if prev_end is None else -(-prev_end // align) * align
        out[t.name] = SlabEntry(off, t.nbytes, t.dtype, t.shape)
        prev_end = off + t.nbytes
    return out


def slab_end(layout: Mapping[str, SlabEntry]) -> int:
    """Bytes a slab needs for ``layout`` (end of its last tensor; 0 when empty)."""
    return max((e.end for e in layout.values()), default=0)


def slab_size(layout: Mapping[str, SlabEntry], align: int = DEFAULT_ALIGN) -> int:
    """The layout's size by the rule: :func:`slab_end` rounded up to ``align``, at least
    ``align`` (what the daemon's ``store.SlabLayout`` returns; the allocation, ``slab_bytes``,
    may be larger still)."""
    return max(-(-slab_end(layout) // align) * align, align)


def torch_dtype_name(dtype: str) -> str:
    """Name of the torch dtype for a safetensors dtype (``getattr(torch, name)``)."""
    if dtype not in TORCH_DTYPE_NAMES:
        raise UnsupportedDtypeError(f"unknown safetensors dtype {dtype!r}")
    name = TORCH_DTYPE_NAMES[dtype]
    if name is None:
        raise UnsupportedDtypeError(
            f"safetensors dtype {dtype} ({DTYPE_BITS[dtype]}-bit) has no torch dtype; "
            "load such tensors with a library that unpacks sub-byte formats")
    return name


# --------------------------------------------------------------------------------------------
# user.weightfs.cuda


def normalize_gpu_uuid(gpu: str) -> str:
    """``"GPU-ABC..."`` -> ``"abc..."``: the form ``str(torch.cuda.get_device_properties(i).uuid)``
    prints."""
    u = gpu.strip().lower()
    return u[4:] if u.startswith("gpu-") else u


@dataclass(frozen=True)
class Replica:
    """A slab of a weights file on one GPU."""

    gpu: str  # "GPU-<uuid>", as NVML prints it
    handle: bytes  # the 64-byte CUipcMemHandle of the slab
    slab_bytes: int

    @property
    def uuid(self) -> str:
        """The GPU UUID in lower case, without the ``GPU-`` prefix."""
        return normalize_gpu_uuid(self.gpu)


@dataclass(frozen=True)
class Manifest:
    """The decoded ``user.weightfs.cuda`` record of one weights file."""

    schema: int
    file_size: int
    data_offset: int
    align: int
    replicas: tuple[Replica, ...]
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def layout(self, header: Header) -> dict[str, SlabEntry]:
        """The slab layout of ``header`` after checking that this manifest describes that file
        (same size and data offset, every slab large enough). Raises :class:`ManifestError`."""
        where = _where(self.path or header.path)
        if header.file_size is not None and header.file_size != self.file_size:
            raise ManifestError(f"{where}: {XATTR_CUDA}: file_size {self.file_size} does not match "
                                f"the file ({header.file_size} bytes)")
        if header.data_offset != self.data_offset:
            raise ManifestError(f"{where}: {XATTR_CUDA}: data_offset {self.data_offset} does not "
                                f"match the file's header ({header.data_offset})")
        layout = slab_layout(header, self.align)
        need = slab_end(layout)
        for r in self.replicas:
            if r.slab_bytes < need:
                raise ManifestError(f"{where}: {XATTR_CUDA}: slab on {r.gpu} has {r.slab_bytes} "
                                    f"bytes, the layout needs {need}")
        return layout


def parse_cuda_manifest(data: bytes | str, path: PathLike | None = None) -> Manifest:
    """Decode a ``user.weightfs.cuda`` value. Raises :class:`ManifestError` (a ``ValueError``)
    naming ``path`` when the value is malformed."""
    where = _where(path)

    def fail(msg: str) -> ManifestError:
        return ManifestError(f"{where}: malformed {XATTR_CUDA}: {msg}")

    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        obj = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise fail("not a JSON object")
    schema = obj.get("schema")
    if not _is_int(schema) or schema != 1:
        raise fail(f"unsupported schema {schema!r} (this weightfs package reads schema 1)")

    def nonneg(key: str, src: dict[str, Any], ctx: str = "") -> int:
        v = src.get(key)
        if not _is_int(v) or v < 0:
            raise fail(f"{ctx}{key} must be a non-negative integer, got {v!r}")
        return v

    file_size = nonneg("file_size", obj)
    data_offset = nonneg("data_offset", obj)
    if data_offset < 8 or data_offset > file_size:
        raise fail(f"data_offset {data_offset} is outside 8..file_size ({file_size})")
    align = obj.get("align", DEFAULT_ALIGN)
    if not _is_int(align) or align <= 0 or align & (align - 1):
        raise fail(f"align must be a positive power of two, got {align!r}")
    reps = obj.get("replicas", [])
    if not isinstance(reps, list):
        raise fail("replicas is not a list")
    replicas = []
    for i, r in enumerate(reps):
        ctx = f"replicas[{i}]."
        if not isinstance(r, dict):
            raise fail(f"replicas[{i}] is not an object")
        gpu = r.get("gpu")
        if not isinstance(gpu, str) or not normalize_gpu_uuid(gpu):
            raise fail(f"{ctx}gpu must be a GPU UUID string, got {gpu!r}")
        h = r.get("handle")
        if not isinstance(h, str):
            raise fail(f"{ctx}handle must be a base64 string")
        try:
            handle = base64.b64decode(h, validate=True)
        except (binascii.Error, ValueError) as e:
            raise fail(f"{ctx}handle is not valid base64 ({e})") from None
        if len(handle) != IPC_HANDLE_SIZE:
            raise fail(f"{ctx}handle decodes to {len(handle)} bytes, expected {IPC_HANDLE_SIZE}")
        slab_bytes = nonneg("slab_bytes", r, ctx)
        replicas.append(Replica(gpu=gpu, handle=handle, slab_bytes=slab_bytes))
    known = {"schema", "file_size", "data_offset", "align", "replicas"}
    extra = {k: v for k, v in obj.items() if k not in known}
    return Manifest(schema=schema, file_size=file_size, data_offset=data_offset, align=align,
                    replicas=tuple(replicas), path=None if path is None else where, extra=extra)


_NO_XATTR = {errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP}
if hasattr(errno, "ENOATTR"):  # pragma: no cover - BSD spelling
    _NO_XATTR.add(errno.ENOATTR)


def read_cuda_manifest(path: PathLike | int) -> Manifest | None:
    """Read ``user.weightfs.cuda`` of ``path`` (a path or an open file descriptor).

    Returns ``None`` when the file has no GPU replica (attribute absent, or a filesystem or
    platform without extended attributes). Raises :class:`ManifestError` naming the path when
    the record is malformed; ``PermissionError`` when the daemon refuses the handles to this
    user; ``FileNotFoundError`` and other ``OSError`` as ``os.getxattr`` does.
    """
    getxattr = getattr(os, "getxattr", None)
    if getxattr is None:  # not Linux
        return None
    try:
        raw = getxattr(path, XATTR_CUDA)
    except OSError as e:
        if e.errno in _NO_XATTR:
            return None
        raise
    return parse_cuda_manifest(raw, path)
