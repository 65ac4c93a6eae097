"""TLS and mTLS on real nodes: certificates made here (the `cryptography` package), then
gRPC and the TCP data plane over TLS, and every way of getting it wrong refused."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cachesvc.node.config import ServerConfig
from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc.wire.protocol import Op, pack_request
from cachesvc.wire.tls import client_context
from cachesvc_client import CacheClient, CacheServiceError, ClientOptions, Kind, UnavailableError
from conftest import TINY, make_entry, same_bytes


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(subject: str, issuer_key, issuer: str | None, ca: bool, san: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer or subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, builder.sign(issuer_key or key, hashes.SHA256())


def _write(folder: Path, name: str, key, cert) -> tuple[str, str]:
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """A CA, a node certificate for 127.0.0.1 and a client certificate it signed, and a
    rogue CA with a client certificate of its own."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca = _issue("cachesvc test CA", None, None, ca=True)
    node_key, node = _issue("node", ca_key, "cachesvc test CA", ca=False, san=True)
    client_key, client = _issue("client", ca_key, "cachesvc test CA", ca=False)
    rogue_key, rogue = _issue("rogue CA", None, None, ca=True)
    stranger_key, stranger = _issue("stranger", rogue_key, "rogue CA", ca=False)
    return {"ca": _write(folder, "ca", ca_key, ca), "node": _write(folder, "node", node_key, node),
            "client": _write(folder, "client", client_key, client),
            "rogue": _write(folder, "rogue", rogue_key, rogue),
            "stranger": _write(folder, "stranger", stranger_key, stranger)}


def _round_trip(client: CacheClient, rng) -> None:
    """Register, put, look up and fetch over gRPC and the TCP data plane, byte for byte."""
    fid = client.register_model("m", "0123abcd", TINY).family_id
    hashes = client.hash_tokens(list(range(512)), fid)
    entries = [make_entry(rng, TINY, h, 256) for h in hashes]
    client.put(fid, "m", entries, transport="tcp")
    hit = client.lookup(fid, hashes).best()
    for transport in ("grpc", "tcp"):
        got = client.get(fid, hit, (Kind.K,), transport=transport)
        assert got.complete and got.transport == transport
        for layer in range(TINY.num_layers):
            for i, entry in enumerate(entries):
                assert same_bytes(got.arrays[Kind.K][layer, i * 256:(i + 1) * 256], entry.slabs[(Kind.K, layer)])


def test_a_tls_node_serves_tls_clients_and_refuses_plaintext(server_factory, pki, rng):
    cert, key = pki["node"]
    srv = server_factory("--memory-bytes", "64MiB", "--tls-cert", cert, "--tls-key", key)
    with CacheClient(srv.address, ClientOptions(tls_ca=pki["ca"][0], transport="tcp")) as client:
        _round_trip(client, rng)
        fetch = client._call(client._stub.Stats, pb.StatsRequest()).fetch
        assert "ucx" not in fetch.transports                    # UCX has no TLS: not offered
    with CacheClient(srv.address, ClientOptions(retry=None)) as plain:
        with pytest.raises(UnavailableError):
            plain.stats()
    host, port = fetch.transports["tcp"].decode().rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:   # plaintext on the TLS data port
        sock.sendall(pack_request(Op.GET, pb.GetSlabsRequest().SerializeToString()))
        try:
            reply = sock.recv(64)
        except ConnectionResetError:
            reply = b""
        assert reply == b"" or reply[0] == 0x15                # closed, at most a TLS alert: no frame
    with CacheClient(srv.address, ClientOptions(tls_ca=pki["rogue"][0], retry=None)) as wrong_ca:
        with pytest.raises(UnavailableError):                 # the node's certificate does not verify
            wrong_ca.stats()


def test_mutual_tls_admits_only_clients_with_a_certificate_the_node_trusts(server_factory, pki, rng):
    cert, key = pki["node"]
    srv = server_factory("--memory-bytes", "64MiB", "--tls-cert", cert, "--tls-key", key,
                         "--tls-client-ca", pki["ca"][0])
    ca = pki["ca"][0]
    with CacheClient(srv.address, ClientOptions(tls_ca=ca, tls_cert=pki["client"][0], tls_key=pki["client"][1],
                                                transport="tcp")) as client:
        _round_trip(client, rng)
    for options in (ClientOptions(tls_ca=ca, retry=None),                       # no certificate
                    ClientOptions(tls_ca=ca, tls_cert=pki["stranger"][0], tls_key=pki["stranger"][1],
                                  retry=None)):                                  # a rogue CA's
        with CacheClient(srv.address, options) as refused:
            with pytest.raises(CacheServiceError):
                refused.stats()
    # The TCP data plane demands the certificate too: the same request gets an answer
    # with one and none without.
    with CacheClient(srv.address, ClientOptions(tls_ca=ca, tls_cert=pki["client"][0], tls_key=pki["client"][1])) as ok:
        tcp = ok._call(ok._stub.Stats, pb.StatsRequest()).fetch.transports["tcp"].decode()
    assert _data_plane_answer(tcp, client_context(ca, *pki["client"])).startswith(b"\x03")   # an ERROR frame
    assert _data_plane_answer(tcp, client_context(ca)) == b""


def _data_plane_answer(address: str, context: ssl.SSLContext) -> bytes:
    """What the TCP data plane answers a GET (an empty one: an ERROR frame) over TLS with
    ``context``; b"" when the connection is refused or closed."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(pack_request(Op.GET, pb.GetSlabsRequest().SerializeToString()))
            return sock.recv(64)
    except (ssl.SSLError, ConnectionError):
        return b""


def test_plaintext_only_on_loopback_unless_allowed(pki):
    ServerConfig(host="127.0.0.1").validate()
    with pytest.raises(ValueError, match="refusing to serve plaintext on 0.0.0.0"):
        ServerConfig(host="0.0.0.0").validate()
    ServerConfig(host="0.0.0.0", allow_plaintext=True).validate()
    ServerConfig(host="0.0.0.0", tls_cert=pki["node"][0], tls_key=pki["node"][1]).validate()
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        ServerConfig(tls_cert=pki["node"][0]).validate()
    with pytest.raises(ValueError, match="mTLS"):
        ServerConfig(tls_client_ca=pki["ca"][0]).validate()
