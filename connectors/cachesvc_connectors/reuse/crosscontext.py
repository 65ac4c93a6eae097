"""Choosing a cross-context strategy from measurements (engine-neutral; docs/agents.md).

A :class:`CrossContextProfile` records, per agent template, each strategy's fidelity to the
agent's own dense prefill (median first-token KL, top-1 agreement) and its cost (prompt
time relative to dense) on a calibration set. :func:`choose_strategy` takes the cheapest
whose fidelity meets the deployment's :class:`FidelityTarget`; the exact strategies
(``prefix_only``, ``dense``) always do. A profile may also hold rows per placeholder (a
strategy applied to that placeholder alone, the others computed): the selector then
gives each placeholder the cheapest strategy that meets the target on its own, as a
:class:`~cachesvc_connectors.reuse.segments.StrategyMix`, and the drift guard steps every
placeholder one rung up its own ladder at a demotion. :class:`StrategySelector` does this per request
and lets the drift guard (reuse.drift) sample the chosen strategy and demote it to the next
more expensive one when it stops keeping its promise, as it does for cross-model plans.

So a request's reuse is one decision over everything the service holds: the agent's own
prefix (same model), another model's entries through the pair's plan (DroidSpeak), and a
shared segment behind another prefix (KVCOMM-style), each chosen from measurements.

**Stored in the service.** A model's cross-context profile is kept in the node's profile
registry as the model's own pair (producer = consumer: a model reusing its own cache
behind other prefixes), like a cross-model pair's: per tenant, cluster-wide, versioned by
the model's weights (a re-registered model's profile is stale and never served), and
flagged there when the drift guard demotes a strategy (:meth:`StrategySelector.flag`).
:func:`publish_profile` stores one; :meth:`StrategySelector.from_service` reads it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cachesvc.wire.keys import ModelId
from cachesvc_client import CacheServiceError, FailedPreconditionError, NotFoundError
from cachesvc_connectors.reuse.drift import DemotionEvent, DriftGuard
from cachesvc_connectors.reuse.segments import mix

PROFILE_FORMAT = "cachesvc-cross-context-profile/1"


@dataclass(frozen=True)
class FidelityTarget:
    max_kl: float = 0.015       # median first-token KL(dense || strategy), nats
    min_top1: float = 0.95      # first-token top-1 agreement with dense


@dataclass(frozen=True)
class StrategyRow:
    """A strategy measured on a template's calibration prompts."""

    strategy: str
    samples: int
    median_kl: float
    top1: float
    reuse_token_rate: float     # prompt tokens not computed, of all prompt tokens
    relative_time: float        # prompt step time / dense's (lower is cheaper)
    placeholder: str = ""       # "": the strategy on every placeholder; else on this one alone

    def meets(self, target: FidelityTarget) -> bool:
        return is_exact(self.strategy) or (self.median_kl <= target.max_kl and self.top1 >= target.min_top1)


def is_exact(name: str) -> bool:
    """Whether strategy (or mix) ``name`` computes every placeholder: it reads nothing of
    another context, so it meets any fidelity target and is never guard-sampled. False for
    a name this version does not know (a profile written by a newer one)."""
    try:
        return mix(name).exact
    except ValueError:
        return False


@dataclass
class CrossContextProfile:
    """Per template (agent name), its strategies' rows."""

    family_id: str
    templates: dict[str, list[StrategyRow]] = field(default_factory=dict)

    def rows(self, template: str) -> list[StrategyRow]:
        """The template's rows of strategies applied to every placeholder."""
        return [r for r in self.templates.get(template, []) if not r.placeholder]

    def placeholder_rows(self, template: str) -> dict[str, list[StrategyRow]]:
        """The template's per-placeholder rows, by placeholder."""
        out: dict[str, list[StrategyRow]] = {}
        for row in self.templates.get(template, []):
            if row.placeholder:
                out.setdefault(row.placeholder, []).append(row)
        return out

    def to_json(self) -> dict:
        return {"format": PROFILE_FORMAT, "family_id": self.family_id,
                "templates": {t: [asdict(r) for r in rows] for t, rows in self.templates.items()}}

    @classmethod
    def from_json(cls, doc: dict) -> CrossContextProfile:
        if doc.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a cross-context profile ({PROFILE_FORMAT}): format {doc.get('format')!r}")
        return cls(doc["family_id"], {t: [StrategyRow(**r) for r in rows] for t, rows in doc["templates"].items()})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> CrossContextProfile:
        return cls.from_json(json.loads(Path(path).read_text()))


