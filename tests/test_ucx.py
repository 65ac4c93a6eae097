"""The UCX data plane (ucxx, the ``ucx`` extra): choice of transport, refusals, and dead
peers on either side. Byte-identity, streaming, puts and concurrency over UCX run with
every other transport in test_dataplane.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cachesvc.wire import ucxlib
from cachesvc.wire.protocol import REQUEST_TAG
from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc_client import CacheClient, CacheServiceError, ClientOptions, InvalidArgumentError, Kind
from cachesvc_client.transports import choose_transport
from conftest import TINY, make_entry
from test_dataplane import BIG, _check, _fill

assert ucxlib.available(), "the test environment installs the ucx extra (make test does)"


def _fetch(client: CacheClient) -> pb.FetchDescriptor:
    return client._call(client._stub.Stats, pb.StatsRequest()).fetch


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_auto_takes_ucx_over_tcp_only_with_rdma_or_without_tcp(client):
    real = _fetch(client)
    assert "ucx" in real.transports and "ucx.rdma" not in real.transports   # no RDMA here
    remote = pb.FetchDescriptor()
    remote.CopyFrom(real)
    remote.host_id = "another-host"                        # rules shm out
    opts = ClientOptions(io_timeout_s=5)
    assert choose_transport("auto", remote, client.target, opts).name == "tcp"
    remote.transports["ucx.rdma"] = b"1"
    assert choose_transport("auto", remote, client.target, opts).name == "ucx"
    del remote.transports["ucx.rdma"]
    del remote.transports["tcp"]
    assert choose_transport("auto", remote, client.target, opts).name == "ucx"


def test_ucx_off_is_not_offered_and_asking_for_it_is_a_clear_error(server_factory, rng):
    srv = server_factory("--ucx", "off")
    with CacheClient(srv.address) as client:
        fid, hit, _ = _fill(client, rng, 1)
        assert "ucx" not in _fetch(client).transports
        with pytest.raises(CacheServiceError, match="cannot use ucx .* it does not offer UCX"):
            client.get(fid, hit, transport="ucx")


def test_ucx_over_tcp_only(server_factory, rng):
    """UCX restricted to its TCP transport, as between hosts without RDMA."""
    srv = server_factory("--ucx-tls", "tcp,self")
    with CacheClient(srv.address, ClientOptions(ucx_tls="tcp,self")) as client:
        fid, hit, entries = _fill(client, rng, 3)
        _check(client.get(fid, hit, (Kind.K, Kind.V, Kind.E), transport="ucx"), entries,
               (Kind.K, Kind.V, Kind.E), range(4))
        reg = client.register_model("q", "0123abcd", TINY)
        hashes = client.hash_tokens(list(range(1000, 1512)), reg.family_id)
        more = [make_entry(rng, TINY, h, 256) for h in hashes]
        assert client.put(reg.family_id, "q", more, transport="ucx").entries_committed == 2
        _check(client.get(reg.family_id, client.lookup(reg.family_id, hashes).best(),
                          (Kind.K,), transport="tcp"), more, (Kind.K,), range(4))


def test_refusals_are_typed_and_the_worker_stays_usable(client, rng):
    fid, hit, entries = _fill(client, rng, 2)
    with pytest.raises(InvalidArgumentError, match=r"layer range \[3, 9\) is not inside \[0, 4\)"):
        client.get(fid, hit, layers=(3, 9), transport="ucx")
    _check(client.get(fid, hit, (Kind.K,), transport="ucx"), entries, (Kind.K,), range(4))


GARBAGE = textwrap.dedent("""
    import sys
    from cachesvc.wire.ucxlib import Worker
    w = Worker()
    ep = w.endpoint(bytes.fromhex(sys.argv[1]))
    w.wait([w.send(ep, b"not a request at all", int(sys.argv[2]))], 10)
    w.wait([w.send(ep, b"CSDP" + bytes(8), int(sys.argv[2]))], 10)   # a header and no body
    print("SENT", flush=True)
