"""Offline reuse profiles (DroidSpeak): which layer groups a consumer must recompute.

For a (producer, consumer) pair and held-out prompts the profiler scores plans by
*fidelity to the consumer's own full prefill*: the share of prompts where the plan's
cache makes the consumer produce exactly its own greedy answer (``quality``), and the
mean KL over the answer tokens. Both come from one teacher-forced pass over the
question and the consumer's reference answer: the greedy answer is identical exactly
when every answer token is the argmax given the tokens before it.

Computation is shared across plans. A group ``[a, b)`` starts from the producer's E at
``a`` and runs the consumer's layers, so the consumer K/V of layer ``l`` inside any
group starting at ``a`` is the same tensor, ``KV[a][l]``. One pass per start layer
gives every ``KV[a][l]`` a plan needs; any plan, one group or several, is then only a
cache assembled from ``KV`` and the producer's K/V, plus the teacher-forced suffix pass.
The producer's K, V and E are rounded through the slab dtype, as the service stores them.

Search, in two phases over the same prompts (resumable per prompt; see ``StateFile``):

1. every single window of the sizes in ``window_sizes`` (every start for small sizes,
   a coarser stride for large ones, and always the windows that end at the top);
2. multi-group plans of at most ``max_groups`` windows: a dynamic program over the
   measured windows picks, for each budget of recomputed layers, the disjoint set whose
   summed gains over full reuse is largest. Gains of separate groups are treated as
   additive, which is only an estimate (two groups interact through the layers between
   them), so every chosen set is then *measured* like the single windows. A DP rather
   than greedy merging: greedy commits to the best window first and can miss a pair of
   smaller windows that together beat it at the same budget; the DP is exact for the
   additive estimate and costs nothing next to one forward pass.

The result is the set of measured plans and its Pareto frontier (quality against
recomputed layers): the profile document the service stores per pair.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from cachesvc.wire.keys import DType
from cachesvc_connectors.hf.decoder import DecoderStack
from cachesvc_connectors.reuse.plan import Plan
from cachesvc_connectors.reuse.profile import LayerSensitivity, PlanRow, ReuseProfile


@dataclass(frozen=True)
class ProfilerOptions:
    window_sizes: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 10, 15, 20)
    pilot_prompts: int = 10           # phase 2's candidates come from these prompts' results
    batch: int = 16                   # plans per batched suffix pass
    max_groups: int = 2
    max_candidates: int = 12          # multi-group plans measured in phase 2
    max_new_tokens: int = 8           # reference answer length (greedy)
    dtype: DType = DType.BFLOAT16     # the slab dtype the producer's tensors pass through


@dataclass(frozen=True, slots=True)
class PlanScore:
    identical: float      # 1.0 if the consumer's greedy answer is unchanged
    kl: float             # mean KL(consumer prefill || plan) over the answer tokens, nats
    first_kl: float       # the same at the first answer token


def single_windows(num_layers: int, sizes: Sequence[int]) -> list[Plan]:
    """Windows of each size: every start for sizes 1 and 2, every 2nd start up to size 8,
    every 5th beyond; plus the window of each size ending at the top layer. (The cost of
    a profile is mostly one pass per start up to its largest window; this keeps it near
    L²/4 layer passes per prompt.)"""
    plans = set()
    for size in sorted({s for s in sizes if 0 < s <= num_layers}):
        stride = 1 if size <= 2 else 2 if size <= 8 else 5
        starts = set(range(0, num_layers - size + 1, stride)) | {num_layers - size}
        plans |= {Plan(num_layers, ((a, a + size),)) for a in starts}
    return sorted(plans, key=lambda p: p.groups)


class Profiler:
    """Scores plans of ``consumer`` reusing ``producer``'s cache on prompts."""

    def __init__(self, producer_model, consumer_model, options: ProfilerOptions = ProfilerOptions()) -> None:
        self.producer = DecoderStack(producer_model)
        self.consumer = DecoderStack(consumer_model)
        if self.producer.num_layers != self.consumer.num_layers:
            raise ValueError("producer and consumer differ in layer count: not one family")
        self.num_layers = self.consumer.num_layers
        self.options = options
        self._slab_dtype = options.dtype.to_torch()

    def _stored(self, tensor: torch.Tensor) -> torch.Tensor:
        """As the consumer would read it back from the service."""
        return tensor.to(self._slab_dtype).to(self.consumer.dtype)

    @torch.no_grad()
    def reference_answer(self, prompt_ids: list[int]) -> list[int]:
        ids = self.consumer.ids(prompt_ids)
        out = self.consumer.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=self.options.max_new_tokens, do_sample=False,
                                           pad_token_id=self.consumer.model.config.eos_token_id)
        return out[0, len(prompt_ids):].tolist() or [int(ids[0, -1])]

    @torch.no_grad()
    def score_prompt(self, context_ids: list[int], prompt_ids: list[int], plans: Sequence[Plan]) -> dict[Plan, PlanScore]:
        """Every plan's score on one prompt (the prompt starts with the context)."""
        n, L = len(context_ids), self.num_layers
        answer = self.reference_answer(prompt_ids)
        teacher = prompt_ids[n:] + answer[:-1]                 # the suffix, teacher-forced
        first = len(prompt_ids) - n - 1                        # position predicting answer[0]
        full = self.consumer.model(input_ids=self.consumer.ids(prompt_ids + answer[:-1]), use_cache=False)
        reference = torch.log_softmax(full.logits[0, n + first:].float(), -1)
        target = torch.tensor(answer, device=reference.device)

        produced = self.producer.model.model(input_ids=self.producer.ids(context_ids), use_cache=True,
                                             output_hidden_states=True)
        keys = [self._stored(layer.keys) for layer in produced.past_key_values.layers]
        values = [self._stored(layer.values) for layer in produced.past_key_values.layers]
        reach: dict[int, int] = {}                             # start -> furthest group end
        for plan in plans:
            for a, b in plan.groups:
                reach[a] = max(reach.get(a, a), b)
        recomputed: dict[int, DynamicCache] = {}               # start a -> consumer K/V of a..reach
        for a, b in sorted(reach.items()):
            cache = DynamicCache()
            entering = self._stored(produced.hidden_states[a])
            self.consumer.run(entering, a, b, 0, cache)
            recomputed[a] = cache
        del produced

        # The suffix entering layer l under full reuse. Below a plan's first group every
        # plan reads the producer's K/V, so its suffix enters that group exactly as here:
        # each plan runs only from its first group up.
        entering = [self.consumer.embed(self.consumer.ids(teacher))]
        shared = DynamicCache()
        for layer in range(L - 1):
            shared.update(keys[layer], values[layer], layer)
            entering.append(self.consumer.run(entering[-1], layer, layer + 1, n, shared))
        del shared
        # Plans with the same first layer run as one batch: the weights are read once per
        # layer for the whole batch (small-batch layers on a CPU are bound by that read).
        by_start: dict[int, list[Plan]] = {}
        for plan in plans:
            by_start.setdefault(plan.groups[0][0] if plan.groups else L - 1, []).append(plan)
        scores = {}
        for start, group in by_start.items():
            for i in range(0, len(group), self.options.batch):
                batch = group[i:i + self.options.batch]
                cache = DynamicCache()
                for layer in range(start, L):
                    sources = [(keys[layer], values[layer]) if (g := plan.group_at(layer)) is None else
                               (recomputed[g[0]].layers[layer].keys, recomputed[g[0]].layers[layer].values)
                               for plan in batch]
                    cache.update(torch.cat([k for k, _ in sources]), torch.cat([v for _, v in sources]), layer)
                hidden = self.consumer.run(entering[start].expand(len(batch), -1, -1), start, L, n, cache)
                logits = self.consumer.model.lm_head(self.consumer.inner.norm(hidden[:, first:]))
                got = torch.log_softmax(logits.float(), -1)                       # [batch, answer, vocab]
                kl = (reference.exp() * (reference - got)).sum(-1)                # [batch, answer]
                for b, plan in enumerate(batch):
                    scores[plan] = PlanScore(float(torch.equal(got[b].argmax(-1), target)),
                                         float(kl[b].mean()), float(kl[b, 0]))
        return scores


