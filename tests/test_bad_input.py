"""Bad input: a precise status and message, the server keeps serving, nothing partial
becomes visible. Raw stubs are used where the SDK would refuse the request itself."""

from __future__ import annotations

import dataclasses

import grpc
import ml_dtypes
import numpy as np
import pytest
import xxhash

from cachesvc.wire.keys import Kind
from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc.v1 import cachesvc_pb2_grpc as pb_grpc
from cachesvc.wire.convert import family_to_proto
from cachesvc_client import (CacheClient, ClientOptions, EntryData, InvalidArgumentError,
                             ResourceExhaustedError)
from cachesvc_client.codec import SlabAssembler, plan_put
from conftest import TINY, make_entry

SLAB_K = TINY.slab_bytes(Kind.K, 256)


@pytest.fixture
def setup(server, client):
    reg = client.register_model("p", "0123abcd", TINY)
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.CacheServiceStub(channel)
    yield client, stub, reg.family_id
    # after every bad request: the server still serves and nothing partial is visible
    stats = client.stats()
    assert stats["entries"] == 0, "a rejected put left a visible entry"
    assert stats["open_reservations"] == 0 or stats["memory"]["reserved_bytes"] > 0
    channel.close()


def _slab(kind=Kind.K, layer=0, shape=(256, 2, 8), dtype=pb.DTYPE_BFLOAT16, checksum=0):
    return pb.SlabSpec(kind=int(kind), layer=layer, shape=shape, dtype=dtype, checksum=checksum)


def _reserve(stub, fid, slabs, *, chunk_hash=b"\x01" * 32, num_tokens=256, producer="p", parent_hash=b""):
    return stub.Reserve(pb.ReserveRequest(family_id=fid, producer=producer, entries=[
        pb.EntrySpec(chunk_hash=chunk_hash, num_tokens=num_tokens, slabs=slabs, parent_hash=parent_hash)]),
        timeout=5)


def _code(exc_info) -> grpc.StatusCode:
    return exc_info.value.code()


@pytest.mark.parametrize("slab, match", [
    (_slab(dtype=pb.DTYPE_FLOAT16), r"slabs\[0\]\.dtype is float16, family dtype is bfloat16"),
    (_slab(shape=(256, 2, 9)), r"shape \[256, 2, 9\], expected \[256, 2, 8\]"),
    (_slab(kind=Kind.E, shape=(256, 2, 8)), r"E layer 0\) has shape .* expected \[256, 16\]"),
    (_slab(layer=4), r"layer 4 out of range: family has 4 layers"),
    (_slab(dtype=99), r"dtype 99 is not a known value"),
])
def test_bad_slab_specs(setup, slab, match):
    _, stub, fid = setup
    with pytest.raises(grpc.RpcError) as e:
        _reserve(stub, fid, [slab])
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    assert e.match(match)


def test_bad_entries(setup):
    _, stub, fid = setup
    cases = [
        (dict(chunk_hash=b"\x01" * 31), "chunk_hash has 31 bytes, expected 32"),
        (dict(num_tokens=257), r"num_tokens must be in 1..256"),
        (dict(num_tokens=0), r"num_tokens must be in 1..256"),
        (dict(num_tokens=100, parent_hash=b"\x02" * 5), r"parent_hash has 5 bytes, expected 32"),
        (dict(num_tokens=256, parent_hash=b"\x02" * 32), r"parent_hash is for partial chunks only"),
    ]
    for kwargs, match in cases:
        with pytest.raises(grpc.RpcError) as e:
            _reserve(stub, fid, [_slab()], **kwargs)
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and e.match(match)
    with pytest.raises(grpc.RpcError) as e:
        _reserve(stub, fid, [_slab(), _slab()])
    assert e.match("repeats K layer 0")


def test_unknown_family_model_reservation_lease(setup):
    _, stub, fid = setup
    calls = [
        (lambda: _reserve(stub, "f" * 32, [_slab()]), grpc.StatusCode.NOT_FOUND, "family 'f+' is not known"),
        (lambda: _reserve(stub, fid, [_slab()], producer="ghost"), grpc.StatusCode.NOT_FOUND,
         "model 'ghost' is not registered"),
        (lambda: stub.Commit(pb.CommitRequest(reservation_id="nope"), timeout=5),
         grpc.StatusCode.NOT_FOUND, "reservation 'nope' does not exist"),
        (lambda: stub.Abort(pb.AbortRequest(reservation_id="nope"), timeout=5),
         grpc.StatusCode.NOT_FOUND, "reservation 'nope'"),
        (lambda: stub.Unpin(pb.UnpinRequest(lease_id="nope"), timeout=5),
         grpc.StatusCode.NOT_FOUND, "lease 'nope'"),
        (lambda: stub.Lookup(pb.LookupRequest(family_id="0" * 32, chunk_hashes=[b"\0" * 32]), timeout=5),
         grpc.StatusCode.NOT_FOUND, "family"),
    ]
    for call, code, match in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert _code(e) == code and e.match(match), e.value.details()