def choose_strategy(rows: Sequence[StrategyRow], target: FidelityTarget, excluded: Sequence[str] = ()) -> StrategyRow | None:
    """The cheapest row meeting ``target`` (not in ``excluded``); None without rows."""
    fit = [r for r in rows if r.meets(target) and r.strategy not in excluded]
    return min(fit, key=lambda r: (r.relative_time, -r.reuse_token_rate)) if fit else None


@dataclass(frozen=True)
class StrategyStep:
    """A strategy as the drift guard watches it: ``recomputed_layers`` orders the ladder
    (more = more expensive, so safer), ``describe`` names it."""

    name: str
    rank: int

    @property
    def recomputed_layers(self) -> int:
        return self.rank

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class StrategyChoice:
    strategy: str
    why: str
    row: StrategyRow | None = None


def publish_profile(client, model_id: ModelId, weights_digest: str, profile: CrossContextProfile) -> int:
    """Store ``profile`` in the service as ``model_id``'s own pair, measured on these
    weights; its version (1 for the first, +1 per replacement)."""
    return client.put_profile(model_id, model_id, weights_digest, weights_digest, profile.to_json())


@dataclass(frozen=True)
class ServiceSource:
    """Where a selector's profile came from: the model's pair in the service, at a version."""

    client: object
    model_id: ModelId
    version: int


