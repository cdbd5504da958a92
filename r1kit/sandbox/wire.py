"""The sandbox's wire format, shared by the parent and the boxes: length-prefixed JSON frames over pipes, and a
codec for *plain data* (what a candidate function may return). Standard library only: server.py loads it by path.
"""
from __future__ import annotations

import json
import os
import select
import struct
import time

MAX_FRAME = 64 << 20


def write_frame(fd: int, obj) -> None:
    data = json.dumps(obj).encode()
    view = memoryview(struct.pack("<Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def read_exact(fd: int, n: int, deadline: float | None = None) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("no data before the deadline")
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, deadline: float | None = None, limit: int = MAX_FRAME):
    (n,) = struct.unpack("<Q", read_exact(fd, 8, deadline))
    if n > limit:
        raise ValueError(f"message of {n} bytes exceeds the {limit}-byte limit")
    return json.loads(read_exact(fd, n, deadline))


def encode(x, depth: int = 0):
    """Plain data -> JSON-able tree; anything else raises TypeError. Exact types only (no subclasses)."""
    if depth > 100:
        raise TypeError("value nested deeper than 100 levels")
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return x if -(2**53) < x < 2**53 else {"i": str(x)}
    if t is float:
        return {"x": repr(x)}
    if t is list:
        return [encode(v, depth + 1) for v in x]
    if t in (tuple, set, frozenset):
        items = [encode(v, depth + 1) for v in x]
        return {{tuple: "t", set: "s", frozenset: "f"}[t]: items}
    if t is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]}
    if t is bytes:
        return {"b": x.hex()}
    if t is complex:
        return {"c": [repr(x.real), repr(x.imag)]}
    raise TypeError(f"a {t.__module__}.{t.__qualname__} is not plain data")


def decode(x, depth: int = 0):
    """The inverse of `encode`, building fresh built-in objects; malformed input raises ValueError."""
    if depth > 100:
        raise ValueError("value nested deeper than 100 levels")
    if x is None or type(x) in (bool, str, int):
        return x
    if type(x) is list:
        return [decode(v, depth + 1) for v in x]
    if type(x) is not dict or len(x) != 1:
        raise ValueError("malformed plain-data message")
    (tag, v), = x.items()
    if tag == "i":
        return int(v)
    if tag == "x":
        return float(v)
    if tag in ("t", "s", "f"):
        items = [decode(e, depth + 1) for e in v]
        return {"t": tuple, "s": set, "f": frozenset}[tag](items)
    if tag == "d":
        return {decode(k, depth + 1): decode(val, depth + 1) for k, val in v}
    if tag == "b":
        return bytes.fromhex(v)
    if tag == "c":
        return complex(float(v[0]), float(v[1]))
    raise ValueError(f"unknown plain-data tag {tag!r}")
