"""Cross-context strategies (engine-neutral): how an agent's prompt reuses a shared segment
that sits behind a different prefix (KVCOMM, CacheBlend, ALGORITHMS.md; docs/agents.md).

An agent prompt is P0 ph1 P1 … phm Pm. A strategy says, for a placeholder's content,
what to do with it (:class:`Action`) and with the template segment that follows it, and
where to take a reused segment from (:class:`SourceRule`); a :class:`StrategyMix` gives
each placeholder its own (``records=nearest,*=prefix_only``). The measured facts on SmolLM2
(../shared/FACTS.md) are why there are several: the paper's anchor correction lost fidelity
that simpler strategies kept, and the best source was another agent whose prefix is most
like this one. The planner (reuse.crosscontext) picks among them from a measured profile.
"""

from __future__ import annotations

import difflib
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from cachesvc.wire.segments import SegmentSource


class Action(enum.Enum):
    COMPUTE = "compute"      # prefill these tokens through every layer (exact)
    REUSE = "reuse"          # stored K/V, keys re-rotated to the new offset
    BLEND = "blend"          # stored K/V, the most deviating share of tokens recomputed
    ANCHOR = "anchor"        # stored K/V corrected by the anchor pool's offsets (KVCOMM)


class SourceRule(enum.Enum):
    NEAREST = "nearest"      # the source whose prefix is most like this prompt's
    BASE = "base"            # the content stored on its own, position-normalized


@dataclass(frozen=True, slots=True)
class Strategy:
    """Invariant: ``placeholder`` is COMPUTE only for the exact strategies (``dense``,
    ``prefix_only``); ``ratio`` is in [0, 1] and used by BLEND only."""

    name: str
    placeholder: Action
    following: Action              # COMPUTE, REUSE (the source's own following tokens) or ANCHOR
    source: SourceRule = SourceRule.NEAREST
    ratio: float = 0.0
    prefix_cache: bool = True      # reuse the agent's own stored prefix (P0 and whatever follows whole)


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("dense", Action.COMPUTE, Action.COMPUTE, prefix_cache=False),
    Strategy("prefix_only", Action.COMPUTE, Action.COMPUTE),
    Strategy("nearest", Action.REUSE, Action.COMPUTE, SourceRule.NEAREST),
    Strategy("base", Action.REUSE, Action.COMPUTE, SourceRule.BASE),
    Strategy("reuse_all", Action.REUSE, Action.REUSE, SourceRule.NEAREST),
    Strategy("blend", Action.BLEND, Action.COMPUTE, SourceRule.NEAREST, ratio=0.15),
    Strategy("kvcomm", Action.ANCHOR, Action.ANCHOR, SourceRule.BASE),
)}
"""The built-in strategies, cheapest reuse last: ``nearest`` re-rotates the segment from the
stored context whose prefix is most like this one and prefills the following template
segment; ``base`` takes it from its position-normalized copy; ``reuse_all`` also takes the
following segment from that context (only the last prompt token is computed); ``blend``
recomputes a share of the segment's tokens (``blend@0.3`` for another ratio); ``kvcomm``
corrects both with the anchor pool's offsets."""


def strategy(name: str) -> Strategy:
    """A strategy by name; ``blend@R`` is CacheBlend at ratio R."""
    base, _, ratio = name.partition("@")
    if base not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)}, blend@RATIO)")
    found = STRATEGIES[base]
    if not ratio:
        return found
    if found.placeholder != Action.BLEND:
        raise ValueError(f"only blend takes a ratio, got {name!r}")
    value = float(ratio)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"blend ratio must be in [0, 1], got {value}")
    return Strategy(f"blend@{value:g}", Action.BLEND, found.following, found.source, value)


@dataclass(frozen=True, slots=True)
class StrategyMix:
    """A strategy per placeholder: ``by`` names some placeholders' strategies, the others
    take ``default``; a template segment takes the strategy of the placeholder before it.
    Its :attr:`name` is ``default``'s alone, else ``ph=strategy,…,*=default``
    (:func:`mix` reads it back)."""

    default: Strategy
    by: tuple[tuple[str, Strategy], ...] = ()

    @property
    def name(self) -> str:
        if not self.by:
            return self.default.name
        return ",".join([f"{p}={s.name}" for p, s in self.by] + [f"*={self.default.name}"])

    def of(self, placeholder: str) -> Strategy:
        return next((s for p, s in self.by if p == placeholder), self.default)

    @property
    def exact(self) -> bool:
        """Whether every placeholder is computed (``dense``/``prefix_only`` alone): a mix
        that reads nothing of another context, so it has no fidelity to measure."""
        return all(s.placeholder is Action.COMPUTE for s in (self.default, *(s for _, s in self.by)))

    @property
    def prefix_cache(self) -> bool:
        """Whether the agent's own stored prefix is read: ``dense`` alone reads nothing; in
        a mix it means computing that placeholder (exact either way)."""
        return any(s.prefix_cache for s in (self.default, *(s for _, s in self.by)))


