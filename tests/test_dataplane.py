"""The socket data plane: every transport byte-identical, layer streaming, dead peers,
rotten bytes, and the shared-memory hold/release protocol."""

from __future__ import annotations

import dataclasses
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import numpy as np
import pytest
import torch

from cachesvc.wire.protocol import FrameType, Op, pack_request, read_frame, unpack_runs
from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc.v1 import cachesvc_pb2_grpc as pb_grpc
from cachesvc_client import (CacheClient, CacheServiceError, ClientOptions, InvalidArgumentError,
                             Kind, UnavailableError)
from conftest import TINY, make_entry, same_bytes

TRANSPORTS = ["grpc", "tcp", "shm", "ucx"]


def _fill(client: CacheClient, rng, n: int, family=TINY):
    reg = client.register_model("p", "0123abcd", family)
    hashes = client.hash_tokens(list(range(n * 256)), reg.family_id)
    entries = [make_entry(rng, family, h, 256) for h in hashes]
    client.put(reg.family_id, "p", entries)
    return reg.family_id, client.lookup(reg.family_id, hashes).best(), entries


def _check(got, entries, kinds, layers):
    assert got.complete and got.valid_chunks == len(entries)
    for kind in kinds:
        for i, entry in enumerate(entries):
            for layer in layers:
                assert same_bytes(np.asarray(got.arrays[kind][layer - layers.start, i * 256:(i + 1) * 256]),
                                  entry.slabs[(kind, layer)]), (kind, i, layer)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_transport_is_byte_identical(client, rng, transport):
    fid, hit, entries = _fill(client, rng, 6)
    got = client.get(fid, hit, (Kind.K, Kind.V, Kind.E), transport=transport)
    _check(got, entries, (Kind.K, Kind.V, Kind.E), range(4))
    part = client.get(fid, hit[1:4], (Kind.E,), (1, 3), transport=transport)
    _check(part, entries[1:4], (Kind.E,), range(1, 3))
    out = {Kind.V: torch.zeros((4, 6 * 256, 2, 8), dtype=torch.bfloat16)}
    into = client.get(fid, hit, (Kind.V,), out=out, transport=transport)
    assert into.arrays[Kind.V] is out[Kind.V]
    assert torch.equal(out[Kind.V][3, 256:512].view(torch.int16),
                       torch.from_numpy(entries[1].slabs[(Kind.V, 3)].view(np.int16)))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_plans_selections_come_in_one_request(client, rng, transport):
    """E of layer 1, then K and V of layers 0 and 2-3, of the same entries in one fetch:
    each (selection, layer) once, selection after selection, every byte in place."""
    fid, hit, entries = _fill(client, rng, 3)
    selections = [((Kind.E,), (1, 2)), ((Kind.K, Kind.V), (0, 1)), ((Kind.K, Kind.V), (2, 4))]
    stream = client.stream_selections(fid, hit, selections, transport=transport)
    assert list(stream) == [(0, 1), (1, 0), (2, 2), (2, 3)]
    for (kinds, (start, stop)), got in zip(selections, stream.results(), strict=True):
        assert got.complete and got.valid_chunks == 3 and got.transport == transport
        _check(got, entries, kinds, range(start, stop))


def test_selections_that_overlap_or_come_twice_are_refused(client, rng):
    fid, hit, _ = _fill(client, rng, 1)
    for transport in ("grpc", "tcp"):
        with pytest.raises(InvalidArgumentError, match="K of layer 1 more than once"):
            list(client.stream_selections(fid, hit, [((Kind.K,), (0, 2)), ((Kind.K, Kind.V), (1, 3))],
                                          transport=transport))
        with pytest.raises(InvalidArgumentError, match="1 to 64 selections"):
            list(client.stream_selections(fid, hit, [((Kind.K,), (0, 1))] * 65, transport=transport))
    both = pb.GetSlabsRequest(family_id=fid, entry_ids=hit.entry_ids, kinds=[1],
                              selections=[pb.SlabSelection(kinds=[2], layer_start=0, layer_end=1)])
    with pytest.raises(grpc.RpcError) as caught:
        list(pb_grpc.CacheServiceStub(client._channel).GetSlabs(both))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" in caught.value.details()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_layer_stream_yields_each_layer_once_in_order_with_its_data_in_place(client, rng, transport):
    fid, hit, entries = _fill(client, rng, 5)
    stream = client.stream(fid, hit, (Kind.K, Kind.V), transport=transport)
    assert stream.transport == transport
    seen = []
    for layer in stream:
        for i, entry in enumerate(entries):          # this layer has fully landed already
            for kind in (Kind.K, Kind.V):
                assert same_bytes(stream.arrays[kind][layer, i * 256:(i + 1) * 256],
                                  entry.slabs[(kind, layer)])
        seen.append(layer)
    assert seen == [0, 1, 2, 3]
    assert stream.result().complete


