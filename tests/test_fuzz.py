"""Fuzzing: properties of the key scheme, the payload layout, the framing and the disk
format (hypothesis), then floods of malformed messages against a real node: every gRPC
method and both data-plane sockets get 10,000 generated messages each; the node must
answer each with a clean status or close that connection, never hang or crash, keep
its log short, and still serve byte-identical data afterwards (issue 17, part 4)."""

from __future__ import annotations

import random
import socket
import struct
import time

import grpc
import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachesvc.node.disk import DiskTier
from cachesvc.node.entries import SlabSpec, plan_entry
from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc.wire.convert import family_to_proto
from cachesvc.wire import lmwire
from cachesvc.wire.keys import Kind, chunk_hashes
from cachesvc.wire.protocol import (MAGIC, REQUEST, VERSION, FrameType, Op, ProtocolError, RunRef, pack_request,
                                    pack_runs, read_frame, unpack_frame, unpack_runs, unpack_ucx_request,
                                    unpack_ucx_write)
from cachesvc_client import CacheClient
from conftest import TINY, make_entry, same_bytes

CASES = 10_000
"""Malformed messages per parser (the issue's floor)."""

# ---------------------------------------------------------------- properties

FAMILY = TINY.family_id()
tokens = st.lists(st.integers(0, 2**31 - 1), min_size=0, max_size=1100)


@given(tokens, st.integers(0, 1100))
@settings(max_examples=200, deadline=None)
def test_a_prefix_of_the_tokens_hashes_to_a_prefix_of_the_chain(ids, cut):
    whole = chunk_hashes(ids, FAMILY)
    part = chunk_hashes(ids[:cut], FAMILY)
    assert part == whole[:len(part)] and len(whole) == len(ids) // 256
    assert all(len(h) == 32 for h in whole)


@given(st.lists(st.integers(0, 50_000), min_size=256, max_size=600), st.sampled_from(["other-tenant", "t2", ""]))
@settings(max_examples=100, deadline=None)
def test_every_hash_depends_on_tenant_family_and_extra_keys(ids, tenant):
    base = chunk_hashes(ids, FAMILY)
    for other in (chunk_hashes(ids, "0" * 64), chunk_hashes(ids, FAMILY, extra_keys=["lora:a"])):
        assert not set(base) & set(other)
    if tenant:
        assert not set(base) & set(chunk_hashes(ids, FAMILY, tenant=tenant))


layers = st.lists(st.integers(0, TINY.num_layers - 1), unique=True).map(sorted)


@given(layers, layers, layers, st.integers(1, 256))
@settings(max_examples=300, deadline=None)
def test_readers_place_slabs_where_the_node_put_them(k, v, e, num_tokens):
    """``Layout.place`` (what same-host readers use) against ``plan_entry`` (what the
    node lays out), for any set of layers of each kind and any token count."""
    specs = [SlabSpec(kind, layer, TINY.slab_shape(kind, num_tokens), TINY.dtype, 0)
             for kind, chosen in ((Kind.K, k), (Kind.V, v), (Kind.E, e)) for layer in chosen]
    if not specs:
        return
    meta = plan_entry(0, "default", FAMILY, TINY, "m", b"\x01" * 32, 0, num_tokens, specs, 256)
    for index, slab in enumerate(meta.slabs):
        assert meta.layout.place(TINY, slab.kind, slab.layer) == (index, slab.offset, slab.size_bytes)
    for kind, chosen in ((Kind.K, k), (Kind.V, v), (Kind.E, e)):
        for layer in set(range(TINY.num_layers)) - set(chosen):
            assert meta.layout.place(TINY, kind, layer) is None


@given(st.lists(st.tuples(st.binary(max_size=40), st.integers(-1, 2**40), st.integers(0, 2**40)), max_size=20))
@settings(max_examples=300, deadline=None)
def test_run_tables_round_trip(runs):
    refs = [RunRef(h, o, n) for h, o, n in runs]
    assert unpack_runs(pack_runs(refs)) == refs


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_any_bytes_are_a_run_table_or_a_protocol_error(raw):
    try:
        unpack_runs(raw)
    except ProtocolError:
        pass


