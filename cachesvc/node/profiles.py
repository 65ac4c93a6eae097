"""Reuse profiles per (producer, consumer) pair, versioned by both models' weights.

A pair of one model with itself (producer = consumer) is that model's cross-context
profile: how it reuses its own cache behind other prefixes (the connectors'
reuse.crosscontext); the registry treats it like any pair.

A profile is a JSON document the connectors write (``cachesvc profile``) and read (to
choose a plan); the service checks only what it can: both models registered, one family,
the digests the profile was measured on equal to the registered ones at put time, a JSON
object of bounded size. A profile whose digests no longer match (a model was registered
again with other weights) is *stale*: listed as such, never served by ``get``. A profile
can be *flagged* for re-profiling (a consumer's drift guard saw it fail): still served,
listed with the reason, until the next ``put`` replaces it.
Profiles are namespaced by tenant as models are (cachesvc.node.models): a pair is two of
the tenant's own models. Persisted beside the model registry, written atomically outside
the store lock (jsonfile).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from cachesvc.node.jsonfile import JsonFile
from cachesvc.wire.errors import FailedPrecondition, InvalidArgument, NotFound
from cachesvc.node.models import ModelRegistry
from cachesvc.wire.keys import DEFAULT_TENANT

MAX_PROFILE_BYTES = 4 << 20
MAX_FLAG_BYTES = 1024


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    producer: str
    consumer: str
    producer_digest: str   # hex, lowercased
    consumer_digest: str
    document: bytes        # UTF-8 JSON object
    version: int
    flagged: str = ""      # the last re-profiling flag on this version ("" = none)
    flags: int = 0
    tenant: str = DEFAULT_TENANT


def _key(rec: ProfileRecord) -> tuple[str, str, str]:
    return rec.tenant, rec.producer, rec.consumer


class ProfileRegistry:
    """(tenant, producer, consumer) -> newest profile. Not thread-safe: the store locks."""

    def __init__(self, models: ModelRegistry, path: Path | None = None) -> None:
        self._models = models
        self._file = JsonFile(path)
        self._profiles: dict[tuple[str, str, str], ProfileRecord] = {}
        for doc in self._file.read() or ():
            rec = ProfileRecord(doc["producer"], doc["consumer"], doc["producer_digest"],
                                doc["consumer_digest"], base64.b64decode(doc["document"]),
                                doc["version"], doc.get("flagged", ""), doc.get("flags", 0),
                                doc.get("tenant", DEFAULT_TENANT))
            self._profiles[_key(rec)] = rec

    def put(self, producer: str, consumer: str, producer_digest: str, consumer_digest: str,
            document: bytes, *, tenant: str) -> ProfileRecord:
        if len(document) > MAX_PROFILE_BYTES:
            raise InvalidArgument(f"profile document has {len(document)} bytes, more than the "
                                  f"{MAX_PROFILE_BYTES} allowed")
        try:
            parsed = json.loads(document.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidArgument(f"profile document is not UTF-8 JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise InvalidArgument(f"profile document must be a JSON object, not {type(parsed).__name__}")
        prod, cons = self._models.get(producer, tenant=tenant), self._models.get(consumer, tenant=tenant)
        if prod.family_id != cons.family_id:
            raise FailedPrecondition(f"producer {producer!r} (family {prod.family_id}) and consumer "
                                     f"{consumer!r} (family {cons.family_id}) cannot share a cache")
        for model, digest in ((prod, producer_digest), (cons, consumer_digest)):
            if digest.lower() != model.weights_digest:
                raise FailedPrecondition(
                    f"the profile was measured on {model.model_id!r} with weights {digest[:12] or '(none)'}, "
                    f"but {model.weights_digest[:12]} is registered: profile the registered model")
        old = self._profiles.get((tenant, producer, consumer))
        rec = ProfileRecord(producer, consumer, producer_digest.lower(), consumer_digest.lower(),
                            bytes(document), old.version + 1 if old else 1, tenant=tenant)
        self._profiles[_key(rec)] = rec
        self._save()
        return rec

    def get(self, producer: str, consumer: str, *, tenant: str) -> ProfileRecord:
        rec = self._profiles.get((tenant, producer, consumer))
        if rec is None:
            raise NotFound(f"no profile for producer {producer!r} and consumer {consumer!r}")
        if self.stale(rec):
            raise FailedPrecondition(f"the profile of ({producer!r}, {consumer!r}) is stale: a model "
                                     "was registered with other weights since; re-profile the pair")
        return rec

    def flag(self, producer: str, consumer: str, version: int, reason: str, *, tenant: str) -> tuple[bool, int]:
        """Mark the pair for re-profiling with ``reason``, if ``version`` (0: any) is still
        the current one; (applied, flags on the current version)."""
        if not reason.strip():
            raise InvalidArgument("a flag needs a reason (what the drift guard saw)")
        if len(reason.encode()) > MAX_FLAG_BYTES:
            raise InvalidArgument(f"flag reason has {len(reason.encode())} bytes, more than the "
                                  f"{MAX_FLAG_BYTES} allowed")
        rec = self._profiles.get((tenant, producer, consumer))
        if rec is None:
            raise NotFound(f"no profile for producer {producer!r} and consumer {consumer!r}")
        if version and version != rec.version:
            return False, rec.flags
        rec = dataclasses.replace(rec, flagged=reason, flags=rec.flags + 1)
        self._profiles[_key(rec)] = rec
        self._save()
        return True, rec.flags

    def stale(self, rec: ProfileRecord) -> bool:
        """True when either model is gone or registered with other weights."""
        try:
            return (self._models.get(rec.producer, tenant=rec.tenant).weights_digest != rec.producer_digest or
                    self._models.get(rec.consumer, tenant=rec.tenant).weights_digest != rec.consumer_digest)
        except NotFound:
            return True

    def list(self, producer: str = "", consumer: str = "", tenant: str | None = None) -> list[ProfileRecord]:
        """Matching profiles of ``tenant`` (None: every tenant's, for the node's own bookkeeping)."""
        return [rec for key, rec in sorted(self._profiles.items())
                if (tenant is None or key[0] == tenant) and (not producer or key[1] == producer)
                and (not consumer or key[2] == consumer)]

    def _save(self) -> None:
        self._file.stage([{"tenant": r.tenant, "producer": r.producer, "consumer": r.consumer, "producer_digest": r.producer_digest,
                           "consumer_digest": r.consumer_digest, "version": r.version,
                           "flagged": r.flagged, "flags": r.flags,
                           "document": base64.b64encode(r.document).decode()} for r in self.list()])

    def flush(self) -> None:
        """Write staged changes to the file (without the store lock)."""
        self._file.flush()
