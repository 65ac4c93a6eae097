"""LMCache's ``lm://`` remote protocol, byte for byte (LMCache 0.5.6,
``lmcache/v1/protocol.py``): what our node's LMCache endpoint and the tests' raw clients
speak. No torch: dtypes travel as LMCache's integer codes.

A connection carries requests one after another, each answered in order:

- request header, 186 bytes: command, length, fmt, dtype, location, shape[4] (int32
  little-endian each), then the key as 150 bytes of UTF-8 right-padded with spaces;
- PUT is followed by ``length`` payload bytes and has **no reply**;
- GET is answered by a response header (36 bytes: code, length, fmt, dtype, shape[4],
  location: note the other order) and, on a hit (code 200), ``length`` payload bytes;
- EXIST and HEALTH are answered by a response header alone (200 yes / 400 no);
- LIST (unimplemented by LMCache's own server) is answered here by a 200 header whose
  ``length`` bytes follow: the stored keys, newline-separated.

cachesvc adds three commands for its LMCache L2 adapter (numbered far from LMCache's,
header-only, answered by a response header; LMCache's own clients never send them):

- LOCK: hold the key's entry (no eviction) for ``length`` seconds (0: the default
  lease); 200 when held, 400 when absent. Locks of one key stack.
- UNLOCK: let go of one LOCK of the key (200, also when none was held: unlocks must
  always succeed, and an expired lease has let go by itself).
- DELETE: drop the key's entry; 200 when there was one.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from cachesvc.wire.keys import DType

REQUEST = struct.Struct("<9i150s")
RESPONSE = struct.Struct("<9i")
MAX_KEY_BYTES = 150
SUCCESS = 200
FAIL = 400


class Command(enum.IntEnum):
    PUT = 1
    GET = 2
    EXIST = 3
    LIST = 4
    HEALTH = 5
    LOCK = 101      # cachesvc extensions (see the module docstring)
    UNLOCK = 102
    DELETE = 103


class Format(enum.IntEnum):
    """LMCache's ``MemoryFormat`` values (the ones whose layout we know by name)."""

    UNDEFINED = 0
    KV_2LTD = 1       # [2, layers, tokens, hidden]: K of every layer, then V
    KV_T2D = 2        # [tokens, 2, hidden]
    KV_2TD = 3        # [2, tokens, hidden]: one layer
    BINARY = 4
    BINARY_BUFFER = 5
    KV_MLA_FMT = 6    # [1, layers, tokens, hidden]


# LMCache's dtype codes. 1 and 2 are both float16 (torch.half and torch.float16); LMCache
# itself answers 2. Code 5 (float64) has no slab dtype here and is refused.
DTYPE_OF_CODE = {1: DType.FLOAT16, 2: DType.FLOAT16, 3: DType.BFLOAT16, 4: DType.FLOAT32,
                 6: DType.UINT8, 7: DType.FLOAT8_E4M3FN, 8: DType.FLOAT8_E5M2}
CODE_OF_DTYPE = {DType.FLOAT16: 2, DType.BFLOAT16: 3, DType.FLOAT32: 4, DType.UINT8: 6,
                 DType.FLOAT8_E4M3FN: 7, DType.FLOAT8_E5M2: 8}


class LmProtocolError(ValueError):
    """A request that cannot be followed: the connection is closed (the stream can no
    longer be trusted to be in step)."""


@dataclass(frozen=True, slots=True)
class Request:
    command: Command
    length: int                       # payload bytes that follow (PUT only)
    fmt: int
    dtype_code: int
    location: int
    shape: tuple[int, int, int, int]  # padded with zeros, as sent
    key: str


def parse_request(header: bytes) -> Request:
    """A request header; raises LmProtocolError naming what is wrong."""
    command, length, fmt, dtype_code, location, s0, s1, s2, s3, raw_key = REQUEST.unpack(header)
    try:
        cmd = Command(command)
    except ValueError:
        raise LmProtocolError(f"unknown command {command}") from None
    if length < 0:
        raise LmProtocolError(f"negative length {length}")
    try:
        key = raw_key.decode("utf-8").rstrip(" \0")
    except UnicodeDecodeError:
        raise LmProtocolError("key is not UTF-8") from None
    if any(ord(c) < 0x20 or c == "\x7f" for c in key):
        # LMCache's keys are model@world@worker@hash@dtype; a newline in one would split
        # it in two in LIST's newline-separated answer (found by tests/test_fuzz.py).
        raise LmProtocolError("key holds control characters")
    return Request(cmd, length, fmt, dtype_code, location, (s0, s1, s2, s3), key)


def pack_request(command: int, key: str, length: int = 0, fmt: int = 1, dtype_code: int = 0,
                 shape: tuple[int, ...] = (0, 0, 0, 0), location: int = 0) -> bytes:
    raw = key.encode("utf-8")
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError(f"key is {len(raw)} bytes, at most {MAX_KEY_BYTES}")
    padded = (tuple(shape) + (0, 0, 0, 0))[:4]
    return REQUEST.pack(command, length, fmt, dtype_code, location, *padded, raw.ljust(MAX_KEY_BYTES))


def pack_response(code: int, length: int = 0, fmt: int = 1, dtype_code: int = 2,
                  shape: tuple[int, ...] = (0, 0, 0, 0), location: int = 0) -> bytes:
    padded = (tuple(shape) + (0, 0, 0, 0))[:4]
    return RESPONSE.pack(code, length, fmt, dtype_code, *padded, location)


@dataclass(frozen=True, slots=True)
class Response:
    code: int
    length: int
    fmt: int
    dtype_code: int
    shape: tuple[int, int, int, int]
    location: int


def parse_response(header: bytes) -> Response:
    code, length, fmt, dtype_code, s0, s1, s2, s3, location = RESPONSE.unpack(header)
    return Response(code, length, fmt, dtype_code, (s0, s1, s2, s3), location)


def model_of_key(key: str) -> str:
    """The model name of an LMCache key (``model@world_size@worker_id@hash@dtype[@...]``);
    raises LmProtocolError for a key of another shape."""
    parts = key.split("@")
    if len(parts) < 5 or not parts[0]:
        raise LmProtocolError(f"key {key[:60]!r} is not model@world_size@worker_id@hash@dtype[@...]")
    try:
        int(parts[1])
        int(parts[2])
        int(parts[3], 16)
    except ValueError:
        raise LmProtocolError(f"key {key[:60]!r}: world size, worker id or chunk hash is not a number") from None
    return parts[0]