def test_slab_of_another_family(setup):
    client, stub, fid = setup
    other = dataclasses.replace(TINY, hidden_size=32, tokenizer_fingerprint="x")
    client.register_model("q", "0123abcd", other)
    with pytest.raises(grpc.RpcError) as e:          # producer q writes into p's family
        _reserve(stub, fid, [_slab()], producer="q")
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    assert e.match(f"producer 'q' is of family {other.family_id()}, not {fid}")


def test_malformed_hashes_and_ids(setup):
    _, stub, fid = setup
    with pytest.raises(grpc.RpcError) as e:
        stub.Lookup(pb.LookupRequest(family_id=fid, chunk_hashes=[b"\0" * 32, b"short"]), timeout=5)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and e.match(r"chunk_hashes\[1\] has 5 bytes")
    with pytest.raises(grpc.RpcError) as e:
        stub.Lookup(pb.LookupRequest(family_id=fid, tail_hashes=[b"\0" * 31]), timeout=5)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and e.match(r"tail_hashes\[0\] has 31 bytes")
    with pytest.raises(grpc.RpcError) as e:
        stub.Lookup(pb.LookupRequest(family_id=fid, tail_hashes=[b"\0" * 32] * 257), timeout=5)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and e.match(r"257 tail_hashes: at most one per length")
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GetSlabs(pb.GetSlabsRequest(family_id=fid, entry_ids=[b"x"], kinds=[1]), timeout=5))
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and e.match(r"entry_ids\[0\] has 1 bytes")
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GetSlabs(pb.GetSlabsRequest(family_id=fid, entry_ids=[b"x" * 16], kinds=[1],
                                              layer_start=3, layer_end=9), timeout=5))
    assert e.match(r"layer range \[3, 9\) is not inside \[0, 4\)")
    with pytest.raises(grpc.RpcError) as e:
        list(stub.GetSlabs(pb.GetSlabsRequest(family_id=fid, entry_ids=[b"x" * 16]), timeout=5))
    assert e.match("kinds must be a non-empty list")
    with pytest.raises(grpc.RpcError) as e:
        stub.Pin(pb.PinRequest(family_id=fid, entry_ids=[], ttl_s=0), timeout=5)
    assert e.match(r"lease ttl must be in 1..3600")


def test_bad_registration(setup):
    _, stub, _ = setup
    fam = family_to_proto(TINY)
    for model, match in [(pb.ModelSpec(model_id="bad id!", weights_digest="0123abcd", family=fam), "model_id"),
                         (pb.ModelSpec(model_id="m", weights_digest="xyz", family=fam), "weights_digest"),
                         (pb.ModelSpec(model_id="m", weights_digest="0123abcd",
                                       family=pb.FamilySpec(architecture="A", dtype=pb.DTYPE_BFLOAT16)), "num_layers"),
                         (pb.ModelSpec(model_id="m", weights_digest="0123abcd",
                                       family=pb.FamilySpec(architecture="A")), "dtype 0 is not a known")]:
        with pytest.raises(grpc.RpcError) as e:
            stub.RegisterModel(pb.RegisterModelRequest(model=model), timeout=5)
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and e.match(match)
    other = pb.ModelSpec(model_id="p", weights_digest="99999999", family=fam)
    with pytest.raises(grpc.RpcError) as e:
        stub.RegisterModel(pb.RegisterModelRequest(model=other), timeout=5)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION and e.match("other weights")


def test_wrong_sizes_and_order_of_writes(setup):
    _, stub, fid = setup
    payload = bytes(SLAB_K)
    res = _reserve(stub, fid, [_slab(checksum=xxhash.xxh3_64_intdigest(payload))])
    rid = res.reservation_id

    def write(offset, data, entry_index=0):
        return stub.WriteSlabs(iter([pb.WriteChunk(reservation_id=rid, entry_index=entry_index,
                                                   offset=offset, data=data)]), timeout=5)

    with pytest.raises(grpc.RpcError) as e:
        write(0, payload + b"x")
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and e.match("overruns the entry's 8192 bytes")
    with pytest.raises(grpc.RpcError) as e:
        write(100, payload[100:])
    assert e.match("write at offset 100 but 0 bytes received so far")
    with pytest.raises(grpc.RpcError) as e:
        write(0, payload, entry_index=3)
    assert e.match("entry_index 3 out of range")
    write(0, payload[:4096])
    with pytest.raises(grpc.RpcError) as e:
        stub.Commit(pb.CommitRequest(reservation_id=rid), timeout=5)
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION and e.match("4096 of 8192 bytes")
    stub.Abort(pb.AbortRequest(reservation_id=rid), timeout=5)
    with pytest.raises(grpc.RpcError) as e:
        stub.Commit(pb.CommitRequest(reservation_id=rid), timeout=5)
    assert _code(e) == grpc.StatusCode.NOT_FOUND