@given(st.integers(0, 4 * 256 * 2 * 8 * 2 + 200), st.integers(0, 255), st.booleans())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_torn_or_flipped_entry_file_is_dropped_or_fails_its_checksums(tmp_path, position, xor, truncate):
    """Any truncation or flipped byte of an entry file: the tier drops the file, or the
    bytes it returns are the stored ones, or they fail a slab checksum (a miss), never
    wrong data taken for right."""
    root = tmp_path / f"disk-{position}-{xor}-{truncate}"
    disk = DiskTier(root)
    rng = np.random.default_rng(position)
    payload = rng.bytes(TINY.slab_bytes(Kind.K, 256) * TINY.num_layers)
    size = TINY.slab_bytes(Kind.K, 256)
    specs = [SlabSpec(Kind.K, layer, TINY.slab_shape(Kind.K, 256), TINY.dtype,
                      xxhash.xxh3_64_intdigest(payload[layer * size:(layer + 1) * size]))
             for layer in range(TINY.num_layers)]
    meta = plan_entry(0, "default", FAMILY, TINY, "m", b"\x02" * 32, 0, 256, specs, 256)
    disk.write(meta, memoryview(payload))
    path = disk.path(meta.entry_id)
    raw = bytearray(path.read_bytes())
    position %= len(raw)
    if truncate:
        del raw[position:]
    else:
        raw[position] ^= xor or 1
    path.write_bytes(bytes(raw))
    kept = disk.scan().entries
    if not kept:
        return                                   # dropped: a miss
    (again,) = kept
    try:
        got = disk.read(again, 0, again.size_bytes)
    except OSError:
        return                                   # unreadable: a miss
    if got != payload:
        assert any(xxhash.xxh3_64_intdigest(got[s.offset:s.offset + s.size_bytes]) != s.checksum
                   for s in again.slabs)


@given(st.binary(max_size=300))
@settings(max_examples=2000, deadline=None)
def test_any_bytes_are_a_ucx_message_or_a_protocol_error(raw):
    """The UCX data plane's parsers (requests, WRITE bodies, frames) take any bytes: a
    message, or ProtocolError, which the node answers by dropping that message."""
    for parse in (unpack_ucx_request, unpack_ucx_write, unpack_frame):
        try:
            parse(raw)
        except ProtocolError:
            pass


# ---------------------------------------------------------------- floods against a real node

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ABORTED}


def _seeds(client: CacheClient) -> tuple[str, list[bytes], list[bytes]]:
    """A stored family with entries: valid messages to mutate, and bytes to check after."""
    fid = client.register_model("fuzz-p", "0123abcd", TINY).family_id
    hashes = client.hash_tokens(list(range(512)), fid)
    rng = np.random.default_rng(5)
    client.put(fid, "fuzz-p", [make_entry(rng, TINY, h, 256) for h in hashes])
    hit = client.lookup(fid, hashes).best()
    return fid, hashes, hit.entry_ids


def _mutants(rng: random.Random, valid: list[bytes]):
    """Malformed or random messages: random bytes, or a valid one truncated, extended,
    or with bytes flipped."""
    while True:
        pick = rng.random()
        if pick < 0.3:
            yield rng.randbytes(rng.randrange(0, 120))
            continue
        raw = bytearray(rng.choice(valid))
        if pick < 0.5 and raw:
            del raw[rng.randrange(len(raw)):]
        elif pick < 0.6:
            raw += rng.randbytes(rng.randrange(1, 40))
        else:
            for _ in range(rng.randrange(1, 4)):
                if raw:
                    raw[rng.randrange(len(raw))] ^= rng.randrange(1, 256)
        yield bytes(raw)