class StrategySelector:
    """Per request: the template's profiled choice, unless the drift guard demoted it."""

    def __init__(self, profile: CrossContextProfile | None, target: FidelityTarget = FidelityTarget(),
                 guard: DriftGuard | None = None, fallback: str = "prefix_only",
                 source: ServiceSource | None = None) -> None:
        self.profile, self.target, self.guard, self.fallback = profile, target, guard, fallback
        self.source = source

    @classmethod
    def from_service(cls, client, model_id: ModelId, target: FidelityTarget = FidelityTarget(),
                     fallback: str = "prefix_only") -> StrategySelector:
        """A selector over ``model_id``'s cross-context profile in the service; without one
        (none stored, or stale: the model's weights changed since), every request gets
        ``fallback`` and the reason says so."""
        try:
            stored = client.get_profile(model_id, model_id)
        except (NotFoundError, FailedPreconditionError):
            return cls(None, target, fallback=fallback)
        return cls(CrossContextProfile.from_json(stored.document), target, fallback=fallback,
                   source=ServiceSource(client, model_id, stored.version))

    def flag(self, event: DemotionEvent) -> str:
        """The drift guard's report of a demotion: flag the profile in the service for
        re-profiling (best effort: the demotion stands either way)."""
        if self.source is None:
            return "kept in the guard (the profile is not in the service's registry)"
        reason = (f"drift guard: cross-context strategy {event.plan} of {event.producer} gave {event.rate:.2f} "
                  f"identical answers over {event.samples} checks, profile promised {event.expected:.2f}; "
                  f"demoted to {event.demoted_to}")
        try:
            applied = self.source.client.flag_profile(self.source.model_id, self.source.model_id, reason,
                                                      self.source.version)
        except CacheServiceError as exc:
            return f"not recorded: {exc}"
        return "applied" if applied else "not applied: the profile was replaced since"

    def choose(self, template: str) -> StrategyChoice:
        if self._ladders(template):
            ladder = self.ladder(template)     # never empty: its last mix computes every placeholder
            level = self._level(template, ladder)
            if level >= len(ladder):
                return StrategyChoice(self.fallback, "the drift guard demoted every placeholder's strategies")
            why = (f"per placeholder, the cheapest meeting KL <= {self.target.max_kl}, "
                   f"top-1 >= {self.target.min_top1}")
            return StrategyChoice(ladder[level].name, why + (f" (demoted by the drift guard {level} step(s))"
                                                              if level else ""))
        rows = self.profile.rows(template) if self.profile is not None else []
        if not rows:
            return StrategyChoice(self.fallback, f"no cross-context profile for {template!r}")
        demoted = self._demoted(template)
        row = choose_strategy(rows, self.target, demoted)
        if row is None:
            return StrategyChoice(self.fallback, "no profiled strategy meets the target")
        why = f"cheapest meeting KL <= {self.target.max_kl}, top-1 >= {self.target.min_top1}"
        if demoted:
            why += f" (demoted by the drift guard: {', '.join(demoted)})"
        return StrategyChoice(row.strategy, why, row)

    def ladder(self, template: str) -> list[StrategyStep]:
        """The template's strategies meeting the target, cheapest first, as guard steps.
        With per-placeholder rows, step k gives each placeholder the k-th of its own
        ladder (its last, an exact one, once it has no more); a step whose mix the profile
        also measured whole, and found missing the target, is left out: fidelity measured
        one placeholder at a time does not compose (the approximations add up)."""
        ladders = self._ladders(template)
        if ladders:
            depth = max(len(names) for names in ladders.values())
            steps = [mix(",".join(f"{p}={names[min(k, len(names) - 1)]}" for p, names in sorted(ladders.items())))
                     for k in range(depth)]
            whole = {r.strategy: r for r in self.profile.rows(template)}
            kept = [m.name for m in steps if m.name not in whole or whole[m.name].meets(self.target)]
            return [StrategyStep(name, k) for k, name in enumerate(kept)]
        rows = sorted((r for r in (self.profile.rows(template) if self.profile else []) if r.meets(self.target)),
                      key=lambda r: r.relative_time)
        return [StrategyStep(r.strategy, i) for i, r in enumerate(rows)]

    def observe(self, template: str, prompt: object, chosen: str) -> None:
        """Let the guard sample a request answered with ``chosen`` (not the exact ones)."""
        if self.guard is None or is_exact(chosen):
            return
        ladder = self.ladder(template)
        step = next((s for s in ladder if s.name == chosen), StrategyStep(chosen, -1))
        self.guard.observe(prompt, _guard_key(template), step, None, ladder)

    def _ladders(self, template: str) -> dict[str, list[str]]:
        """Per placeholder with rows: the strategies meeting the target, cheapest first,
        ending with an exact one."""
        per = self.profile.placeholder_rows(template) if self.profile is not None else {}
        out = {}
        for placeholder, rows in per.items():
            names = [r.strategy for r in sorted((r for r in rows if r.meets(self.target)),
                                                key=lambda r: (r.relative_time, -r.reuse_token_rate))]
            cut = next((i for i, n in enumerate(names) if is_exact(n)), None)
            out[placeholder] = names[:cut + 1] if cut is not None else [*names, "prefix_only"]
        return out

    def _level(self, template: str, ladder: list[StrategyStep]) -> int:
        """How many steps the drift guard has moved this template up its ladder."""
        if self.guard is None:
            return 0
        demoted, replacement = self.guard.replacement(_guard_key(template))
        if not demoted:
            return 0
        return len(ladder) if replacement is None else replacement.recomputed_layers

    def _demoted(self, template: str) -> list[str]:
        """Strategies the guard has stepped away from for this template (every step below
        its replacement)."""
        if self.guard is None:
            return []
        demoted, replacement = self.guard.replacement(_guard_key(template))
        if not demoted:
            return []
        ladder = self.ladder(template)
        if replacement is None:
            return [s.name for s in ladder if not is_exact(s.name)]
        return [s.name for s in ladder if s.rank < replacement.recomputed_layers]


def _guard_key(template: str) -> str:
    """The guard keys its watches by 'producer'; a template's strategies are one watch."""
    return f"template:{template}"
