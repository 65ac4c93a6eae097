"""Copy-light encoding of the two bulk messages, ``WriteChunk`` and ``SlabRun``.

The bytes on the wire are ordinary protobuf, so any gRPC client of the .proto works;
only the Python server and SDK build and read them by hand. Protobuf lets fields come
in any order, so a message is its small header (every field but the payload, serialized
by protobuf) followed by the payload field (tag, length, raw bytes). Encoding copies
the payload once, straight from the arena or the caller's arrays; decoding hands it
back as a ``memoryview`` of the received buffer, with no copy. Going through the
generated classes instead costs three to four payload copies per message (measured:
the gRPC get path ran at 0.19 GB/s, bound by those copies).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from typing import Protocol

from google.protobuf.message import DecodeError

from cachesvc.v1 import cachesvc_pb2 as pb

_LEN = 2   # protobuf wire type of bytes fields
WRITE_DATA_FIELD = pb.WriteChunk.DESCRIPTOR.fields_by_name["data"].number
RUN_DATA_FIELD = pb.SlabRun.DESCRIPTOR.fields_by_name["data"].number


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def encode(header: bytes, data_field: int, parts: Sequence[bytes | memoryview]) -> bytes:
    """``header`` (a serialized message without its payload) + the payload field."""
    size = sum(len(p) for p in parts)
    return b"".join((header, _varint(data_field << 3 | _LEN), _varint(size), *parts))


def split(raw: bytes, data_field: int) -> tuple[bytes, memoryview]:
    """(header bytes without the payload field, payload view). Raises ValueError on a
    malformed message. Handles the payload field anywhere, and absent (empty)."""
    buf = memoryview(raw)
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos)
            if field == data_field:
                end = pos + length
                if end > len(buf):
                    raise ValueError("payload runs past the message")
                return bytes(buf[:start]) + bytes(buf[end:]), buf[pos:end]
            pos += length
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("field runs past the message")
    return raw, memoryview(b"")


@dataclass(frozen=True, slots=True)
class WriteChunkView:
    reservation_id: str
    entry_index: int
    offset: int
    data: memoryview


def encode_write_chunk(reservation_id: str, entry_index: int, offset: int,
                       parts: Sequence[bytes | memoryview]) -> bytes:
    head = pb.WriteChunk(reservation_id=reservation_id, entry_index=entry_index,
                         offset=offset).SerializeToString()
    return encode(head, WRITE_DATA_FIELD, parts)


def decode_write_chunk(raw: bytes) -> WriteChunkView:
    """ValueError on a malformed message (the payload field or the rest of it)."""
    head, data = split(raw, WRITE_DATA_FIELD)
    msg = _parse(pb.WriteChunk, head)
    return WriteChunkView(msg.reservation_id, msg.entry_index, msg.offset, data)


def encode_slab_run(header: pb.SlabRun, data: bytes | memoryview) -> bytes:
    return encode(header.SerializeToString(), RUN_DATA_FIELD, (data,))


def decode_slab_run(raw: bytes) -> tuple[pb.SlabRun, memoryview]:
    """ValueError on a malformed message."""
    head, data = split(raw, RUN_DATA_FIELD)
    return _parse(pb.SlabRun, head), data


def _parse(message_type, raw: bytes):
    """``message_type.FromString(raw)``, with protobuf's DecodeError (not a ValueError)
    as ValueError, the one error the decoders here raise for bad bytes."""
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        raise ValueError(f"not a {message_type.__name__}: {exc}") from None


class RunFields(Protocol):
    """What a read run (the node's ``ReadRun``) says about itself, payload aside."""

    entry_index: int
    kind: int
    layer_start: int
    num_layers: int
    checksums: tuple[int, ...]
    missing_reason: str


def slab_run_header(run: RunFields) -> pb.SlabRun:
    """The SlabRun of a read run, without its payload (both transports send the payload
    their own way)."""
    return pb.SlabRun(entry_index=run.entry_index, kind=int(run.kind), layer_start=run.layer_start,
                      num_layers=run.num_layers, checksums=run.checksums,
                      missing=bool(run.missing_reason), missing_reason=run.missing_reason)


def passthrough(data: bytes) -> bytes:
    """gRPC (de)serializer for messages already framed by this module."""
    return data