def _valid_requests(fid: str, hashes: list[bytes], ids: list[bytes]) -> dict[str, list[bytes]]:
    """Per method name, valid serialized requests to mutate (the rest get random bytes)."""
    family = family_to_proto(TINY)
    span = pb.SegmentSource(producer="fuzz-p", chunk_hashes=hashes, offset=56, length=200)
    delta = pb.AnchorDelta(agent="a1", producer="fuzz-p", placeholder_hashes=hashes[:1])
    return {
        "Lookup": [pb.LookupRequest(family_id=fid, chunk_hashes=hashes, locate=True, offer_tails=True).SerializeToString()],
        "GetSlabs": [pb.GetSlabsRequest(family_id=fid, entry_ids=ids, kinds=[1, 2], layer_end=4).SerializeToString()],
        "RegisterModel": [pb.RegisterModelRequest(model=pb.ModelSpec(model_id="fuzz-x", weights_digest="ab",
                                                                     family=family)).SerializeToString()],
        "Delete": [pb.DeleteRequest(family_id=fid, entry_ids=[b"\x00" * 16]).SerializeToString()],
        "Pin": [pb.PinRequest(family_id=fid, entry_ids=ids, ttl_s=1).SerializeToString()],
        # The cross-context RPCs, seeded with real spans of the stored chain (cachesvc.node.crosscontext).
        "PutSegment": [pb.PutSegmentRequest(family_id=fid, segment_key=b"\x01" * 32, source=span).SerializeToString()],
        "FindSegments": [pb.FindSegmentsRequest(family_id=fid, segment_keys=[b"\x01" * 32]).SerializeToString()],
        "AdmitAnchor": [pb.AdmitAnchorRequest(family_id=fid, placeholder="q", anchor=pb.AnchorInfo(
            segment_key=b"\x02" * 32, length=200, base=span)).SerializeToString()],
        "RecordAnchor": [pb.RecordAnchorRequest(family_id=fid, placeholder="q", segment_key=b"\x02" * 32,
                                                delta=delta).SerializeToString()],
        "FindAnchors": [pb.FindAnchorsRequest(family_id=fid, placeholder="q", min_length=10).SerializeToString()],
        "ActivateAnchors": [pb.ActivateAnchorsRequest(family_id=fid, placeholder="q",
                                                      segment_keys=[b"\x02" * 32]).SerializeToString()],
        "PutProfile": [pb.PutProfileRequest(profile=pb.ProfileSpec(
            producer="fuzz-p", consumer="fuzz-x", producer_digest="0123abcd", consumer_digest="ab",
            document=b'{"plans": []}')).SerializeToString()],
        "GetProfile": [pb.GetProfileRequest(producer="fuzz-p", consumer="fuzz-x").SerializeToString()],
    }


