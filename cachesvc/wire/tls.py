"""TLS for the gRPC control plane and the TCP data plane: contexts from PEM files.

One rule for both planes and both ends. A node with a certificate serves TLS on gRPC and
on its TCP data plane. With a client CA it also demands client certificates (mTLS).
The same-host Unix socket stays plain: only local processes reach it (docs/dataplane.md,
"Security"). UCX has no TLS, so a node serving TLS does not offer it.
"""

from __future__ import annotations

import ssl
from pathlib import Path


def read_pem(path: str) -> bytes:
    """The file's bytes; ValueError naming the file when it cannot be read."""
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None


def server_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """A server-side context: our certificate chain and key; with ``client_ca``, clients
    must present a certificate it signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: str, cert: str = "", key: str = "") -> ssl.SSLContext:
    """A client-side context that trusts ``ca`` and checks the server's name; with a
    certificate and key, presents them (mTLS)."""
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        context.load_cert_chain(cert, key or None)
    return context
