"""Registered models and their families, persisted beside the disk tier."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from cachesvc.wire.errors import FailedPrecondition, InvalidArgument, NotFound
from cachesvc.wire.keys import DType, FamilyId, FamilySpec, ModelId, check_digest, check_model_id


@dataclass(frozen=True, slots=True)
class ModelRecord:
    model_id: ModelId
    weights_digest: str   # hex, lowercased
    family: FamilySpec
    family_id: FamilyId


@dataclass(frozen=True, slots=True)
class Registration:
    record: ModelRecord
    created: bool                     # False: the identical model was already registered
    replaced: ModelRecord | None      # the previous version when replace=True changed it


class ModelRegistry:
    """model_id -> record, and family_id -> spec. Not thread-safe: the store locks.

    With a ``path`` every change is written atomically (tmp + rename) so a restarted
    server knows the producers of the entries it reloads from disk.
    """

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._models: dict[str, ModelRecord] = {}
        self._families: dict[FamilyId, FamilySpec] = {}
        if path is not None and path.exists():
            for doc in json.loads(path.read_text()):
                fam = doc["family"]
                spec = FamilySpec(**{**fam, "dtype": DType(fam["dtype"])})
                self._add(ModelRecord(ModelId(doc["model_id"]), doc["weights_digest"], spec,
                                      spec.family_id()))

    def _add(self, record: ModelRecord) -> None:
        self._models[record.model_id] = record
        self._families[record.family_id] = record.family

    def register(self, model_id: str, weights_digest: str, family: FamilySpec,
                 replace: bool) -> Registration:
        try:
            check_model_id(model_id)
            check_digest(weights_digest)
            family.validate()
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        record = ModelRecord(ModelId(model_id), weights_digest.lower(), family, family.family_id())
        old = self._models.get(model_id)
        if old == record:
            return Registration(old, created=False, replaced=None)
        if old is not None and not replace:
            what = "weights" if old.family_id == record.family_id else "family"
            raise FailedPrecondition(
                f"model {model_id!r} is already registered with other {what} "
                f"(digest {old.weights_digest[:12]}, family {old.family_id}); pass replace=true "
                "to replace it and drop the entries it produced")
        self._add(record)
        self._save()
        return Registration(record, created=True, replaced=old)

    def get(self, model_id: str) -> ModelRecord:
        try:
            return self._models[model_id]
        except KeyError:
            raise NotFound(f"model {model_id!r} is not registered") from None

    def family(self, family_id: str) -> FamilySpec:
        try:
            return self._families[FamilyId(family_id)]
        except KeyError:
            raise NotFound(f"family {family_id!r} is not known: register a model of it "
                           "first") from None

    def models(self) -> list[ModelRecord]:
        return sorted(self._models.values(), key=lambda r: r.model_id)

    def _save(self) -> None:
        if self._path is None:
            return
        docs = [{"model_id": r.model_id, "weights_digest": r.weights_digest,
                 "family": {**asdict(r.family), "dtype": int(r.family.dtype)}}
                for r in self.models()]
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(docs, indent=1))
        os.replace(tmp, self._path)