""")


def test_malformed_requests_are_dropped_and_the_node_keeps_serving(client, rng):
    fid, hit, entries = _fill(client, rng, 2)
    node = _fetch(client).transports["ucx"]
    proc = subprocess.run([sys.executable, "-c", GARBAGE, node.hex(), str(REQUEST_TAG)],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "SENT", proc.stderr[-2000:]
    _check(client.get(fid, hit, (Kind.K, Kind.E), transport="ucx"), entries, (Kind.K, Kind.E),
           range(4))


def test_node_killed_mid_transfer_is_an_error_in_bounded_time(server_factory, rng):
    srv = server_factory("--memory-bytes", "1GiB", "--disk-mode", "off")
    with CacheClient(srv.address, ClientOptions(io_timeout_s=2)) as client:
        fid, hit, _ = _fill(client, rng, 32, BIG)
        it = iter(client.stream(fid, hit, (Kind.E,), transport="ucx"))
        next(it)
        srv.proc.send_signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(CacheServiceError, match="ucx failed mid-transfer"):
            for _ in it:
                pass
        assert time.monotonic() - start < 5


# A client that asks for a GET, takes the first frame and then neither receives the
# payloads nor goes away; or that sends a WRITE's header and never its payload.
STALLER = textwrap.dedent("""
    import sys, time
    from cachesvc.wire.protocol import (REQUEST_TAG, Op, pack_ucx_request,
                                        pack_ucx_write)
    from cachesvc.wire.ucxlib import Worker
    w = Worker()
    ep = w.endpoint(bytes.fromhex(sys.argv[2]))
    if sys.argv[1] == "get":
        w.wait([w.send(ep, pack_ucx_request(Op.GET, 2, w.address, bytes.fromhex(sys.argv[3])),
                       REQUEST_TAG)], 10)
        w.take_within(2, 10)
    else:
        reservation, size = sys.argv[3], int(sys.argv[4])
        body = pack_ucx_write(reservation, 0, 0, [size])
        w.wait([w.send(ep, pack_ucx_request(Op.WRITE, 2, w.address, body), REQUEST_TAG)], 10)
    print("STALLED", flush=True)
    time.sleep(3600)
""")


def test_stalled_reader_is_dropped_and_its_entries_released(server_factory, rng):
    srv = server_factory("--memory-bytes", "1GiB", "--disk-mode", "off", "--data-io-timeout-s", "2")
    with CacheClient(srv.address) as client:
        fid, hit, entries = _fill(client, rng, 32, BIG)
        req = pb.GetSlabsRequest(family_id=fid, entry_ids=hit.entry_ids, kinds=[int(Kind.E)])
        proc = subprocess.Popen([sys.executable, "-c", STALLER, "get", _fetch(client).transports["ucx"].hex(),
                                 req.SerializeToString().hex()], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "STALLED"
            assert client.stats()["counters"]["entries_being_read"] == 32
            assert _wait_for(lambda: client.stats()["counters"]["entries_being_read"] == 0, 10)
            assert proc.poll() is None                     # dropped by the node, not by dying
        finally:
            proc.kill()
            proc.wait()
        got = client.get(fid, hit, (Kind.E,), transport="ucx")   # the node serves on
        assert got.complete


def test_writer_that_never_sends_its_payload_has_its_put_aborted(server_factory, rng):
    from cachesvc_client.codec import plan_put
    srv = server_factory("--data-io-timeout-s", "2", "--reservation-ttl-s", "60")
    with CacheClient(srv.address) as client:
        reg = client.register_model("p", "0123abcd", TINY)
        hashes = client.hash_tokens(list(range(256)), reg.family_id)
        plan = plan_put("default", reg.family_id, TINY, "p", [make_entry(rng, TINY, hashes[0], 256)])
        res = client._call(client._stub.Reserve, plan.request)
        proc = subprocess.Popen([sys.executable, "-c", STALLER, "write", _fetch(client).transports["ucx"].hex(),
                                 res.reservation_id, str(res.targets[0].size_bytes)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "STALLED"
            # aborted by the I/O timeout (2 s), long before the reservation's ttl (60 s)
            assert _wait_for(lambda: client.stats()["open_reservations"] == 0, 10)
        finally:
            proc.kill()
            proc.wait()
        stats = client.stats()
        assert stats["counters"]["puts_aborted"] == 1 and stats["entries"] == 0
        assert stats["memory"]["reserved_bytes"] == 0
        fid, hit, entries = _fill(client, rng, 2)                # the node serves on
        _check(client.get(fid, hit, (Kind.V,), transport="ucx"), entries, (Kind.V,), range(4))
