"""Dead peers: clients killed mid-put, servers killed under clients."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cachesvc_client import CacheClient, ClientOptions, RetryPolicy, UnavailableError
from conftest import TINY, make_entry

WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import numpy as np
    from conftest import TINY, make_entry
    from cachesvc_client import CacheClient
    from cachesvc_client.codec import plan_put, write_chunks
    from cachesvc.v1 import cachesvc_pb2 as pb, cachesvc_pb2_grpc as pb_grpc
    import grpc
    client = CacheClient({address!r})
    fid = client.register_model("p", "0123abcd", TINY).family_id
    hashes = client.hash_tokens(list(range(4 * 256)), fid)
    plan = plan_put("default", fid, TINY, "p", [make_entry(np.random.default_rng(0), TINY, h, 256) for h in hashes])
    stub = pb_grpc.CacheServiceStub(grpc.insecure_channel({address!r}))
    res = stub.Reserve(plan.request)
    if {write!r}:
        def half_then_hang():
            chunks = [pb.WriteChunk.FromString(raw) for raw in
                      write_chunks(res.reservation_id, plan, res.targets, piece_bytes=4096)]
            yield from chunks[: len(chunks) // 2]
            print("HALF", flush=True)
            time.sleep(3600)
        stub.WriteSlabs(half_then_hang())
    else:
        print("HALF", flush=True)
        time.sleep(3600)
""")


def _writer(address: str, tests_dir: str, write: bool) -> subprocess.Popen:
    code = WRITER.format(tests=tests_dir, address=address, write=write)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "HALF"
    return proc


def _wait(pred, timeout_s: float) -> float:
    start = time.monotonic()
    while not pred():
        assert time.monotonic() - start < timeout_s, "condition not reached in time"
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.parametrize("write", [True, False], ids=["killed-mid-write", "killed-before-write"])
def test_client_killed_mid_put_leaves_nothing(server, client, request, write):
    proc = _writer(server.address, str(request.path.parent), write)
    if write:   # kill only once the server holds part of the stream
        _wait(lambda: client.stats()["counters"]["bytes_written"] > 0, 10)
    stats = client.stats()
    assert stats["open_reservations"] == 1 and stats["memory"]["reserved_bytes"] > 0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Guarantee: within the reservation ttl (3 s here) plus one reap interval, the
    # reservation is gone, its memory is back and nothing it wrote is visible. A broken
    # write stream usually aborts at once (puts_aborted), but gRPC does not always
    # report the dead writer to the blocked request iterator in time (seen ~1 in 10
    # loaded suite runs); expiry then reclaims it (reservations_expired).
    took = _wait(lambda: client.stats()["open_reservations"] == 0, 10)
    stats = client.stats()
    assert took < 3 + 0.5 + 1.0, f"reclaimed only after {took:.1f} s"
    assert stats["memory"]["reserved_bytes"] == 0 and stats["memory"]["used_bytes"] == 0
    assert stats["entries"] == 0
    fid = client.list_models()[0]["family_id"]
    assert client.lookup(fid, client.hash_tokens(list(range(1024)), fid)).best() is None
    counters = stats["counters"]
    assert counters["puts_aborted"] + counters["reservations_expired"] == 1, counters
    if not write:
        assert counters["reservations_expired"] == 1, counters

def test_dead_server_gives_unavailable_in_bounded_time(server, rng):
    opts = ClientOptions(timeout_s=3, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.05))
    with CacheClient(server.address, opts) as client:
        fid = client.register_model("p", "0123abcd", TINY).family_id
        h = client.hash_tokens(list(range(256)), fid)
        client.put(fid, "p", [make_entry(rng, TINY, h[0], 256)])
        server.stop(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(UnavailableError):
            client.lookup(fid, h)
        with pytest.raises(UnavailableError):
            client.put(fid, "p", [make_entry(rng, TINY, h[0], 256)])
        assert time.monotonic() - start < 8