def _unary_call(channel: grpc.Channel, method, body: bytes) -> grpc.StatusCode:
    path = f"/cachesvc.v1.CacheService/{method.name}"
    try:
        if method.client_streaming:
            call = channel.stream_unary(path)
            call(iter([body, body[: len(body) // 2]]), timeout=10)
        elif method.server_streaming:
            for _ in channel.unary_stream(path)(body, timeout=10):
                pass
        else:
            channel.unary_unary(path)(body, timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.INTERNAL and "deserializ" in (exc.details() or ""):
            return grpc.StatusCode.INVALID_ARGUMENT   # grpc's own answer to bytes that are no message
        return exc.code()


def _still_serves(client: CacheClient, fid: str) -> None:
    rng = np.random.default_rng(9)
    hashes = client.hash_tokens(list(range(9000, 9512)), fid)
    entries = [make_entry(rng, TINY, h, 256) for h in hashes]
    client.put(fid, "fuzz-p", entries)
    hit = client.lookup(fid, hashes).best()
    for transport in ("grpc", "tcp", "shm"):
        got = client.get(fid, hit, (Kind.K, Kind.V, Kind.E), transport=transport)
        assert got.complete
        for layer in range(TINY.num_layers):
            for i, entry in enumerate(entries):
                for kind in (Kind.K, Kind.V, Kind.E):
                    assert same_bytes(got.arrays[kind][layer, i * 256:(i + 1) * 256], entry.slabs[(kind, layer)])


def test_every_grpc_method_answers_malformed_messages_cleanly(server):
    with CacheClient(server.address) as client:
        fid, hashes, ids = _seeds(client)
        valid = _valid_requests(fid, hashes, ids)
        methods = list(pb.DESCRIPTOR.services_by_name["CacheService"].methods)
        rng = random.Random(17)
        streams = {m.name: _mutants(rng, valid.get(m.name, [b"\x0a\x03abc"])) for m in methods}
        bad: dict[str, list] = {}
        with grpc.insecure_channel(server.address) as channel:
            for case in range(CASES):
                method = methods[case % len(methods)]
                body = next(streams[method.name])
                code = _unary_call(channel, method, body)
                if code not in ALLOWED:
                    bad.setdefault(method.name, []).append((code.name, body[:40]))
        assert not bad, {name: cases[:3] for name, cases in bad.items()}
        _still_serves(client, fid)


def _exchange(address, family: int, message: bytes) -> str:
    """Send ``message``, close our side, and read what comes back: "answer" (frames, then
    the node closed or stopped), or "closed"; raises on a hang (10 s)."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        try:
            sock.sendall(message)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return "closed"                    # the node hung up before reading it all
        try:
            frame = read_frame(sock)
        except (ConnectionError, OSError, ProtocolError, struct.error):
            return "closed"
        assert frame.type in tuple(FrameType)
        return "answer"


def _data_plane_mutants(rng: random.Random, valid_bodies: dict[Op, list[bytes]]):
    """Whole requests: random bytes, a valid header with a random op or length, or a known
    op with a mutated body."""
    bodies = {op: _mutants(rng, bodies) for op, bodies in valid_bodies.items()}
    while True:
        pick = rng.random()
        if pick < 0.15:
            yield rng.randbytes(rng.randrange(0, 64))
        elif pick < 0.3:
            body = rng.randbytes(rng.randrange(0, 64))
            yield REQUEST.pack(MAGIC, VERSION, rng.randrange(256), 0, rng.choice([len(body), rng.randrange(2**32)])) + body
        elif pick < 0.35:
            yield REQUEST.pack(rng.randbytes(4), rng.randrange(256), 1, 0, 0)
        else:
            op = rng.choice(list(bodies))
            yield pack_request(op, next(bodies[op]))


def test_the_data_plane_answers_or_closes_on_malformed_requests_and_keeps_its_log_short(server):
    with CacheClient(server.address) as client:
        fid, hashes, ids = _seeds(client)
        fetch = client._call(client._stub.Stats, pb.StatsRequest()).fetch
        get = pb.GetSlabsRequest(family_id=fid, entry_ids=ids, kinds=[1, 3], layer_end=4).SerializeToString()
        valid = {Op.GET: [get], Op.GET_SHM: [get],
                 Op.LOOKUP: [pb.LookupRequest(family_id=fid, chunk_hashes=hashes, locate=True).SerializeToString()],
                 Op.WRITE: [struct.pack("<IQQ", 0, 0, 64) + b"no-such-reservation" + bytes(64)],
                 Op.MAP: [b""], Op.RELEASE: [b""]}
        host, port = fetch.transports["tcp"].decode().rsplit(":", 1)
        endpoints = [((host, int(port)), socket.AF_INET), (fetch.transports["shm"].decode(), socket.AF_UNIX)]
        rng = random.Random(23)
        mutants = _data_plane_mutants(rng, valid)
        outcomes = {"answer": 0, "closed": 0}
        started = time.monotonic()
        for case in range(CASES):
            address, family = endpoints[case % 2]
            outcomes[_exchange(address, family, next(mutants))] += 1
        assert outcomes["answer"] > 500 and outcomes["closed"] > 500, outcomes   # both kinds were exercised
        _still_serves(client, fid)
        elapsed = time.monotonic() - started
    dropped = [line for line in server.log().splitlines() if "connection dropped" in line]
    # at most 10 lines a minute, whatever the flood (logs.Throttled)
    assert len(dropped) <= 10 * (1 + int(elapsed // 60)), len(dropped)
    assert "Traceback" not in server.log()


@pytest.fixture
def server(server_factory):
    return server_factory("--memory-bytes", "64MiB")



def _lm_valid_requests(rng: random.Random) -> list[bytes]:
    """Whole, valid ``lm://`` requests (header and payload) to mutate."""
    key = "meta-llama/Llama-3.1-8B@1@0@1f2e@bfloat16"
    kv = rng.randbytes(2 * 2 * 16 * 8 * 2)
    return [lmwire.pack_request(lmwire.Command.PUT, key, len(kv), lmwire.Format.KV_2LTD, 3, (2, 2, 16, 8)) + kv,
            lmwire.pack_request(lmwire.Command.PUT, key, 40, lmwire.Format.BINARY, 6, (40, 0, 0, 0)) + bytes(40),
            lmwire.pack_request(lmwire.Command.GET, key), lmwire.pack_request(lmwire.Command.EXIST, key),
            lmwire.pack_request(lmwire.Command.LIST, "x@1@0@0@bfloat16"),
            lmwire.pack_request(lmwire.Command.HEALTH, "x@1@0@0@bfloat16")]


def _lm_exchange(port: int, message: bytes) -> str:
    """Send one (malformed) request and read a response header: "answer", or "closed";
    raises on a hang (10 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(message)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return "closed"
        got = b""
        try:
            while len(got) < lmwire.RESPONSE.size:
                more = sock.recv(lmwire.RESPONSE.size - len(got))
                if not more:
                    return "closed"
                got += more
        except ConnectionResetError:
            return "closed"
        assert lmwire.parse_response(got).code in (lmwire.SUCCESS, lmwire.FAIL)
        return "answer"


def _lm_call(sock: socket.socket, request: bytes) -> tuple[lmwire.Response, bytes]:
    sock.sendall(request)
    head = lmwire.parse_response(_recv_exactly(sock, lmwire.RESPONSE.size))
    return head, _recv_exactly(sock, head.length) if head.code == lmwire.SUCCESS else b""


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        more = sock.recv(n - len(buf))
        if not more:
            raise ConnectionError("closed")
        buf += more
    return bytes(buf)


def test_the_lm_endpoint_answers_or_closes_on_malformed_requests(server_factory):
    """The ``lm://`` parser (LMCache's framing) fed 10,000 malformed requests against a
    real node: each is answered or its connection closed, none hangs; afterwards every
    key the node lists reads back whole (no partial object became visible), a fresh
    object round-trips byte for byte, and the log stays short."""
    srv = server_factory("--memory-bytes", "64MiB", "--lm-port", "0")
    port = srv.serving("lm_port")
    rng = random.Random(29)
    mutants = _mutants(rng, _lm_valid_requests(rng))
    outcomes = {"answer": 0, "closed": 0}
    started = time.monotonic()
    for _ in range(CASES):
        outcomes[_lm_exchange(port, next(mutants))] += 1
    elapsed = time.monotonic() - started
    assert outcomes["answer"] > 500 and outcomes["closed"] > 500, outcomes    # both kinds were exercised
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        head, body = _lm_call(sock, lmwire.pack_request(lmwire.Command.LIST, "x@1@0@0@bfloat16"))
        for key in filter(None, body.decode().split("\n")):
            got, data = _lm_call(sock, lmwire.pack_request(lmwire.Command.GET, key))
            assert got.code == lmwire.SUCCESS and len(data) == got.length > 0, key
        key = "fuzz/after@1@0@abc@bfloat16"
        data = random.Random(3).randbytes(2 * 2 * 16 * 8 * 2)
        sock.sendall(lmwire.pack_request(lmwire.Command.PUT, key, len(data), lmwire.Format.KV_2LTD, 3,
                                         (2, 2, 16, 8)) + data)
        got, back = _lm_call(sock, lmwire.pack_request(lmwire.Command.GET, key))
        assert got.code == lmwire.SUCCESS and back == data and got.shape == (2, 2, 16, 8)
    closed = [line for line in srv.log().splitlines() if "lm:// connection closed" in line]
    assert len(closed) <= 11 * (1 + int(elapsed // 60)), len(closed)
    assert "Traceback" not in srv.log()
    print(f"lm:// fuzz: {outcomes} in {elapsed:.1f} s")
