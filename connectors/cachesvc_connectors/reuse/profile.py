"""The reuse profile of a (producer, consumer) pair: the contract between the profiler that
writes it, the service's registry that stores it (as opaque JSON), and the planner, the
drift guard, the connectors and the benchmarks that read it.

Everyone reads it through :meth:`ReuseProfile.from_json`, which checks the format version
and every field it uses, so a document of another version or a hand-edited one is refused
with a message naming the field, never half-read. ``to_json`` writes the same document
back (round trip is exact for documents this version wrote).

Units: quality is the share of profiling prompts whose greedy answer under the plan is
identical to the consumer's own full prefill, in [0, 1]; KL in nats; times in seconds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cachesvc.wire.keys import NO_MODEL, ModelId
from cachesvc_connectors.reuse.plan import Plan

PROFILE_FORMAT = 1


class ProfileFormatError(ValueError):
    """A profile document of another format version, or missing or mistyping a field."""


def _get(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = "profile") -> Any:
    if not isinstance(doc, Mapping) or key not in doc:
        raise ProfileFormatError(f"{where}: no field {key!r}")
    value = doc[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise ProfileFormatError(f"{where}.{key}: expected a number, got a bool")
    if not isinstance(value, kind):
        raise ProfileFormatError(f"{where}.{key}: expected {getattr(kind, '__name__', kind)}, "
                                 f"got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class PlanRow:
    """One measured plan."""

    plan: Plan
    quality: float                       # identical-answer rate, [0, 1]
    quality_ci: tuple[float, float]      # 95% Wilson interval of quality
    kl: float                            # mean KL over the answer tokens, nats
    first_token_kl: float                # the same at the first answer token
    frontier: bool                       # on the quality / recomputed-layers Pareto frontier
    multi_group: bool                    # found by the multi-group search (phase 2)
    predicted_ttft_s: float | None = None   # at the profile's ttft_model setting, if any

    def to_json(self) -> dict:
        out = {"plan": self.plan.describe(), "groups": [list(g) for g in self.plan.groups],
               "recomputed_layers": self.plan.recomputed_layers, "e_loads": len(self.plan.groups),
               "quality": self.quality, "quality_ci": list(self.quality_ci), "kl": self.kl,
               "first_token_kl": self.first_token_kl, "frontier": self.frontier,
               "multi_group": self.multi_group}
        if self.predicted_ttft_s is not None:
            out["predicted_ttft_s"] = self.predicted_ttft_s
        return out

    @classmethod
    def from_json(cls, row: Mapping[str, Any], num_layers: int, where: str) -> PlanRow:
        groups = _get(row, "groups", list, where)
        try:
            plan = Plan(num_layers, tuple((int(a), int(b)) for a, b in groups))
        except (TypeError, ValueError) as exc:
            raise ProfileFormatError(f"{where}.groups: {exc}") from None
        quality = float(_get(row, "quality", (int, float), where))
        if not 0.0 <= quality <= 1.0:
            raise ProfileFormatError(f"{where}.quality: {quality} is outside [0, 1]")
        ci = row.get("quality_ci", [quality, quality])
        ttft = row.get("predicted_ttft_s")
        return cls(plan, quality, (float(ci[0]), float(ci[1])), float(_get(row, "kl", (int, float), where)),
                   float(row.get("first_token_kl", math.nan)), bool(_get(row, "frontier", bool, where)),
                   bool(row.get("multi_group", False)), None if ttft is None else float(ttft))


@dataclass(frozen=True, slots=True)
class LayerSensitivity:
    layer: int
    quality: float                       # with this layer alone recomputed
    kl: float


@dataclass(frozen=True, slots=True)
class TtftSetting:
    """Where the profiler predicted each plan's TTFT: cached and suffix tokens, the full
    prefill's prediction there, and the cost model's fields (reuse.cost.CostModel)."""

    context_tokens: int
    suffix_tokens: int
    prefill_s: float
    cost_model: dict


@dataclass(frozen=True)
class ReuseProfile:
    """Invariants: ``plans`` hold every measured plan, sorted by (recomputed layers, groups);
    the frontier flags mark a non-dominated set that includes full reuse when measured."""

    num_layers: int
    prompts: int                         # profiling prompts each plan was scored on
    plans: tuple[PlanRow, ...]
    metric: str = ""
    slab_dtype: str = ""
    window_sizes: tuple[int, ...] = ()
    max_groups: int = 1
    full_reuse_quality: float = math.nan
    layer_sensitivity: tuple[LayerSensitivity, ...] = ()
    elapsed_s: float = 0.0
    scoring_s: float = 0.0
    # Who and what was profiled (the profile command fills these; the registry checks digests).
    producer: ModelId = NO_MODEL
    consumer: ModelId = NO_MODEL
    producer_digest: str = ""
    consumer_digest: str = ""
    data: str = ""                       # the profiling data's path, as given
    ttft: TtftSetting | None = None
    extra: dict = field(default_factory=dict)   # fields of this format we carry but do not read

    # ------------------------------------------------------------------ reading

    def frontier(self, min_quality: float = 0.0) -> list[tuple[Plan, float]]:
        """The frontier as (plan, quality), fewest recomputed layers first (ties: better
        quality first), keeping those whose quality reaches ``min_quality``."""
        rows = sorted((r for r in self.plans if r.frontier and r.quality >= min_quality),
                      key=lambda r: (r.plan.recomputed_layers, -r.quality))
        return [(r.plan, r.quality) for r in rows]

    def best_plan(self, min_quality: float) -> Plan | None:
        """The frontier plan with the fewest recomputed layers reaching ``min_quality``."""
        frontier = self.frontier(min_quality)
        return frontier[0][0] if frontier else None

    def best_row(self) -> PlanRow:
        """The highest-quality plan (fewest layers among equals)."""
        return max(self.plans, key=lambda r: (r.quality, -r.plan.recomputed_layers))

    def quality_of(self, plan: Plan) -> float | None:
        return next((r.quality for r in self.plans if r.plan == plan), None)

    def ladder_above(self, plan: Plan) -> list[Plan]:
        """Frontier plans recomputing more layers than ``plan``, fewest first (the drift
        guard demotes along it)."""
        return [p for p, _ in self.frontier() if p.recomputed_layers > plan.recomputed_layers]

    def with_predictions(self, predicted: Mapping[Plan, float], setting: TtftSetting) -> ReuseProfile:
        rows = tuple(dataclasses.replace(r, predicted_ttft_s=predicted.get(r.plan, r.predicted_ttft_s))
                     for r in self.plans)
        return dataclasses.replace(self, plans=rows, ttft=setting)

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict:
        out = {"format": PROFILE_FORMAT, "num_layers": self.num_layers, "prompts": self.prompts,
               "metric": self.metric, "slab_dtype": self.slab_dtype, "window_sizes": list(self.window_sizes),
               "max_groups": self.max_groups, "full_reuse_quality": self.full_reuse_quality,
               "layer_sensitivity": [dataclasses.asdict(s) for s in self.layer_sensitivity],
               "plans": [r.to_json() for r in self.plans],
               "frontier": [p.describe() for p, _ in self.frontier()],
               "elapsed_s": self.elapsed_s, "scoring_s": self.scoring_s, **self.extra}
        for key in ("producer", "consumer", "producer_digest", "consumer_digest", "data"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.ttft is not None:
            out["ttft_model"] = dataclasses.asdict(self.ttft)
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ReuseProfile:
        """Raises ProfileFormatError for another format version or a bad field."""
        version = doc.get("format") if isinstance(doc, Mapping) else None
        if version != PROFILE_FORMAT:
            raise ProfileFormatError(f"profile format {version!r}, this connector reads format "
                                     f"{PROFILE_FORMAT}: re-profile the pair with this version")
        num_layers = _get(doc, "num_layers", int)
        if num_layers <= 0:
            raise ProfileFormatError(f"profile.num_layers: {num_layers} is not positive")
        rows = _get(doc, "plans", list)
        if not rows:
            raise ProfileFormatError("profile.plans: no measured plan")
        plans = tuple(PlanRow.from_json(r, num_layers, f"profile.plans[{i}]") for i, r in enumerate(rows))
        ttft = doc.get("ttft_model")
        known = {"format", "num_layers", "prompts", "metric", "slab_dtype", "window_sizes", "max_groups",
                 "full_reuse_quality", "layer_sensitivity", "plans", "frontier", "elapsed_s", "scoring_s",
                 "producer", "consumer", "producer_digest", "consumer_digest", "data", "ttft_model"}
        return cls(
            num_layers=num_layers, prompts=int(_get(doc, "prompts", int)), plans=plans,
            metric=str(doc.get("metric", "")), slab_dtype=str(doc.get("slab_dtype", "")),
            window_sizes=tuple(int(s) for s in doc.get("window_sizes", ())),
            max_groups=int(doc.get("max_groups", 1)),
            full_reuse_quality=float(doc.get("full_reuse_quality", math.nan)),
            layer_sensitivity=tuple(LayerSensitivity(int(s["layer"]), float(s["quality"]), float(s["kl"]))
                                    for s in doc.get("layer_sensitivity", ())),
            elapsed_s=float(doc.get("elapsed_s", 0.0)), scoring_s=float(doc.get("scoring_s", 0.0)),
            producer=str(doc.get("producer", "")), consumer=str(doc.get("consumer", "")),
            producer_digest=str(doc.get("producer_digest", "")), consumer_digest=str(doc.get("consumer_digest", "")),
            data=str(doc.get("data", "")),
            ttft=TtftSetting(int(ttft["context_tokens"]), int(ttft["suffix_tokens"]), float(ttft["prefill_s"]),
                             dict(ttft["cost_model"])) if ttft else None,
            extra={k: v for k, v in doc.items() if k not in known})


def best_plan(profile: ReuseProfile | Mapping[str, Any], min_quality: float) -> Plan | None:
    """:meth:`ReuseProfile.best_plan` of a profile or of its JSON document."""
    if not isinstance(profile, ReuseProfile):
        profile = ReuseProfile.from_json(profile)
    return profile.best_plan(min_quality)
