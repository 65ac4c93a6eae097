"""The node's LMCache ``lm://`` endpoint (issue 14, part 2): a real node with
``--lm-port``, spoken to with LMCache's exact framing (cachesvc.wire.lmwire), and by
LMCache 0.5.6's own client from its own virtualenv (``make lmcache-venv``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cachesvc.wire.lmwire import FAIL, RESPONSE, SUCCESS, Command, Format, pack_request, parse_response

ROOT = Path(__file__).parents[1]
LMCACHE_PYTHON = ROOT / ".lmcache" / "venv" / "bin" / "python"
WORKER = ROOT / "bench" / "cachesvc_bench" / "lmcache_worker.py"


class LmConn:
    """A raw ``lm://`` client: one connection, requests in order."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)

    def close(self) -> None:
        self.sock.close()

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise ConnectionError("closed")
            buf += got
        return bytes(buf)

    def put(self, key: str, data: bytes, fmt: int, dtype_code: int, shape: tuple[int, ...]) -> None:
        self.sock.sendall(pack_request(Command.PUT, key, len(data), fmt, dtype_code, shape) + data)

    def get(self, key: str):
        self.sock.sendall(pack_request(Command.GET, key))
        head = parse_response(self._recv(RESPONSE.size))
        return head, self._recv(head.length) if head.code == SUCCESS else b""

    def exist(self, key: str) -> bool:
        self.sock.sendall(pack_request(Command.EXIST, key))
        return parse_response(self._recv(RESPONSE.size)).code == SUCCESS

    def health(self) -> bool:
        self.sock.sendall(pack_request(Command.HEALTH, "x@1@0@0@bfloat16"))
        return parse_response(self._recv(RESPONSE.size)).code == SUCCESS

    def list(self) -> list[str]:
        self.sock.sendall(pack_request(Command.LIST, "x@1@0@0@bfloat16"))
        head = parse_response(self._recv(RESPONSE.size))
        body = self._recv(head.length).decode()
        return body.split("\n") if body else []

    def closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


@pytest.fixture
def lm_node(server_factory):
    srv = server_factory("--memory-bytes", "64MiB", "--lm-port", "0")
    return srv, srv.serving("lm_port")


def _key(i: int, model: str = "meta-llama/Llama-3.1-8B") -> str:
    return f"{model}@1@0@{i * 7919 - 5000:x}@bfloat16"


# (format, dtype code, shape): LMCache's KV layouts become real slabs; the rest opaque.
OBJECTS = [
    (Format.KV_2LTD, 3, (2, 4, 256, 64)),      # bf16, a full chunk
    (Format.KV_2LTD, 3, (2, 4, 37, 64)),       # the last, partial chunk of a prompt
    (Format.KV_MLA_FMT, 2, (1, 3, 256, 96)),   # fp16, K only
    (Format.KV_2TD, 4, (2, 128, 32)),          # fp32, one layer (layer-wise keys)
    (Format.KV_T2D, 3, (16, 2, 64)),           # token-major K/V: kept opaque
    (Format.BINARY, 6, (1000, 0, 0, 0)),       # bytes
]
ITEMSIZE = {2: 2, 3: 2, 4: 4, 6: 1}


def _payload(rng, dtype_code: int, shape: tuple[int, ...], fmt: int) -> bytes:
    n = shape[0] if fmt == Format.BINARY else int(np.prod([d for d in shape if d]))
    return rng.integers(0, 256, n * ITEMSIZE[dtype_code], dtype=np.uint8).tobytes()


def test_put_get_exist_list_health_byte_identical(lm_node, rng):
    _, port = lm_node
    conn = LmConn(port)
    assert conn.health()
    stored = {}
    for i, (fmt, code, shape) in enumerate(OBJECTS):
        key = _key(i)
        assert not conn.exist(key)
        data = _payload(rng, code, shape, fmt)
        conn.put(key, data, fmt, code, shape)
        stored[key] = (fmt, code, shape, data)
    for key, (fmt, code, shape, data) in stored.items():
        assert conn.exist(key)
        head, got = conn.get(key)
        assert head.code == SUCCESS and got == data
        assert (head.fmt, head.dtype_code, head.length) == (fmt, code, len(data))
        assert head.shape == (tuple(shape) + (0, 0, 0))[:4]
    assert sorted(conn.list()) == sorted(stored)
    head, got = conn.get(_key(99))
    assert head.code == FAIL and head.length == 0
    # Another model's key of the same hash reaches nothing (the namespace is per model).
    assert not conn.exist(_key(0, model="other-model"))
    # A second connection sees all of it (the first connection's PUTs were taken in order).
    other = LmConn(port)
    assert all(other.exist(k) for k in stored)


