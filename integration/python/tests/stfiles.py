"""Hand-built safetensors files for the tests (struct + json, no library)."""

from __future__ import annotations

import json
import os
import struct
import sys

# Make the package importable without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(tensors, metadata=None, pad_to=None, order=None) -> bytes:
    """tensors: {name: (dtype, shape, raw_bytes)} laid out back to back in ``order`` (default:
    dict order). Returns the whole file. ``pad_to`` pads the JSON with spaces so the data starts
    at a multiple of it."""
    names = order or list(tensors)
    hdr, data = {}, b""
    if metadata is not None:
        hdr["__metadata__"] = metadata
    offs = {}
    for n in names:
        dtype, shape, raw = tensors[n]
        offs[n] = (dtype, shape, [len(data), len(data) + len(raw)])
        data += raw
    # JSON key order is independent of the data order: emit in reverse to prove it.
    for n in reversed(names):
        dtype, shape, o = offs[n]
        hdr[n] = {"dtype": dtype, "shape": list(shape), "data_offsets": o}
    return raw_file(json.dumps(hdr).encode(), data, pad_to)


def raw_file(header_json: bytes, data: bytes, pad_to=None) -> bytes:
    if pad_to:
        total = 8 + len(header_json)
        header_json += b" " * (-total % pad_to)
    return struct.pack("<Q", len(header_json)) + header_json + data


def f32(*xs) -> bytes:
    return struct.pack(f"<{len(xs)}f", *xs)


def bf16(*xs) -> bytes:
    # bf16 = upper half of the float32 bits (exact for the values used in tests)
    return b"".join(struct.pack("<I", struct.unpack("<I", struct.pack("<f", x))[0])[2:] for x in xs)


def i64(*xs) -> bytes:
    return struct.pack(f"<{len(xs)}q", *xs)


def f16(*xs) -> bytes:
    return struct.pack(f"<{len(xs)}e", *xs)


def f64(*xs) -> bytes:
    return struct.pack(f"<{len(xs)}d", *xs)


# The files used across the tests.

def simple() -> bytes:
    return build({
        "a": ("F32", [2, 2], f32(1, 2, 3, 4)),
        "b": ("I64", [3], i64(-1, 0, 7)),
    }, metadata={"format": "pt"})


def unaligned() -> bytes:
    """A 3-element BF16 tensor followed by an F32 tensor: the F32 data starts at data offset 6."""
    return build({
        "x": ("BF16", [3], bf16(1.0, -2.0, 0.5)),
        "y": ("F32", [2], f32(3.25, -8.0)),
    })


def mixed() -> bytes:
    """Zero-size and 0-rank tensors, a tie on the begin offset, JSON order != data order."""
    return build({
        "w1": ("U8", [10], bytes(range(10))),
        "e": ("F32", [0, 3], b""),
        "w2": ("F16", [2, 2], f16(1, 2, 3, 4)),
        "s": ("F64", [], f64(6.5)),
    }, metadata={"format": "pt"}, pad_to=4096)