def test_auto_picks_shm_here_and_tcp_when_shm_is_off(server_factory, rng):
    on = server_factory("--memory-bytes", "64MiB")
    off = server_factory("--memory-bytes", "64MiB", "--shm", "false")
    with CacheClient(on.address) as a, CacheClient(off.address) as b:
        fa, ha, _ = _fill(a, rng, 1)
        fb, hb, _ = _fill(b, rng, 1)
        assert a.stream(fa, ha).transport == "shm"
        assert b.stream(fb, hb).transport == "tcp"
        with pytest.raises(CacheServiceError, match="does not offer the shm transport"):
            b.get(fb, hb, transport="shm")
        with pytest.raises(ValueError, match="transport must be"):
            a.get(fa, ha, transport="carrier-pigeon")


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_errors_are_typed_and_the_connection_stays_usable(client, rng, transport):
    fid, hit, entries = _fill(client, rng, 2)
    with pytest.raises(InvalidArgumentError, match=r"layer range \[3, 9\) is not inside \[0, 4\)"):
        client.get(fid, hit, layers=(3, 9), transport=transport)      # refused by the node
    _check(client.get(fid, hit, (Kind.K,), transport=transport), entries, (Kind.K,), range(4))


def test_shm_copy_threads_stream_the_same_bytes_in_order(server_factory, rng):
    srv = server_factory("--memory-bytes", "64MiB")
    with CacheClient(srv.address, ClientOptions(copy_threads=3)) as client:
        fid, hit, entries = _fill(client, rng, 6)
        stream = client.stream(fid, hit, (Kind.K, Kind.V, Kind.E), transport="shm")
        assert list(stream) == [0, 1, 2, 3]
        _check(stream.result(), entries, (Kind.K, Kind.V, Kind.E), range(4))


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_rotten_disk_bytes_are_a_miss(server_factory, rng, transport):
    srv = server_factory("--memory-bytes", "64MiB")
    with CacheClient(srv.address) as client:
        fid, hit, entries = _fill(client, rng, 3)
    srv.stop()
    again = server_factory("--memory-bytes", "64MiB", workdir=srv.workdir)   # all on disk now
    path = (again.data_dir / "entries" / hit.entry_ids[1].hex()[:2] / f"{hit.entry_ids[1].hex()}.ent")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    path.write_bytes(bytes(raw))
    with CacheClient(again.address) as client:
        got = client.get(fid, hit, (Kind.K, Kind.V, Kind.E), transport=transport)
        assert got.valid_chunks == 1 and any(m.entry_index == 1 for m in got.missing)
        for (kind, layer), arr in entries[2].slabs.items():      # later chunks still intact
            assert same_bytes(got.arrays[kind][layer, 512:768], arr)


BIG = dataclasses.replace(TINY, hidden_size=2048, tokenizer_fingerprint="big")   # 4.2 MB entries


def test_server_killed_mid_transfer_is_an_error_in_bounded_time(server_factory, rng):
    srv = server_factory("--memory-bytes", "1GiB", "--disk-mode", "off")
    with CacheClient(srv.address, ClientOptions(io_timeout_s=5)) as client:
        fid, hit, _ = _fill(client, rng, 32, BIG)           # 134 MB of E slabs
        stream = client.stream(fid, hit, (Kind.E,), transport="tcp")
        it = iter(stream)
        next(it)                                            # the transfer is under way
        srv.proc.send_signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(UnavailableError, match="failed mid-transfer"):
            for _ in it:
                pass
        assert time.monotonic() - start < 5


