"""Registered models and their families, persisted beside the disk tier.

Models are namespaced by tenant, like every entry: tenant A's ``m`` and tenant B's ``m``
are two records that may name other weights, neither tenant can list, read or replace
the other's, and replacing a model drops only its own tenant's entries of it. Families
are not: a family id is the digest of an architecture's public shape (layers, heads,
dtype, chunk size), which tells nobody anything about another tenant, and the data plane
needs a family's spec whoever asks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from cachesvc.node.jsonfile import JsonFile
from cachesvc.wire.errors import FailedPrecondition, InvalidArgument, NotFound
from cachesvc.wire.keys import DEFAULT_TENANT, DType, FamilyId, FamilySpec, ModelId, check_digest, check_model_id


@dataclass(frozen=True, slots=True)
class ModelRecord:
    model_id: ModelId
    weights_digest: str   # hex, lowercased
    family: FamilySpec
    family_id: FamilyId
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True, slots=True)
class RegisterOutcome:
    record: ModelRecord
    created: bool                     # False: the identical model was already registered
    replaced: ModelRecord | None      # the previous version when replace=True changed it


class ModelRegistry:
    """(tenant, model_id) -> record, and family_id -> spec. Not thread-safe: the store locks.

    With a ``path`` every change is staged for an atomic write (tmp + rename) that the
    store flushes outside its lock (:meth:`flush`), so a restarted server knows the
    producers of the entries it reloads from disk.
    """

    def __init__(self, path: Path | None = None) -> None:
        self._file = JsonFile(path)
        self._models: dict[tuple[str, str], ModelRecord] = {}
        self._families: dict[FamilyId, FamilySpec] = {}
        for doc in self._file.read() or ():
            fam = doc["family"]
            spec = FamilySpec(**{**fam, "dtype": DType(fam["dtype"])})
            # A file written before models had tenants holds the default tenant's.
            self._add(ModelRecord(ModelId(doc["model_id"]), doc["weights_digest"], spec, spec.family_id(),
                                  doc.get("tenant", DEFAULT_TENANT)))

    def _add(self, record: ModelRecord) -> None:
        self._models[(record.tenant, record.model_id)] = record
        self._families[record.family_id] = record.family

    def register(self, model_id: str, weights_digest: str, family: FamilySpec,
                 replace: bool, *, tenant: str) -> RegisterOutcome:
        try:
            check_model_id(model_id)
            check_digest(weights_digest)
            family.validate()
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        record = ModelRecord(ModelId(model_id), weights_digest.lower(), family, family.family_id(), tenant)
        old = self._models.get((tenant, model_id))
        if old == record:
            return RegisterOutcome(old, created=False, replaced=None)
        if old is not None and not replace:
            what = "weights" if old.family_id == record.family_id else "family"
            raise FailedPrecondition(
                f"model {model_id!r} is already registered with other {what} "
                f"(digest {old.weights_digest[:12]}, family {old.family_id}); pass replace=true "
                "to replace it and drop the entries it produced")
        self._add(record)
        self._save()
        return RegisterOutcome(record, created=True, replaced=old)

    def get(self, model_id: str, *, tenant: str) -> ModelRecord:
        try:
            return self._models[(tenant, model_id)]
        except KeyError:
            raise NotFound(f"model {model_id!r} is not registered") from None

    def family(self, family_id: str) -> FamilySpec:
        try:
            return self._families[FamilyId(family_id)]
        except KeyError:
            raise NotFound(f"family {family_id!r} is not known: register a model of it "
                           "first") from None

    def models(self, tenant: str | None = None) -> list[ModelRecord]:
        """``tenant``'s models (None: every tenant's, for the node's own bookkeeping)."""
        return sorted((r for r in self._models.values() if tenant is None or r.tenant == tenant),
                      key=lambda r: (r.tenant, r.model_id))

    def _save(self) -> None:
        self._file.stage([{"tenant": r.tenant, "model_id": r.model_id, "weights_digest": r.weights_digest,
                           "family": {**asdict(r.family), "dtype": int(r.family.dtype)}}
                          for r in self.models()])

    def flush(self) -> None:
        """Write staged changes to the file (without the store lock)."""
        self._file.flush()
