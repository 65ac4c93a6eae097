"""The hand-framed bulk messages are byte-for-byte ordinary protobuf."""

import pytest

from cachesvc.wire import framing
from cachesvc.v1 import cachesvc_pb2 as pb


def test_write_chunk_round_trips_through_protobuf():
    parts = [b"abc", memoryview(b"defg"), b""]
    raw = framing.encode_write_chunk("r1", 3, 4096, parts)
    msg = pb.WriteChunk.FromString(raw)                       # a standard parser reads it
    assert (msg.reservation_id, msg.entry_index, msg.offset, msg.data) == ("r1", 3, 4096, b"abcdefg")
    view = framing.decode_write_chunk(msg.SerializeToString())   # and we read theirs
    assert (view.reservation_id, view.entry_index, view.offset, bytes(view.data)) == \
        ("r1", 3, 4096, b"abcdefg")


def test_slab_run_round_trip_and_zero_copy():
    header = pb.SlabRun(entry_index=1, kind=2, layer_start=5, num_layers=2, checksums=[7, 9])
    payload = bytes(range(256)) * 1000
    raw = framing.encode_slab_run(header, memoryview(payload))
    assert pb.SlabRun.FromString(raw) == pb.SlabRun(entry_index=1, kind=2, layer_start=5,
                                                    num_layers=2, checksums=[7, 9], data=payload)
    head, data = framing.decode_slab_run(raw)
    assert head == header and data.obj is raw and bytes(data) == payload   # a view, not a copy
    missing = pb.SlabRun(entry_index=0, kind=1, missing=True, missing_reason="gone")
    head, data = framing.decode_slab_run(missing.SerializeToString())
    assert head == missing and len(data) == 0


@pytest.mark.parametrize("raw", [b"\x32\xff", b"\x32\x05ab", b"\x0f", b"\x08\xff\xff"])
def test_malformed_is_value_error(raw):
    with pytest.raises(ValueError):
        framing.split(raw, framing.RUN_DATA_FIELD)
