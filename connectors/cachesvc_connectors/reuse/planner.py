"""Which plan a consumer uses for a producer's entries, and why: engine-neutral, shared by
every connector (HF today; vLLM and the cross-context path supply their own calibration).

Sources, first that answers wins:

1. the drift guard: a demoted pair uses its replacement (or the full prefill);
2. an explicit plan for the producer (``PlanPolicy.plans``);
3. the pair's profile in the service's registry: with a TTFT target and a cost model,
   the best quality predicted to meet it (:func:`choose`); else the frontier plan with the
   fewest recomputed layers reaching ``min_quality``;
4. ``PlanPolicy.default_plan``.

None of them: the consumer recomputes. Every answer is a :class:`Choice` naming its source
and reason, so a report can say why less was reused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from cachesvc.wire.keys import ModelId
from cachesvc_client import FailedPreconditionError, NotFoundError, StoredProfile
from cachesvc_connectors.reuse.cost import CostModel
from cachesvc_connectors.reuse.plan import Plan
from cachesvc_connectors.reuse.profile import ProfileFormatError, ReuseProfile

PROFILE_TTL_S = 30.0   # how long a consumer trusts the profile it read (re-profiling replaces it)


class Choice(NamedTuple):
    """A plan decision. ``plan`` None means the full prefill (recompute everything)."""

    plan: Plan | None
    why: str = ""                        # empty when a plan was found without compromise
    quality: float | None = None         # the plan's profiled quality, where known
    predicted_ttft_s: float | None = None
    meets_target: bool = True
    source: str = ""                     # "drift", "explicit", "profile", "planner", "default", ""


def choose(frontier: list[tuple[Plan, float]], cost: CostModel, n: int, s: int,
           ttft_target_s: float | None) -> Choice:
    """Among the (plan, quality) pairs (already held to the caller's minimum quality) and
    the full prefill (quality 1 by definition): with a target, the best quality predicted
    to meet it, ties to the faster, or the fastest of all when none does; without one, the
    fastest plan."""
    options = [(None, 1.0, cost.prefill_s(n + s + 1))]
    options += [(plan, quality, cost.predict(plan, n, s)) for plan, quality in frontier]
    if ttft_target_s is None:
        plan, quality, ttft = min(options[1:] or options, key=lambda o: (o[2], -o[1]))
        return Choice(plan, "no target: fastest profiled plan", quality, ttft, True, "planner")
    meeting = [o for o in options if o[2] <= ttft_target_s]
    if meeting:
        plan, quality, ttft = max(meeting, key=lambda o: (o[1], -o[2]))
        return Choice(plan, f"best quality within {ttft_target_s * 1e3:.0f} ms", quality, ttft, True, "planner")
    plan, quality, ttft = min(options, key=lambda o: o[2])
    return Choice(plan, f"nothing meets {ttft_target_s * 1e3:.0f} ms; fastest predicted {ttft * 1e3:.0f} ms",
                  quality, ttft, False, "planner")


@dataclass(frozen=True)
class PlanPolicy:
    """How a consumer picks plans for producers other than itself."""

    plans: Mapping[str, Plan] = field(default_factory=dict)   # explicit, by producer model id
    use_profiles: bool = True
    min_quality: float = 0.95            # identical-answer rate to the consumer's own prefill
    default_plan: Plan | None = None
    ttft_target_s: float | None = None   # with a cost model: the planner picks (choose)


class ProfileSource(Protocol):
    """Where profiles come from (the SDK's CacheClient)."""

    def get_profile(self, producer: ModelId, consumer: ModelId) -> StoredProfile: ...


class Demotions(Protocol):
    """The drift guard's side of plan choice."""

    def replacement(self, producer: ModelId) -> tuple[bool, Plan | None]: ...


@dataclass(frozen=True, slots=True)
class ProfileRead:
    """What the registry answered for one producer, and when (time.monotonic())."""

    at: float
    profile: ReuseProfile | None = None  # None: not usable, ``why``
    why: str = ""
    version: int = 0


class PlanSelector:
    """Answers "which plan for this producer's entries?" for one consumer model. Reads each
    pair's profile from the registry at most once per PROFILE_TTL_S. Thread-safe."""

    def __init__(self, profiles: ProfileSource, consumer: ModelId, policy: PlanPolicy,
                 cost: CostModel | None = None, demotions: Demotions | None = None) -> None:
        self.profiles, self.consumer, self.policy = profiles, consumer, policy
        self.cost, self.demotions = cost, demotions
        self._reads: dict[str, ProfileRead] = {}
        self._lock = threading.Lock()

    def choose(self, producer: ModelId, cached_tokens: int = 0, prompt_tokens: int = 0) -> Choice:
        """The plan for reusing ``cached_tokens`` of ``producer``'s entries in a prompt of
        ``prompt_tokens`` (the last prompt token is always computed by the engine)."""
        if self.demotions is not None:
            demoted, replacement = self.demotions.replacement(producer)
            if demoted:
                return Choice(replacement, "" if replacement else
                              f"drift guard demoted {producer!r}'s plan to a full prefill: re-profile the pair",
                              source="drift")
        policy = self.policy
        if producer in policy.plans:
            return Choice(policy.plans[producer], source="explicit")
        why = f"no plan for producer {producer!r}"
        if policy.use_profiles:
            read = self.read(producer)
            profile = read.profile
            if profile is not None and policy.ttft_target_s is not None and self.cost is not None:
                n = min(cached_tokens, max(prompt_tokens - 1, 0))
                choice = choose(profile.frontier(policy.min_quality), self.cost, n,
                                max(prompt_tokens - 1 - n, 0), policy.ttft_target_s)
                if choice.plan is None:
                    return choice._replace(why=f"planner: full prefill ({choice.why})")
                return choice._replace(why="")
            if profile is not None:
                plan = profile.best_plan(policy.min_quality)
                if plan is not None:
                    return Choice(plan, quality=profile.quality_of(plan), source="profile")
                best = profile.best_row()
                return Choice(None, f"no profiled plan of {producer!r} reaches quality {policy.min_quality} "
                                    f"(best {best.quality} with {best.plan.describe()}): recomputing",
                              source="profile")
            why = f"no plan for producer {producer!r} ({read.why})"
        if policy.default_plan is not None:
            return Choice(policy.default_plan, source="default")
        return Choice(None, why)

    def read(self, producer: ModelId) -> ProfileRead:
        """The pair's profile from the registry, cached for PROFILE_TTL_S."""
        now = time.monotonic()
        with self._lock:
            read = self._reads.get(producer)
        if read is not None and now - read.at <= PROFILE_TTL_S:
            return read
        try:
            stored = self.profiles.get_profile(producer, self.consumer)
            read = ProfileRead(now, ReuseProfile.from_json(stored.document), version=stored.version)
        except NotFoundError:
            read = ProfileRead(now, why="the pair is not profiled")
        except FailedPreconditionError:
            read = ProfileRead(now, why="its profile is stale: re-profile the pair")
        except ProfileFormatError as exc:
            read = ProfileRead(now, why=f"its profile is unreadable: {exc}")
        with self._lock:
            self._reads[producer] = read
        return read

    def last_read(self, producer: ModelId) -> ProfileRead | None:
        """The profile this selector last read for ``producer`` (no RPC)."""
        with self._lock:
            return self._reads.get(producer)

    def expectation(self, producer: ModelId, plan: Plan) -> tuple[float | None, list[Plan]]:
        """The plan's quality in the pair's profile and the frontier plans recomputing more
        layers (the drift guard's demotion ladder); (None, []) without a profile."""
        read = self.last_read(producer)
        if read is None or read.profile is None:
            return None, []
        return read.profile.quality_of(plan), read.profile.ladder_above(plan)
