"""API tokens: who a caller is (its tenant) and what it may do (its role).

A node started with ``--auth-tokens FILE`` (or ``CACHESVC_AUTH_TOKENS``) accepts only
callers presenting one of the file's tokens: on gRPC as ``authorization: Bearer TOKEN``
metadata, on the socket data plane as the connection's first request (op AUTH). The file
holds the tokens' SHA-256, never the tokens, so it is no secret; ``cachesvc token``
makes a token and its line::

    {"tokens": [{"name": "agents-prod", "tenant": "alpha", "role": "write",
                 "sha256": "9f86d0…"}]}

Roles, each including the ones before it:

- ``read``: look up, fetch, pin (to fetch), list its tenant's entries, read its tenant's
  models and profiles, stats;
- ``write``: put (reserve, write, commit, abort), delete its tenant's entries, register
  or replace its tenant's models (a replace drops only that tenant's entries of the
  model: models are per tenant), store and flag its tenant's profiles;
- ``admin``: any tenant (a request's own ``tenant`` is then honoured).

A caller's tenant is its token's: a request naming another tenant is PERMISSION_DENIED,
one naming none (or ``default``, what an SDK told no tenant sends) gets the token's. Tokens and their hashes are never logged; a token's
``name`` is what logs say.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from cachesvc.wire.errors import InvalidArgument, PermissionDenied, Unauthenticated
from cachesvc.wire.keys import DEFAULT_TENANT


class Role(enum.IntEnum):
    READ = 1
    WRITE = 2
    ADMIN = 3


@dataclass(frozen=True, slots=True)
class Principal:
    name: str          # the token's label (what logs may say)
    tenant: str
    role: Role


# The role each gRPC method needs.
METHOD_ROLES: dict[str, Role] = {
    "Lookup": Role.READ, "GetSlabs": Role.READ, "GetModel": Role.READ, "ListModels": Role.READ,
    "GetProfile": Role.READ, "ListProfiles": Role.READ, "ListEntries": Role.READ, "Stats": Role.READ,
    "ListNodes": Role.READ, "Pin": Role.READ, "Unpin": Role.READ,
    "FindSegments": Role.READ, "FindAnchors": Role.READ,
    "PutSegment": Role.WRITE, "AdmitAnchor": Role.WRITE, "RecordAnchor": Role.WRITE, "ActivateAnchors": Role.WRITE,
    "Reserve": Role.WRITE, "WriteSlabs": Role.WRITE, "Commit": Role.WRITE, "Abort": Role.WRITE,
    "Delete": Role.WRITE, "RegisterModel": Role.WRITE, "PutProfile": Role.WRITE, "FlagProfile": Role.WRITE,
}


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    """The tokens of a file, by digest. ValueError (naming the entry) on a bad file."""

    def __init__(self, path: str | Path) -> None:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"auth tokens file {path}: {exc}") from None
        self._by_digest: dict[str, Principal] = {}
        for i, item in enumerate(doc.get("tokens", []) if isinstance(doc, dict) else []):
            try:
                role = Role[str(item["role"]).upper()]
                digest = str(item["sha256"]).lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise ValueError("sha256 must be 64 hex chars")
                principal = Principal(str(item.get("name") or f"token{i}"), str(item["tenant"]), role)
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"auth tokens file {path}: entry {i}: {exc!r} (each needs tenant, role "
                                 "read|write|admin, sha256)") from None
            if not principal.tenant and role != Role.ADMIN:
                raise ValueError(f"auth tokens file {path}: entry {i}: only an admin token may have no tenant")
            self._by_digest[digest] = principal
        if not self._by_digest:
            raise ValueError(f"auth tokens file {path} lists no tokens")

    def principal(self, token: str | None) -> Principal:
        """The caller a token names; Unauthenticated otherwise (same answer for a missing,
        malformed or unknown token, in time independent of which digest is near)."""
        if not token:
            raise Unauthenticated("this node requires an API token (authorization: Bearer TOKEN)")
        digest = token_digest(token)
        found = None
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                found = principal
        if found is None:
            raise Unauthenticated("the API token is not valid on this node")
        return found


def authorize(principal: Principal, method: str, request: object) -> None:
    """Check ``principal`` may call ``method`` with ``request``, and bind the request to
    its tenant (filled in when empty). PermissionDenied otherwise."""
    need = METHOD_ROLES.get(method, Role.ADMIN)
    if principal.role < need:
        raise PermissionDenied(f"{method} needs the {need.name.lower()} role; token {principal.name!r} has "
                               f"{principal.role.name.lower()}")
    if hasattr(request, "tenant") and principal.role != Role.ADMIN:
        tenant = request.tenant
        # "default" is what a client sends when told no tenant: for a token it means the token's.
        if tenant not in ("", DEFAULT_TENANT, principal.tenant):
            raise PermissionDenied(f"token {principal.name!r} is for tenant {principal.tenant!r}, not {tenant!r}")
        request.tenant = principal.tenant


def bearer(metadata) -> str | None:
    """The token of gRPC invocation metadata (``authorization: Bearer TOKEN``)."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() != "bearer" or not token:
                raise InvalidArgument("authorization metadata must be 'Bearer TOKEN'")
            return token.strip()
    return None


def new_token(name: str, tenant: str, role: str) -> tuple[str, dict]:
    """A fresh token and its entry for the tokens file."""
    Role[role.upper()]
    token = "csv_" + secrets.token_urlsafe(32)
    return token, {"name": name, "tenant": tenant, "role": role.lower(), "sha256": token_digest(token)}