def test_checksum_mismatch_aborts_the_whole_put(setup, rng):
    client, stub, fid = setup
    hashes = client.hash_tokens(list(range(512)), fid)
    plan = plan_put("default", fid, TINY, "p", [make_entry(rng, TINY, h, 256) for h in hashes])
    plan.request.entries[1].slabs[3].checksum ^= 1        # lie about one slab
    res = stub.Reserve(plan.request, timeout=5)
    from cachesvc_client.codec import write_chunks
    # standard protobuf messages work too: the framed bytes are ordinary WriteChunks
    stub.WriteSlabs((pb.WriteChunk.FromString(raw) for raw in
                     write_chunks(res.reservation_id, plan, res.targets)), timeout=5)
    with pytest.raises(grpc.RpcError) as e:
        stub.Commit(pb.CommitRequest(reservation_id=res.reservation_id), timeout=5)
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    assert e.match("entry 1 slab K layer 3: checksum .* does not match the declared .*aborted")
    assert client.lookup(fid, hashes).best() is None      # entry 0 was fine but is not visible
    assert client.stats()["memory"]["reserved_bytes"] == 0


def test_reservation_larger_than_memory(setup):
    client, _, _ = setup
    wide = dataclasses.replace(TINY, hidden_size=1 << 18, tokenizer_fingerprint="wide")
    reg = client.register_model("wide", "0123abcd", wide)     # E slab of 256 tokens = 128 MiB
    entry = EntryData(b"\2" * 32, {(Kind.E, layer): _zeros_bf16((256, 1 << 18)) for layer in range(3)})
    with pytest.raises(ResourceExhaustedError,
                       match="needs 402653184 bytes, memory tier capacity is 268435456 bytes"):
        client.put(reg.family_id, "wide", [entry])


def _zeros_bf16(shape):
    return np.zeros(shape, dtype=ml_dtypes.bfloat16)


def test_oversize_message(server_factory, rng):
    srv = server_factory("--memory-bytes", "64MiB", "--max-message-bytes", "1MiB")
    with CacheClient(srv.address, ClientOptions(max_message_bytes=16 << 20)) as client:
        reg = client.register_model("p", "0123abcd", TINY)
        stub = pb_grpc.CacheServiceStub(grpc.insecure_channel(
            srv.address, options=[("grpc.max_send_message_length", 16 << 20)]))
        res = _reserve(stub, reg.family_id, [_slab()])
        with pytest.raises(grpc.RpcError) as e:
            stub.WriteSlabs(iter([pb.WriteChunk(reservation_id=res.reservation_id, entry_index=0,
                                                offset=0, data=bytes(2 << 20))]), timeout=5)
        assert _code(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.match("larger than max")
        assert client.stats()["entries"] == 0          # still serving


def test_client_side_checks(client, rng):
    reg = client.register_model("p", "0123abcd", TINY)
    h = client.hash_tokens(list(range(256)), reg.family_id)[0]
    with pytest.raises(ValueError, match="disagree on the token count"):
        plan_put("default", reg.family_id, TINY, "p", [EntryData(h, {
            (Kind.K, 0): _zeros_bf16((256, 2, 8)), (Kind.K, 1): _zeros_bf16((128, 2, 8))})])
    with pytest.raises(ValueError, match="not C-contiguous"):
        plan_put("default", reg.family_id, TINY, "p", [EntryData(h, {
            (Kind.K, 0): _zeros_bf16((8, 2, 256)).transpose(2, 1, 0)})])
    with pytest.raises(InvalidArgumentError, match="dtype is float32"):
        client.put(reg.family_id, "p", [EntryData(h, {(Kind.K, 0): np.zeros((256, 2, 8), np.float32)})])
    assert client.stats()["open_reservations"] == 0


def test_tampered_run_is_a_miss_not_data():
    """The SDK verifies every slab: a run whose bytes do not match its checksum is
    reported missing and never counted valid."""
    asm = SlabAssembler(TINY, [256], [Kind.K], 0, 2, None, False)
    good, bad = bytes(SLAB_K), bytearray(SLAB_K)
    bad[5] = 1
    asm.feed((pb.SlabRun(entry_index=0, kind=1, layer_start=0, num_layers=2,
                         checksums=[xxhash.xxh3_64_intdigest(good)] * 2),
              memoryview(good + bytes(bad))))
    result = asm.result()
    assert result.valid_chunks == 0
    assert [(m.layer_start, m.reason) for m in result.missing] == [(1, "checksum mismatch")]