def test_a_key_stored_again_with_another_shape_answers_the_new_object(lm_node, rng):
    _, port = lm_node
    conn = LmConn(port)
    key = _key(1)
    first = _payload(rng, 3, (2, 2, 256, 32), Format.KV_2LTD)
    second = _payload(rng, 3, (2, 2, 256, 64), Format.KV_2LTD)
    conn.put(key, first, Format.KV_2LTD, 3, (2, 2, 256, 32))
    conn.put(key, second, Format.KV_2LTD, 3, (2, 2, 256, 64))
    head, got = conn.get(key)
    assert got == second and head.shape == (2, 2, 256, 64)
    third = _payload(rng, 3, (2, 4, 128, 64), Format.KV_2LTD)   # as many bytes, another shape
    conn.put(key, third, Format.KV_2LTD, 3, (2, 4, 128, 64))
    head, got = conn.get(key)
    assert got == third and head.shape == (2, 4, 128, 64)


@pytest.mark.parametrize("header, why", [
    (pack_request(9, _key(0)), "unknown command"),
    (pack_request(Command.PUT, _key(0), 0x7FFFFFFF, Format.BINARY, 6, (0x7FFFFFFF, 0, 0, 0)), "takes 1.."),
    (pack_request(Command.PUT, _key(0), 100, Format.KV_2LTD, 3, (2, 4, 256, 64)), "does not match"),
    (pack_request(Command.PUT, _key(0), 64, Format.KV_2LTD, 5, (2, 1, 1, 4)), "dtype code 5"),
    (pack_request(Command.PUT, "not-a-key", 2, Format.BINARY, 6, (2, 0, 0, 0)), "not model@"),
    (pack_request(Command.GET, "m@1@0@zz@bfloat16"), "not a number"),
    (pack_request(Command.PUT, "m@1@0@a\nb@bfloat16", 2, Format.BINARY, 6, (2, 0, 0, 0)), "control characters"),
    (pack_request(Command.PUT, _key(0), -5, Format.BINARY, 6, (2, 0, 0, 0)), "negative length"),
    (b"\xff" * 36 + b"\xfe" * 150, "unknown command"),
])
def test_a_bad_request_closes_only_its_connection(lm_node, header, why):
    srv, port = lm_node
    good = LmConn(port)
    bad = LmConn(port)
    bad.sock.sendall(header)
    assert bad.closed_by_peer()
    assert good.health() and LmConn(port).health()   # the node serves on, old and new connections
    assert good.list() == []                         # nothing of it was stored
    assert why in srv.log()
    assert "Traceback" not in srv.log()


def test_a_flood_of_bad_headers_costs_a_few_log_lines(lm_node):
    srv, port = lm_node
    before = srv.log().count("lm:// connection closed")
    for _ in range(200):
        c = LmConn(port)
        c.sock.sendall(pack_request(77, _key(0)))
        assert c.closed_by_peer()
        c.close()
    assert LmConn(port).health()
    assert srv.log().count("lm:// connection closed") - before <= 11


