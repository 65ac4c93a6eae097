"""The disk tier across restarts, torn and rotten files, and SIGTERM draining."""

from __future__ import annotations

import signal

import pytest

from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc.v1 import cachesvc_pb2_grpc as pb_grpc
from cachesvc_client import CacheClient, Kind, UnavailableError
from conftest import TINY, make_entry, same_bytes


def _fill(client: CacheClient, rng, n: int, producer="p"):
    reg = client.register_model(producer, "0123abcd", TINY)
    hashes = client.hash_tokens(list(range(n * 256)), reg.family_id)
    entries = [make_entry(rng, TINY, h, 256) for h in hashes]
    client.put(reg.family_id, producer, entries)
    return reg.family_id, hashes, entries


def _check_all(client: CacheClient, fid, hashes, entries) -> None:
    hit = client.lookup(fid, hashes).best()
    assert hit is not None and hit.num_chunks == len(entries)
    got = client.get(fid, hit.entries, (Kind.K, Kind.V, Kind.E))
    assert got.complete and got.valid_chunks == len(entries)
    for i, entry in enumerate(entries):
        for (kind, layer), arr in entry.slabs.items():
            assert same_bytes(got.arrays[kind][layer, i * 256:(i + 1) * 256], arr)


@pytest.mark.parametrize("mode", ["write_through", "spill"])
def test_restart_keeps_every_committed_entry(server_factory, rng, mode):
    srv = server_factory("--memory-bytes", "64MiB", "--disk-mode", mode)
    with CacheClient(srv.address) as client:
        fid, hashes, entries = _fill(client, rng, 40)
    assert srv.stop(signal.SIGTERM) == 0
    again = server_factory("--memory-bytes", "64MiB", "--disk-mode", mode, workdir=srv.workdir)
    with CacheClient(again.address) as client:
        assert client.stats()["disk"]["entries"] == 40
        _check_all(client, fid, hashes, entries)       # readable and checksum-clean


def test_a_partial_chunk_is_still_offered_after_a_restart(server_factory, rng):
    """The parent a partial chunk was put with is in its file: after a restart from the
    disk tier, a prompt continuing past the stored context still reaches all of it."""
    import dataclasses
    from cachesvc.wire.keys import chunk_hashes
    srv = server_factory("--memory-bytes", "64MiB", "--disk-mode", "write_through")
    context = list(range(300))
    with CacheClient(srv.address) as client:
        reg = client.register_model("p", "0123abcd", TINY)
        hashes = chunk_hashes(context, reg.family_id, include_partial=True)
        client.put(reg.family_id, "p", [make_entry(rng, TINY, hashes[0], 256), dataclasses.replace(
            make_entry(rng, TINY, hashes[1], 44), parent_hash=hashes[0])])
        assert client.lookup_prompt(reg.family_id, context + [1, 2]).best().num_tokens == 300
    assert srv.stop(signal.SIGTERM) == 0
    again = server_factory("--memory-bytes", "64MiB", "--disk-mode", "write_through", workdir=srv.workdir)
    with CacheClient(again.address) as client:
        assert client.lookup_prompt(reg.family_id, context + [1, 2]).best().num_tokens == 300


def test_torn_file_is_dropped_on_start(server_factory, rng):
    srv = server_factory("--memory-bytes", "64MiB")
    with CacheClient(srv.address) as client:
        fid, hashes, entries = _fill(client, rng, 6)
    srv.stop()
    files = sorted((srv.data_dir / "entries").glob("*/*.ent"))
    assert len(files) == 6
    victim = files[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])   # torn write
    again = server_factory("--memory-bytes", "64MiB", workdir=srv.workdir)
    assert '"dropped_torn": 1' in again.log()
    assert not victim.exists()
    with CacheClient(again.address) as client:
        assert client.stats()["entries"] == 5
        hit = client.lookup(fid, hashes).best()
        got = client.get(fid, hit.entries, (Kind.K,))
        assert got.valid_chunks == hit.num_chunks      # what survives is clean


def test_rotten_payload_is_a_miss_never_wrong_data(server_factory, rng):
    srv = server_factory("--memory-bytes", "64MiB")
    with CacheClient(srv.address) as client:
        fid, hashes, entries = _fill(client, rng, 3)
    srv.stop()
    again = server_factory("--memory-bytes", "64MiB", workdir=srv.workdir)
    with CacheClient(again.address) as client:
        hit = client.lookup(fid, hashes).best()
        path = (again.data_dir / "entries" / hit.entries[1].entry_id.hex()[:2] /
                f"{hit.entries[1].entry_id.hex()}.ent")
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x5A                       # one rotten byte mid-payload
        path.write_bytes(bytes(raw))
        got = client.get(fid, hit.entries, (Kind.K, Kind.V, Kind.E))
        assert got.valid_chunks == 1                      # chunk 0 fine, chunk 1 is a miss
        assert any(m.entry_index == 1 and "checksum" in m.reason for m in got.missing)
        for (kind, layer), arr in entries[2].slabs.items():   # chunk 2 still delivered intact
            assert same_bytes(got.arrays[kind][layer, 512:768], arr)
        assert client.stats()["counters"]["checksum_failures"] == 1
        assert client.lookup(fid, hashes).best().num_chunks == 1   # dropped from the index


def test_sigterm_drains_in_flight_reads(server_factory, rng):
    """SIGTERM after a GetSlabs stream has started: the stream still completes, the
    server then exits 0 and refuses new calls."""
    srv = server_factory("--memory-bytes", "512MiB", "--disk-mode", "off")
    with CacheClient(srv.address) as client:
        fid, hashes, entries = _fill(client, rng, 200)
        hit = client.lookup(fid, hashes).best()
        stub = pb_grpc.CacheServiceStub(client._channel)
        stream = stub.GetSlabs(pb.GetSlabsRequest(
            family_id=fid, entry_ids=[e.entry_id for e in hit.entries], kinds=[1, 2, 3]), timeout=30)
        received = [next(stream)]                          # the stream is in flight
        srv.proc.send_signal(signal.SIGTERM)
        received.extend(stream)
        assert srv.proc.wait(30) == 0
        assert sum(len(r.data) for r in received) == sum(
            a.nbytes for e in entries for a in e.slabs.values())
        assert not any(r.missing for r in received)
        with pytest.raises(UnavailableError):
            client.stats()