def mix(spec: str | Strategy | StrategyMix) -> StrategyMix:
    """A strategy name (``nearest``, ``blend@0.3``), or one per placeholder
    (``records=nearest,question=dense``; ``*=NAME`` for the rest, ``prefix_only`` unless
    given), as a :class:`StrategyMix`. ValueError on an unknown strategy or a bad spec."""
    if isinstance(spec, StrategyMix):
        return spec
    if isinstance(spec, Strategy):
        return StrategyMix(spec)
    if "=" not in spec:
        return StrategyMix(strategy(spec))
    by, default = [], STRATEGIES["prefix_only"]
    for item in spec.split(","):
        placeholder, eq, name = item.partition("=")
        if not eq or not placeholder.strip() or not name.strip():
            raise ValueError(f"strategy mix {spec!r}: {item!r} is not placeholder=strategy")
        if placeholder.strip() == "*":
            default = strategy(name.strip())
        else:
            by.append((placeholder.strip(), strategy(name.strip())))
    if len({p for p, _ in by}) != len(by):
        raise ValueError(f"strategy mix {spec!r} names a placeholder twice")
    return StrategyMix(default, tuple(by))


SIMILARITY_WINDOW = 512
"""Prefix tokens compared, counted back from the segment."""


def _window(prefix: Sequence[int]) -> list[int]:
    return list(prefix[-SIMILARITY_WINDOW:])[::-1]


def similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """How alike two prefixes are near their ends (where attention to them matters most for
    the segment that follows): difflib's ratio over the last ``SIMILARITY_WINDOW`` tokens
    of each, reversed, in [0, 1]."""
    return difflib.SequenceMatcher(None, _window(a), _window(b), autojunk=False).ratio()


def _common_start(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def choose_source(sources: Sequence[SegmentSource], prefix: Sequence[int], rule: SourceRule,
                  prefer: str = "") -> SegmentSource | None:
    """The source a strategy reads: for NEAREST the one whose stored prefix is most like
    ``prefix`` by :func:`similarity` (``prefer``'s, the consumer's own model, on ties: no
    cross-model plan needed); for BASE the position-normalized copy (offset 0, no prefix).

    The exact ratio is quadratic in Python: 5 ms for two unlike 512-token windows, and a
    template segment such as a chat turn's tail has a source in every stored prompt (16 at
    most). So ``prefix`` is indexed once, candidates go most alike ends first, and a
    candidate whose upper bounds (difflib's quick ratios) cannot beat the best so far is
    not scored: the same choice (up to exact ties), at a fraction of the cost."""
    if rule == SourceRule.BASE:
        return next((s for s in sources if s.normalized), None)
    mine = _window(prefix)
    matcher = difflib.SequenceMatcher(None, autojunk=False)
    matcher.set_seq2(mine)
    windows = [(_window(s.prefix()), s) for s in sources if not s.normalized]
    windows.sort(key=lambda item: _common_start(item[0], mine), reverse=True)   # stable: newest first on ties
    best, best_key = None, (-1.0, False)
    for window, source in windows:
        preferred = source.producer == prefer
        matcher.set_seq1(window)
        if (matcher.real_quick_ratio(), preferred) <= best_key or (matcher.quick_ratio(), preferred) <= best_key:
            continue
        key = (matcher.ratio(), preferred)
        if key > best_key:
            best, best_key = source, key
    return best


@dataclass(frozen=True)
class AnchorOptions:
    """KVCOMM's anchor rules. ``temperature`` divides distances before the softmax (raw
    distances give one-hot weights on SmolLM2, FACTS.md), ``gamma`` scales the entropy
    threshold, ``mass`` is the share of the weight the activated anchors hold."""

    temperature: float = 0.1
    gamma: float = 0.3
    mass: float = 0.9
    min_anchors: int = 2
    max_anchors: int = 8           # the nearest this many take part in an estimate


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def admission(distances: Sequence[float], options: AnchorOptions) -> tuple[bool, list[int]]:
    """KVCOMM's entropy rule over the normalized distances from new content to the eligible
    anchors: (becomes an anchor?, indices of the anchors holding ``mass`` of the weight,
    heaviest first, when it does not)."""
    if len(distances) < options.min_anchors:
        return True, []
    scale = (sum(distances) / len(distances)) or 1.0        # distances relative to their mean
    p = softmax([-d / scale / options.temperature for d in distances])
    entropy = -sum(x * math.log2(x) for x in p if x > 0)
    if entropy > options.gamma * math.log2(len(p)):
        return True, []
    order = sorted(range(len(p)), key=lambda i: -p[i])
    chosen, held = [], 0.0
    for i in order:
        chosen.append(i)
        held += p[i]
        if held >= options.mass:
            break
    return False, chosen
