"""The cluster's Redis schema and placement as pure functions (no processes)."""

from __future__ import annotations

import pytest

from cachesvc.wire.cluster import IndexRecord, Keys, Member, parsed, rendezvous
from cachesvc.wire.keys import EntryId, Tier
from cachesvc.wire.layout import Layout


def record(**changes) -> IndexRecord:
    base = dict(producer="smollm2/ft@v1", node_id="n1", entry_id=EntryId(bytes(range(16))), position_offset=512,
                layout=Layout(256, tuple(range(30)), tuple(range(30)), (0, 20, 21)), tier=Tier.MEMORY,
                weights_digest="abcdef0123", incarnation=1796109021905)
    return IndexRecord(**(base | changes))


@pytest.mark.parametrize("rec", [record(), record(chunk_hash=bytes(32)), record(layout=Layout(3, (), (5,), ()))])
def test_index_records_round_trip(rec):
    assert IndexRecord.parse(rec.field, rec.value()) == rec
    assert IndexRecord.parse(rec.field.encode(), rec.value().encode()) == rec
    assert parsed(rec.field.encode(), rec.value().encode()) == rec


@pytest.mark.parametrize("field, value", [
    ("p\x1fn", record().value()),                                  # too few parts in the field
    (record().field[:-2], record().value()),                       # entry id of 15 bytes
    (record().field, "1 2 3"),                                     # too few values
    (record().field, record().value() + " 00 extra"),              # trailing tokens
    (record().field, record().value().replace("512", "x")),        # not a number
])
def test_malformed_index_records_are_refused(field, value):
    with pytest.raises(ValueError):
        IndexRecord.parse(field, value)


def test_members_round_trip_and_keys_separate_tenants():
    member = Member("n1", "10.0.0.1:7070", "boot", 7, 123, {"tcp": b"10.0.0.1:7071", "ucx": b"\x00\xff"})
    assert Member.from_json(member.to_json()) == member
    keys = Keys("cs")
    assert keys.chunk("a", "f", b"h" * 32) != keys.chunk("b", "f", b"h" * 32)
    assert keys.chunk("a", "f", b"h" * 32).startswith(b"cs:ix:")
    assert keys.tails("a", "f", b"h" * 32).startswith(b"cs:tl:")
    with pytest.raises(ValueError):
        Keys("a:b")


def test_rendezvous_moves_only_what_a_change_must():
    nodes = [f"n{i}" for i in range(5)]
    keys = [bytes([i, j]) for i in range(40) for j in range(5)]
    before = {k: rendezvous(k, nodes, 2) for k in keys}
    assert all(len(set(v)) == 2 for v in before.values())
    after = {k: rendezvous(k, nodes[:-1], 2) for k in keys}           # n4 leaves
    for k in keys:
        if "n4" not in before[k]:
            assert after[k] == before[k]                              # untouched
        else:
            assert set(before[k]) - {"n4"} <= set(after[k])           # the survivor stays
    joined = {k: rendezvous(k, [*nodes, "n5"], 2) for k in keys}      # n5 joins
    moved = sum(set(joined[k]) != set(before[k]) for k in keys)
    assert all("n5" in joined[k] for k in keys if set(joined[k]) != set(before[k]))
    assert 0.2 < moved / len(keys) < 0.5                              # about 2 of 6 placements