# ---------------------------------------------------------------------- aggregation


@dataclass
class PlanResult:
    plan: Plan
    identical: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    first_kl: list[float] = field(default_factory=list)

    def add(self, score: PlanScore) -> None:
        self.identical.append(score.identical)
        self.kl.append(score.kl)
        self.first_kl.append(score.first_kl)

    @property
    def quality(self) -> float:
        return sum(self.identical) / len(self.identical) if self.identical else float("nan")

    @property
    def mean_kl(self) -> float:
        return sum(self.kl) / len(self.kl) if self.kl else float("nan")


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion (well-behaved at 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def gain(result: PlanResult, baseline: PlanResult) -> float:
    """What a window adds over full reuse, for the multi-group search: identical-rate
    gain, ties broken by the relative KL reduction."""
    kl_base = max(baseline.mean_kl, 1e-9)
    return (result.quality - baseline.quality) + 1e-3 * (baseline.mean_kl - result.mean_kl) / kl_base


def multi_group_candidates(results: Sequence[PlanResult], baseline: PlanResult, num_layers: int,
                           max_groups: int, limit: int) -> list[Plan]:
    """For each budget of recomputed layers, the disjoint set of at most ``max_groups``
    measured single windows with the largest summed gain (a DP over windows sorted by
    start); those of two or more windows that beat every single window within the same
    budget, best first, at most ``limit``."""
    windows = sorted(((r.plan.groups[0], gain(r, baseline)) for r in results if len(r.plan.groups) == 1
                      and gain(r, baseline) > 0), key=lambda w: w[0])
    memo: dict[tuple[int, int, int], tuple[float, tuple]] = {}

    def best(i: int, groups: int, budget: int) -> tuple[float, tuple]:
        """Best (gain, windows) using windows[i:], starting at or after windows[i]."""
        if i >= len(windows) or groups == 0:
            return 0.0, ()
        key = (i, groups, budget)
        if key not in memo:
            choice = best(i + 1, groups, budget)
            (a, b), g = windows[i]
            if b - a <= budget:
                nxt = next((j for j in range(i + 1, len(windows)) if windows[j][0][0] >= b), len(windows))
                rest_gain, rest = best(nxt, groups - 1, budget - (b - a))
                if g + rest_gain > choice[0]:
                    choice = (g + rest_gain, ((a, b), *rest))
            memo[key] = choice
        return memo[key]

    single_best = {}
    for (a, b), g in windows:
        for budget in range(b - a, num_layers + 1):
            single_best[budget] = max(single_best.get(budget, 0.0), g)
    found: dict[tuple, float] = {}
    for budget in range(2, num_layers):
        total, chosen = best(0, max_groups, budget)
        if len(chosen) >= 2 and total > single_best.get(budget, 0.0) + 1e-12:
            found[chosen] = max(found.get(chosen, 0.0), total)
    ranked = sorted(found.items(), key=lambda item: -item[1])[:limit]
    return [Plan(num_layers, groups) for groups, _ in ranked]


def frontier(results: Sequence[PlanResult]) -> list[PlanResult]:
    """Plans no other plan beats on both quality (higher) and recomputed layers (fewer);
    among equals, the lower KL. Sorted by recomputed layers."""
    ranked = sorted(results, key=lambda r: (r.plan.recomputed_layers, -r.quality, r.mean_kl))
    out: list[PlanResult] = []
    for r in ranked:
        if not out or r.quality > out[-1].quality:
            out.append(r)
    return out


# ---------------------------------------------------------------------- the run


class StateFile:
    """Resumable progress: one JSON line per finished prompt and phase, plus the phase-2
    candidates once chosen. A rerun with the same file skips what is recorded."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path = path
        self.lines: list[dict] = []
        if path.exists():
            self.lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if self.lines and self.lines[0] != {"header": header}:
                raise ValueError(f"{path} records another profiling run ({self.lines[0]}); "
                                 "remove it or give another --out")
        if not self.lines:
            self.append({"header": header})

    def append(self, doc: dict) -> None:
        self.lines.append(doc)
        with self.path.open("a") as fh:
            fh.write(json.dumps(doc) + "\n")

    def done(self, phase: int) -> dict[int, dict]:
        return {d["prompt"]: d["scores"] for d in self.lines if d.get("phase") == phase}

    def candidates(self) -> list[list[list[int]]] | None:
        return next((d["candidates"] for d in self.lines if "candidates" in d), None)


def profile(profiler: Profiler, samples: Sequence[tuple[list[int], list[int]]], state: StateFile,
            progress: Callable[[str, int, int], None] = lambda phase, done, total: None) -> dict:
    """:func:`measure`'s profile as the JSON document the registry stores."""
    return measure(profiler, samples, state, progress).to_json()


def measure(profiler: Profiler, samples: Sequence[tuple[list[int], list[int]]], state: StateFile,
            progress: Callable[[str, int, int], None] = lambda phase, done, total: None) -> ReuseProfile:
    """Both phases over ``samples`` (context ids, prompt ids); the profile without the
    models' names and digests, which the caller adds.

    Phase 2's candidates are chosen from the single windows' results on the first
    ``pilot_prompts`` prompts, so every later prompt scores singles and candidates in one
    pass (the per-start passes are the expensive part); only the pilot prompts are
    scored a second time, for the candidates. Every plan ends up measured on every prompt."""
    L, opts = profiler.num_layers, profiler.options
    t0 = time.perf_counter()
    singles = [Plan.full_reuse(L)] + single_windows(L, opts.window_sizes) + [Plan.recompute_all(L)]
    singles = list(dict.fromkeys(singles))
    results = {p: PlanResult(p) for p in singles}
    pilot = min(opts.pilot_prompts, len(samples))
    _run_phase(profiler, samples, range(pilot), state, 1, singles, results, progress)

    saved = state.candidates()
    if saved is None:
        chosen = multi_group_candidates(list(results.values()), results[Plan.full_reuse(L)], L,
                                        opts.max_groups, opts.max_candidates)
        chosen = [p for p in chosen if p not in results]
        state.append({"candidates": [[list(g) for g in p.groups] for p in chosen]})
    else:
        chosen = [Plan(L, tuple(tuple(g) for g in groups)) for groups in saved]
    for p in chosen:
        results[p] = PlanResult(p)
    _run_phase(profiler, samples, range(pilot, len(samples)), state, 1, singles + chosen, results, progress)
    if chosen:
        _run_phase(profiler, samples, range(pilot), state, 2, chosen, results, progress)
    baseline = results[Plan.full_reuse(L)]

    on_front = {r.plan for r in frontier(list(results.values()))}
    n = len(samples)
    rows = tuple(PlanRow(r.plan, round(r.quality, 4), tuple(round(x, 4) for x in wilson(sum(r.identical), n)),
                         round(r.mean_kl, 5), round(sum(r.first_kl) / n, 5), r.plan in on_front, r.plan in chosen)
                 for r in sorted(results.values(), key=lambda r: (r.plan.recomputed_layers, r.plan.groups)))
    sensitivity = tuple(LayerSensitivity(layer, round(results[single].quality, 4), round(results[single].mean_kl, 5))
                        for layer in range(L) if (single := Plan(L, ((layer, layer + 1),))) in results)
    return ReuseProfile(
        num_layers=L, prompts=n, plans=rows,
        metric=f"identical greedy answer ({opts.max_new_tokens} tokens) to the consumer's own "
               "full prefill; kl: mean KL over the answer tokens",
        slab_dtype=opts.dtype.short_name, window_sizes=tuple(opts.window_sizes), max_groups=opts.max_groups,
        full_reuse_quality=round(baseline.quality, 4), layer_sensitivity=sensitivity,
        elapsed_s=round(time.perf_counter() - t0, 1),
        # scoring time summed over the state file: the whole profile's cost, resumed or not
        scoring_s=round(sum(d.get("seconds", 0.0) for d in state.lines), 1))


def _run_phase(profiler: Profiler, samples, indices: range, state: StateFile, phase: int,
               plans: list[Plan], results: dict[Plan, PlanResult], progress) -> None:
    done = state.done(phase)
    by_name = {p.describe(): p for p in plans}
    for i in indices:
        if i not in done:
            context, prompt = samples[i]
            t0 = time.perf_counter()
            scores = profiler.score_prompt(context, prompt, plans)
            done[i] = {p.describe(): [s.identical, s.kl, s.first_kl] for p, s in scores.items()}
            state.append({"phase": phase, "prompt": i, "scores": done[i],
                          "seconds": round(time.perf_counter() - t0, 2)})
        for name, (identical, kl, first_kl) in done[i].items():
            results[by_name[name]].add(PlanScore(identical, kl, first_kl))
        progress("plans" if phase == 1 else "pilot prompts, multi-group plans", i + 1,
                 len(samples) if phase == 1 else len(indices))
