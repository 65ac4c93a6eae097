"""Drift guard: check a sample of cross-model answers against the consumer's own prefill,
and demote a plan whose quality has fallen below what its profile promised.

A profile is measured once; the pair can drift away from it (new data, or a consumer
swapped for another fine-tune without re-profiling). For a ``sample_fraction`` of
cross-model requests the guard answers the prompt twice, greedily and off the caller's
path: through the plan, and with the consumer's full prefill. Per (producer, plan) it
keeps the identical-answer rate over the last ``window`` samples. Once ``min_samples``
are in and the rate is below the expected quality (the profile's, or
``expected_quality``) by more than ``margin``, it **demotes** the plan to the next one
on the profile's frontier that recomputes more layers, or to the full prefill when there
is none, and flags the pair for re-profiling: in ``metrics()`` and in the service's
profile registry (``FlagProfile``, naming the profile version it judged), where
``ListProfiles`` shows it to whoever re-profiles. Every check and demotion is counted;
``metrics()`` returns them.

The bookkeeping here is engine-neutral; answering a prompt both ways is the connector's
(:class:`Verifier`, e.g. ``cachesvc_connectors.hf.verify.AnswerVerifier``), and recording a
flag in the service is a callable the connector passes (``flag``).
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from cachesvc.wire.keys import ModelId
from cachesvc_connectors.reuse.plan import Plan


@dataclass(frozen=True)
class DriftOptions:
    sample_fraction: float = 0.05     # share of cross-model requests checked
    window: int = 50                  # samples per (producer, plan) the rate is taken over
    min_samples: int = 20             # no verdict before this many
    margin: float = 0.10              # tolerated shortfall below the expected quality
    expected_quality: float = 0.95    # for plans without a profile figure
    max_new_tokens: int = 8           # answer length compared
    background: bool = True           # check in a worker thread (False: inline, for tests)
    seed: int = 0


@dataclass
class DemotionEvent:
    at: float                         # time.time()
    producer: ModelId
    plan: str
    demoted_to: str                   # "full prefill" when nothing reused is left
    rate: float
    expected: float
    samples: int
    reported: str = ""                # how the service took the flag ("applied", "stale", or an error)


@dataclass
class _PlanWatch:
    expected: float
    recent: deque = field(default_factory=deque)


class Verifier(Protocol):
    """Answers a prompt through a plan and with the consumer's own full prefill."""

    def same_answer(self, ids: Sequence[int], producer: ModelId, plan: Plan, max_new_tokens: int) -> bool | None:
        """Whether both greedy answers are identical; None when ``producer``'s entries are
        no longer there whole (nothing to judge)."""
        ...


FlagSink = Callable[["DemotionEvent"], str]   # records a demotion's flag; returns how it was taken


class DriftGuard:
    """Watches one consumer's cross-model plans. Thread-safe."""

    def __init__(self, verifier: Verifier, flag: FlagSink, options: DriftOptions = DriftOptions()) -> None:
        self.verifier, self.flag, self.options = verifier, flag, options
        self._rng = random.Random(options.seed)
        self._lock = threading.Lock()
        self._watch: dict[tuple[str, Plan], _PlanWatch] = {}
        self._demoted: dict[str, Plan | None] = {}     # producer -> replacement (None: prefill)
        self.events: list[DemotionEvent] = []
        self.flagged: set[str] = set()                 # producers whose pair needs re-profiling
        self.requests = self.sampled = self.identical = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="drift-guard") if options.background else None

    # ----------------------------------------------------------------- consumer hooks

    def replacement(self, producer: ModelId) -> tuple[bool, Plan | None]:
        """(demoted?, the plan to use instead; None = full prefill)."""
        with self._lock:
            if producer in self._demoted:
                return True, self._demoted[producer]
        return False, None

    def observe(self, ids: Sequence[int], producer: ModelId, plan: Plan, expected: float | None,
                ladder: Sequence[Plan] = ()) -> None:
        """A cross-model request was answered with ``plan``; maybe check it. ``ladder``:
        the profile's frontier plans recomputing more layers, fewest first."""
        with self._lock:
            self.requests += 1
            if self._rng.random() >= self.options.sample_fraction:
                return
            self.sampled += 1
        # The prompt goes to the verifier as given: token ids for a plan, an agent prompt
        # (its parts) for a cross-context strategy (reuse.crosscontext).
        job = (ids, producer, plan, self.options.expected_quality if expected is None else expected,
               list(ladder))
        if self._pool is not None:
            self._pool.submit(self._check, *job)
        else:
            self._check(*job)

    # ----------------------------------------------------------------- the check

    def _check(self, ids: Sequence[int], producer: ModelId, plan: Plan, expected: float, ladder: list[Plan]) -> None:
        same = self.verifier.same_answer(ids, producer, plan, self.options.max_new_tokens)
        if same is None:           # nothing reusable any more: nothing to judge
            return
        event = None
        with self._lock:
            self.identical += same
            watch = self._watch.setdefault((producer, plan), _PlanWatch(expected))
            watch.recent.append(float(same))
            while len(watch.recent) > self.options.window:
                watch.recent.popleft()
            if len(watch.recent) < self.options.min_samples or producer in self._demoted:
                return
            rate = sum(watch.recent) / len(watch.recent)
            if rate < watch.expected - self.options.margin:
                better = [p for p in ladder if p.recomputed_layers > plan.recomputed_layers]
                target = better[0] if better else None
                self._demoted[producer] = target
                self.flagged.add(producer)
                event = DemotionEvent(time.time(), producer, plan.describe(),
                                      target.describe() if target else "full prefill",
                                      round(rate, 4), expected, len(watch.recent))
                self.events.append(event)
        if event is not None:       # outside the lock: an RPC
            event.reported = self.flag(event)

    def drain(self) -> None:
        """Wait for the checks in flight (tests, shutdown)."""
        if self._pool is not None:
            self._pool.submit(lambda: None).result()

    def metrics(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "sampled": self.sampled,
                    "checked_identical_rate": round(self.identical / self.sampled, 4) if self.sampled else None,
                    "demotions": len(self.events), "flagged_pairs": sorted(self.flagged),
                    "plans": {f"{producer} {plan.describe()}": {
                        "samples": len(w.recent), "expected": w.expected,
                        "rate": round(sum(w.recent) / len(w.recent), 4) if w.recent else None}
                        for (producer, plan), w in self._watch.items()},
                    "events": [vars(e) for e in self.events]}