READER = textwrap.dedent("""
    import socket, sys, time
    from cachesvc.wire.protocol import Op, pack_request, read_frame
    from cachesvc.v1 import cachesvc_pb2 as pb
    req = pb.GetSlabsRequest.FromString(bytes.fromhex(sys.argv[3]))
    if sys.argv[1] == "tcp":
        host, port = sys.argv[2].rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
        sock.sendall(pack_request(Op.GET, req.SerializeToString()))
        read_frame(sock)                  # take one frame, then stall with the rest unread
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(sys.argv[2].encode().decode("unicode_escape"))
        sock.sendall(pack_request(Op.GET_SHM, req.SerializeToString()))
        while read_frame(sock).type != 2: # until END; never RELEASE
            pass
    print("HOLDING", flush=True)
    time.sleep(3600)
""")


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_client_killed_mid_transfer_releases_its_entries(server_factory, rng, transport):
    srv = server_factory("--memory-bytes", "1GiB", "--disk-mode", "off")
    with CacheClient(srv.address) as client:
        fid, hit, _ = _fill(client, rng, 32, BIG)
        fetch = client._call(client._stub.Stats, pb.StatsRequest()).fetch
        address = fetch.transports[transport].decode()
        req = pb.GetSlabsRequest(family_id=fid, entry_ids=hit.entry_ids, kinds=[3])
        proc = subprocess.Popen([sys.executable, "-c", READER, transport,
                                 address.encode("unicode_escape").decode(), req.SerializeToString().hex()],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "HOLDING"
        assert client.stats()["counters"]["entries_being_read"] == 32
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while client.stats()["counters"]["entries_being_read"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.stats()["counters"]["entries_being_read"] == 0


def test_shm_client_that_never_releases_is_dropped_after_the_timeout(server_factory, rng):
    srv = server_factory("--memory-bytes", "64MiB", "--shm-release-timeout-s", "1")
    with CacheClient(srv.address) as client:
        fid, hit, _ = _fill(client, rng, 3)
        fetch = client._call(client._stub.Stats, pb.StatsRequest()).fetch
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(fetch.transports["shm"].decode())
        req = pb.GetSlabsRequest(family_id=fid, entry_ids=hit.entry_ids, kinds=[1])
        sock.sendall(pack_request(Op.GET_SHM, req.SerializeToString()))
        frames = []
        while not frames or frames[-1].type != FrameType.END:
            frames.append(read_frame(sock))
        refs = [ref for f in frames[:-1] for ref in unpack_runs(f.header)]
        assert len(refs) == 3 and all(r.arena_offset >= 0 for r in refs)   # offsets only
        assert all(f.payload_bytes == 0 for f in frames[:-1])               # no inline bytes
        assert client.stats()["counters"]["entries_being_read"] == 3
        time.sleep(1.5)
        assert client.stats()["counters"]["entries_being_read"] == 0
        assert sock.recv(1) == b""                              # and it was disconnected
        sock.close()


def test_garbage_on_the_data_port_is_dropped_and_the_node_keeps_serving(client, rng):
    fid, hit, entries = _fill(client, rng, 1)
    address = client._call(client._stub.Stats, pb.StatsRequest()).fetch.transports["tcp"].decode()
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        try:
            assert sock.recv(1) == b""                          # closed on us...
        except ConnectionResetError:
            pass                                                # ...or reset (bytes were unread)
    _check(client.get(fid, hit, (Kind.K,), transport="tcp"), entries, (Kind.K,), range(4))


def test_concurrent_gets_over_each_transport(client, rng):
    fid, hit, entries = _fill(client, rng, 8)
    errors: list[BaseException] = []

    def worker(transport):
        try:
            for _ in range(5):
                _check(client.get(fid, hit, (Kind.K, Kind.E), transport=transport), entries,
                       (Kind.K, Kind.E), range(4))
        except BaseException as exc:    # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in TRANSPORTS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_put_over_every_transport(client, rng, transport):
    reg = client.register_model("p", "0123abcd", TINY)
    hashes = client.hash_tokens(list(range(5 * 256)), reg.family_id)
    entries = [make_entry(rng, TINY, h, 256) for h in hashes]
    put = client.put(reg.family_id, "p", entries, transport=transport)
    assert put.entries_committed == 5
    hit = client.lookup(reg.family_id, hashes).best()
    other = "grpc" if transport != "grpc" else "tcp"         # read back another way
    _check(client.get(reg.family_id, hit, (Kind.K, Kind.V, Kind.E), transport=other),
           entries, (Kind.K, Kind.V, Kind.E), range(4))


WRITER = textwrap.dedent("""
    import socket, sys
    from cachesvc.wire.protocol import pack_write
    host, port = sys.argv[1].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(pack_write(sys.argv[2], 0, 0, int(sys.argv[3])))
    sock.sendall(b"x" * (int(sys.argv[3]) // 2))       # half the payload, then hang
    print("HALF", flush=True)
    import time; time.sleep(3600)
""")


def test_writer_killed_mid_write_aborts_the_put(client, rng):
    from cachesvc_client.codec import plan_put
    reg = client.register_model("p", "0123abcd", TINY)
    hashes = client.hash_tokens(list(range(256)), reg.family_id)
    plan = plan_put("default", reg.family_id, TINY, "p", [make_entry(rng, TINY, hashes[0], 256)])
    res = client._call(client._stub.Reserve, plan.request)
    address = client._call(client._stub.Stats, pb.StatsRequest()).fetch.transports["tcp"].decode()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, address, res.reservation_id,
                             str(res.targets[0].size_bytes)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HALF"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while client.stats()["open_reservations"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = client.stats()
    assert stats["open_reservations"] == 0 and stats["memory"]["reserved_bytes"] == 0
    assert stats["counters"]["puts_aborted"] == 1 and stats["entries"] == 0


def test_refused_write_keeps_the_connection_in_step(client, rng):
    reg = client.register_model("p", "0123abcd", TINY)
    address = client._call(client._stub.Stats, pb.StatsRequest()).fetch.transports["tcp"].decode()
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        from cachesvc.wire.protocol import pack_write
        sock.sendall(pack_write("no-such-reservation", 0, 0, 5000) + b"y" * 5000)
        frame = read_frame(sock)
        assert frame.type == FrameType.ERROR and frame.header.startswith(b"NOT_FOUND:")
        sock.sendall(pack_request(Op.GET, pb.GetSlabsRequest(family_id=reg.family_id, kinds=[1],
                                                              entry_ids=[b"\0" * 16]).SerializeToString()))
        frames = [read_frame(sock), read_frame(sock)]          # the same connection still works
        assert [f.type for f in frames] == [FrameType.RUNS, FrameType.END]


def test_stalled_writer_is_dropped_and_its_put_aborted(server_factory, rng):
    """Alive but silent mid-payload: the node gives up after --data-io-timeout-s."""
    from cachesvc_client.codec import plan_put
    srv = server_factory("--memory-bytes", "64MiB", "--data-io-timeout-s", "1")
    with CacheClient(srv.address) as client:
        reg = client.register_model("p", "0123abcd", TINY)
        hashes = client.hash_tokens(list(range(256)), reg.family_id)
        plan = plan_put("default", reg.family_id, TINY, "p", [make_entry(rng, TINY, hashes[0], 256)])
        res = client._call(client._stub.Reserve, plan.request)
        host, port = client._call(client._stub.Stats, pb.StatsRequest()).fetch.transports["tcp"] \
            .decode().rsplit(":", 1)
        with socket.create_connection((host, int(port))) as sock:
            from cachesvc.wire.protocol import pack_write
            sock.sendall(pack_write(res.reservation_id, 0, 0, res.targets[0].size_bytes) + b"z" * 100)
            start = time.monotonic()
            while client.stats()["open_reservations"] and time.monotonic() - start < 5:
                time.sleep(0.05)
            took = time.monotonic() - start
        stats = client.stats()
        assert stats["open_reservations"] == 0 and stats["counters"]["puts_aborted"] == 1
        assert took < 2.5, f"stalled writer held its reservation {took:.1f} s"


def test_pool_drops_connections_the_peer_closed(server_factory, rng):
    """A pooled connection the node closed while idle is dropped, not used and failed."""
    srv = server_factory("--memory-bytes", "64MiB")
    with CacheClient(srv.address) as client:
        fid, hit, entries = _fill(client, rng, 2)
        client.get(fid, hit, (Kind.K,), transport="tcp")             # leaves a pooled connection
        transport = client._transports["tcp"]
        pooled = transport._idle[0]
        start = time.monotonic()
        assert transport._take() is pooled                          # healthy: reused, no wait
        assert time.monotonic() - start < 0.5
        transport._give_back(pooled)
        pooled.shutdown(socket.SHUT_RD)                              # as if the node hung up
        pooled_peer_closed = transport._take()
        assert pooled_peer_closed is not pooled                     # replaced by a new one
        transport._give_back(pooled_peer_closed)
        _check(client.get(fid, hit, (Kind.K,), transport="tcp"), entries, (Kind.K,), range(4))


def test_auto_falls_back_to_tcp_when_shm_is_unreachable(client, rng):
    """Same boot id but an unreachable Unix socket (as in a container)."""
    from cachesvc_client.transports import choose_transport
    fid, hit, entries = _fill(client, rng, 1)
    fetch = client._call(client._stub.Stats, pb.StatsRequest()).fetch
    fetch.transports["shm"] = b"\0cachesvc-nobody-listens-here"
    chosen = choose_transport("auto", fetch, client.target, ClientOptions(io_timeout_s=5))
    assert chosen is not None and chosen.name == "tcp"
    with pytest.raises(UnavailableError, match="unreachable"):
        choose_transport("shm", fetch, client.target, ClientOptions(io_timeout_s=5))
