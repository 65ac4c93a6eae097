"""API tokens with real processes: a node started with --auth-tokens binds every caller to
its token's tenant and role, on gRPC and on the socket data plane alike; the shared-memory
path is off unless the host is trusted; tokens never reach the logs."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from cachesvc.node.auth import new_token
from cachesvc.wire.protocol import FrameType, Op, pack_request, read_frame
from cachesvc_client import (AsyncCacheClient, CacheClient, ClientOptions, InvalidArgumentError, Kind,
                             PermissionDeniedError, UnauthenticatedError)
from conftest import TINY, make_entry


@pytest.fixture
def tokens(tmp_path):
    made, entries = {}, []
    for name, tenant, role in (("alpha-w", "alpha", "write"), ("alpha-r", "alpha", "read"),
                               ("beta-w", "beta", "write"), ("ops", "", "admin")):
        token, entry = new_token(name, tenant, role)
        made[name] = token
        entries.append(entry)
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": entries}))
    return path, made


@pytest.fixture
def secured(server_factory, tokens):
    path, made = tokens
    return server_factory("--memory-bytes", "64MiB", "--auth-tokens", str(path)), made


def client(node, token: str = "", transport: str = "auto") -> CacheClient:
    return CacheClient(node.address, ClientOptions(token=token, transport=transport))


def test_every_path_is_bound_to_the_tokens_tenant_and_role(secured, rng):
    node, tokens = secured
    with client(node, tokens["ops"]) as ops:         # an admin registers in any tenant
        reg = ops.register_model("m", "abcdef01", TINY, tenant="alpha")
    hashes = [bytes([i]) * 32 for i in range(3)]
    entries = [make_entry(rng, TINY, h, 16) for h in hashes]
    for transport in ("grpc", "tcp"):
        with client(node, tokens["alpha-w"], transport) as alpha:
            assert alpha.put(reg.family_id, "m", entries).entries_committed in (0, 3)
            hit = alpha.lookup(reg.family_id, hashes).best()
            assert hit.num_chunks == 3
            got = alpha.get(reg.family_id, hit, (Kind.K,))
            assert got.valid_chunks == 3 and got.transport == transport
    # the same hashes and entry ids through beta's token: nothing, on every path. Models are
    # per tenant: beta sees none of alpha's, and its own "m" (of the same family) may name
    # other weights.
    with client(node, tokens["beta-w"], "tcp") as beta:
        assert beta.list_models() == []
        beta.register_model("m", "beef0001", TINY)
        assert beta.lookup(reg.family_id, hashes).hits == []
        assert beta.get(reg.family_id, hit, (Kind.K,)).valid_chunks == 0
        assert beta.list_entries()[0] == []
        assert beta.delete(reg.family_id, entry_ids=hit.entry_ids) == 0
        with pytest.raises(PermissionDeniedError, match="for tenant 'beta', not 'alpha'"):
            beta.lookup(reg.family_id, hashes, tenant="alpha")
        with pytest.raises(PermissionDeniedError, match="'alpha'"):
            beta.get(reg.family_id, hit, (Kind.K,), tenant="alpha")
    # a read token reads, and may not write or delete
    with client(node, tokens["alpha-r"], "tcp") as reader:
        assert reader.lookup(reg.family_id, hashes).best().num_chunks == 3
        with pytest.raises(PermissionDeniedError, match="Reserve needs the write role"):
            reader.put(reg.family_id, "m", entries)
        with pytest.raises(PermissionDeniedError, match="write role"):
            reader.delete(reg.family_id, chunk_hashes=hashes)
    with client(node, tokens["beta-w"]) as beta:
        assert [m["weights_digest"] for m in beta.list_models()] == ["beef0001"]
        beta.put(reg.family_id, "m", entries[:1])
        with pytest.raises(PermissionDeniedError, match="not 'alpha'"):
            beta.list_models(tenant="alpha")
    with client(node, tokens["alpha-r"]) as reader:
        assert [m["weights_digest"] for m in reader.list_models()] == ["abcdef01"]
        with pytest.raises(PermissionDeniedError, match="RegisterModel needs the write role"):
            reader.register_model("m2", "abcdef02", TINY)
    # a write token may replace its tenant's model: that drops its own entries of it, not beta's
    with client(node, tokens["alpha-w"]) as alpha:
        alpha.register_model("m", "ffffffff", TINY, replace=True)
        assert alpha.lookup(reg.family_id, hashes).hits == []
    with client(node, tokens["beta-w"]) as beta:
        assert beta.lookup(reg.family_id, hashes[:1]).best().num_chunks == 1
    # the admin sees every tenant
    with client(node, tokens["ops"]) as ops:
        assert ops.lookup(reg.family_id, hashes[:1], tenant="beta").best().num_chunks == 1
        assert [m["weights_digest"] for m in ops.list_models(tenant="alpha")] == ["ffffffff"]


def test_no_or_a_wrong_token_is_refused_on_grpc_and_the_data_plane(secured):
    node, tokens = secured
    with client(node) as anonymous:
        with pytest.raises(UnauthenticatedError, match="requires an API token"):
            anonymous.list_models()
    with client(node, "csv_not-a-token") as stranger:
        with pytest.raises(UnauthenticatedError, match="not valid"):
            stranger.stats()
    with client(node, tokens["alpha-r"]) as alpha:
        tcp = alpha.stats()  # the node serves on
        address = dict(alpha._call(alpha._stub.Stats, __import__("cachesvc.v1.cachesvc_pb2",
                                                                    fromlist=["pb"]).StatsRequest()).fetch.transports)
    assert tcp["counters"]["lookups"] == 0
    assert set(address) == {"tcp"}          # no shm (host not trusted) and no UCX (no token handshake)
    host, port = address["tcp"].decode().rsplit(":", 1)
    for first in (pack_request(Op.GET, b""), pack_request(Op.AUTH, b"csv_wrong")):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(first)
            frame = read_frame(sock)
            assert frame.type == FrameType.ERROR and frame.header.startswith(b"UNAUTHENTICATED:")
            assert sock.recv(1) == b""      # and the node closed that connection
    with pytest.raises(InvalidArgumentError, match="Bearer"):
        import grpc
        stub_channel = grpc.insecure_channel(node.address)
        from cachesvc.v1 import cachesvc_pb2 as pb
        from cachesvc.v1 import cachesvc_pb2_grpc as pb_grpc
        try:
            pb_grpc.CacheServiceStub(stub_channel).Stats(pb.StatsRequest(), metadata=(("authorization", "Basic x"),))
        except grpc.RpcError as exc:
            from cachesvc_client.errors import from_rpc_error
            raise from_rpc_error(exc) from None
    log = node.log()
    assert all(token not in log for token in tokens.values()) and "csv_wrong" not in log


def test_the_async_client_and_a_trusted_hosts_shared_memory_carry_the_token(server_factory, tokens, rng):
    path, made = tokens
    node = server_factory("--memory-bytes", "64MiB", "--auth-tokens", str(path), "--trust-host", "true")
    with client(node, made["ops"]) as ops:
        reg = ops.register_model("m", "abcdef01", TINY, tenant="alpha")
    hashes = [bytes([7]) * 32]
    with client(node, made["alpha-r"], "shm") as reader:     # a put's Reserve over the socket, refused
        with pytest.raises(PermissionDeniedError, match="Reserve needs the write role"):
            reader.put(reg.family_id, "m", [make_entry(rng, TINY, hashes[0], 16)])
    with client(node, made["alpha-w"], "shm") as alpha:       # Reserve and Commit over the socket, as alpha
        alpha.put(reg.family_id, "m", [make_entry(rng, TINY, hashes[0], 16)])
        hit = alpha.lookup(reg.family_id, hashes, locate=True).best()     # over the Unix socket
        assert alpha.get(reg.family_id, hit, (Kind.V,)).transport == "shm"
    with client(node, made["beta-w"], "shm") as beta:
        assert beta.lookup(reg.family_id, hashes).hits == []

    async def run():
        async with AsyncCacheClient(node.address, ClientOptions(token=made["alpha-r"])) as aio:
            return (await aio.lookup(reg.family_id, hashes)).best().num_chunks
    assert asyncio.run(run()) == 1


def test_bad_tokens_files_are_clear_errors_at_start(tmp_path):
    cases = {"missing.json": None, "empty.json": {"tokens": []},
             "role.json": {"tokens": [{"tenant": "a", "role": "owner", "sha256": "0" * 64}]},
             "digest.json": {"tokens": [{"tenant": "a", "role": "read", "sha256": "xyz"}]},
             "tenantless.json": {"tokens": [{"tenant": "", "role": "write", "sha256": "0" * 64}]}}
    for name, doc in cases.items():
        if doc is not None:
            (tmp_path / name).write_text(json.dumps(doc))
        run = subprocess.run([sys.executable, "-m", "cachesvc.node.cli", "serve", "--port", "0", "--auth-tokens",
                              str(tmp_path / name), "--data-dir", str(tmp_path / "d")],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2, (name, run.stderr)
        assert "auth tokens file" in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_lm_endpoint_needs_an_explicit_tenant_with_tokens(tmp_path, tokens):
    path, _ = tokens
    run = subprocess.run([sys.executable, "-m", "cachesvc.node.cli", "serve", "--port", "0", "--auth-tokens",
                          str(path), "--lm-port", "0", "--data-dir", str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--lm-tenant" in run.stderr


def test_cachesvc_token_prints_a_token_and_its_entry():
    run = subprocess.run([sys.executable, "-m", "cachesvc.node.cli", "token", "--tenant", "alpha", "--role", "read"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    lines = run.stdout.splitlines()
    token, entry = lines[1].strip(), json.loads(lines[3])
    from cachesvc.node.auth import token_digest
    assert entry == {"name": "token", "tenant": "alpha", "role": "read", "sha256": token_digest(token)}
    assert np.all([c.isprintable() for c in token])


def test_a_cluster_with_tokens_serves_its_tenants_and_re_replicates(tmp_path, tokens, monkeypatch, rng):
    """Nodes check tokens; the ClusterClient carries one; re-replication copies with the
    nodes' peer token (CACHESVC_PEER_TOKEN, from the environment)."""
    import signal
    import time

    from cachesvc.node.launcher import LocalCluster
    from cachesvc_client.cluster import ClusterClient
    path, made = tokens
    monkeypatch.setenv("CACHESVC_PEER_TOKEN", made["ops"])
    args = ["--memory-bytes", "64MiB", "--heartbeat-ttl-s", "1", "--auth-tokens", str(path)]
    with LocalCluster(tmp_path / "c", 3, args) as cluster, \
            ClusterClient(redis_url=cluster.redis.url, options=ClientOptions(token=made["alpha-w"])) as alpha:
        alpha.wait_ready(3)
        with ClusterClient(redis_url=cluster.redis.url, options=ClientOptions(token=made["ops"])) as ops:
            reg = ops.register_model("m", "abcdef01", TINY, tenant="alpha")
        hashes = alpha.hash_tokens(list(range(256 * 6)), reg.family_id)
        entries = [make_entry(rng, TINY, h, 256) for h in hashes]
        assert alpha.put(reg.family_id, "m", entries).replicas_written == 12
        with ClusterClient(redis_url=cluster.redis.url, options=ClientOptions(token=made["beta-w"])) as beta:
            assert beta.lookup(reg.family_id, hashes).hits == []
        cluster.nodes["n0"].stop(signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            hit = alpha.lookup(reg.family_id, hashes).best("m")
            if hit and "n0" not in alpha.nodes(fresh=True) and all(len(o) == 2 and "n0" not in o for o in hit.owners):
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"not re-replicated with the peer token: {hit and hit.owners}")
        assert alpha.get(reg.family_id, hit, (Kind.K, Kind.V, Kind.E)).valid_chunks == 6
        assert all(made["ops"] not in node.log() for node in cluster.nodes.values())