def test_a_writer_dying_mid_payload_stores_nothing(lm_node, rng):
    _, port = lm_node
    data = _payload(rng, 3, (2, 4, 256, 64), Format.KV_2LTD)
    dying = LmConn(port)
    dying.sock.sendall(pack_request(Command.PUT, _key(3), len(data), Format.KV_2LTD, 3, (2, 4, 256, 64)) +
                       data[:len(data) // 2])
    dying.sock.close()
    conn = LmConn(port)
    assert conn.health() and not conn.exist(_key(3)) and conn.list() == []


def test_restart_keeps_every_chunk_and_disk_rot_is_a_miss(server_factory, tmp_path, rng):
    args = ("--memory-bytes", "64MiB", "--lm-port", "0")
    srv = server_factory(*args, workdir=tmp_path / "node")
    conn = LmConn(srv.serving("lm_port"))
    stored = {}
    for i in range(12):
        stored[_key(i)] = _payload(rng, 3, (2, 4, 256, 64), Format.KV_2LTD)
        conn.put(_key(i), stored[_key(i)], Format.KV_2LTD, 3, (2, 4, 256, 64))
    assert conn.exist(_key(11))   # taken in order: every PUT before it is committed
    assert srv.stop() == 0
    files = sorted((srv.data_dir / "entries").rglob("*.ent"))
    assert len(files) == 12
    rotten = files[5]
    raw = bytearray(rotten.read_bytes())
    raw[len(raw) // 2] ^= 0xFF      # inside the payload
    rotten.write_bytes(bytes(raw))
    srv.start()
    conn = LmConn(srv.serving("lm_port"))
    identical = missing = 0
    for key, data in stored.items():
        head, got = conn.get(key)
        if head.code == SUCCESS:
            assert got == data, "wrong bytes served"
            identical += 1
        else:
            missing += 1
    assert (identical, missing) == (11, 1)
    assert len(conn.list()) == 11


def test_eviction_keeps_the_node_inside_its_budget(server_factory, rng):
    srv = server_factory("--memory-bytes", "8MiB", "--disk-mode", "off", "--lm-port", "0")
    conn = LmConn(srv.serving("lm_port"))
    stored = {}
    for i in range(24):   # 24 MiB into 8 MiB
        stored[_key(i)] = _payload(rng, 3, (2, 4, 256, 256), Format.KV_2LTD)
        conn.put(_key(i), stored[_key(i)], Format.KV_2LTD, 3, (2, 4, 256, 256))
    hits = 0
    for key, data in stored.items():
        head, got = conn.get(key)
        if head.code == SUCCESS:
            assert got == data
            hits += 1
    assert 3 <= hits <= 8
    assert conn.get(_key(23))[1] == stored[_key(23)]   # the newest survives
    assert conn.get(_key(0))[0].code == FAIL           # the oldest was evicted


def test_a_put_of_a_key_already_stored_keeps_it_through_eviction(server_factory, rng):
    """LMCache's PUT has no answer, and its client reads back what it just put: a PUT of a
    key the node holds (its bytes discarded) counts as a use, so the PUTs after it evict
    older keys first. Before, the key kept its old place and went first (a GET miss in
    ``bench dataplane``'s LMCache section, 2026-12-08)."""
    srv = server_factory("--memory-bytes", "8MiB", "--disk-mode", "off", "--lm-port", "0")
    conn = LmConn(srv.serving("lm_port"))
    shape = (2, 4, 256, 256)   # 1 MiB each: about 8 fit
    stored = {_key(i): _payload(rng, 3, shape, Format.KV_2LTD) for i in range(16)}
    for i in range(6):
        conn.put(_key(i), stored[_key(i)], Format.KV_2LTD, 3, shape)
    conn.put(_key(0), stored[_key(0)], Format.KV_2LTD, 3, shape)   # again: the oldest becomes the newest
    for i in range(6, 12):
        conn.put(_key(i), stored[_key(i)], Format.KV_2LTD, 3, shape)
    head, got = conn.get(_key(0))
    assert head.code == SUCCESS and got == stored[_key(0)]
    assert conn.get(_key(1))[0].code == FAIL            # the least recently used went instead


def _lmcache(*args: str) -> dict:
    if not LMCACHE_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{LMCACHE_PYTHON} missing in CI: make test builds it (make lmcache-venv)")
        pytest.skip("LMCache's virtualenv is not built (make lmcache-venv)")
    proc = subprocess.run([str(LMCACHE_PYTHON), str(WORKER), *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lmcache_own_client_reads_back_every_chunk_across_a_restart(server_factory, tmp_path):
    srv = server_factory("--memory-bytes", "256MiB", "--lm-port", "0", workdir=tmp_path / "node")
    address = f"127.0.0.1:{srv.serving('lm_port')}"
    common = ("--address", address, "--chunks", "100", "--chunk-bytes", str(256 << 10), "--seed", "7")
    assert _lmcache("put", *common) == {"stored": 100}
    assert _lmcache("check", *common) == {"identical": 100, "missing": 0, "wrong": 0, "exists_first": True}
    assert srv.stop() == 0
    srv.start()
    common = ("--address", f"127.0.0.1:{srv.serving('lm_port')}", *common[2:])
    assert _lmcache("check", *common) == {"identical": 100, "missing": 0, "wrong": 0, "exists_first": True}
