"""Agent prompts that reuse shared segments behind their own prefixes (cross-context reuse;
docs/agents.md, ALGORITHMS.md's KVCOMM and CacheBlend).

An agent's prompt is a template, P0 ph1 P1 … phm Pm: fixed text (``Part.kind ==
"template"``) around placeholders holding shared content (the user's question, a peer's
answer, a retrieved passage). Each part is tokenized on its own, so the same content has the
same tokens, and so the same content key, in every agent.

:meth:`Agent.prefill` decides, part by part, what a strategy (reuse.segments) says for each
part of the prompt's first N-1 tokens, then builds their cache in one pass over the layers;
``generate()`` runs the last token and decodes. With ``logits=True`` the same pass also runs
the last token and returns its logits (the cache then holds all N tokens): a caller that
decodes itself saves a pass of the weights over the last token (on a CPU ~50 ms for
SmolLM2-135M, as much as the assembly's own pass) and HF's copy of the whole cache to append it:

- P0 read from a stored prompt of this model that starts with it, else this model's
  longest stored prefix (exact either way);
- a placeholder's content computed (exact), or its K/V read from a stored span of another
  context (the nearest prefix, or its position-normalized copy) with keys re-rotated to
  where it sits here (hf.rope, exact for RoPE); a span stored by another model of the family
  goes through the pair's plan, its recompute groups starting from the stored E; ``blend``
  then recomputes the most deviating share of its tokens; ``kvcomm`` corrects the K/V with
  the anchor pool's offsets (hf.anchored);
- the following template segment computed against all that, or reused the same way.

Whatever cannot be reused (no source, a source gone or failing its checksum, no plan for a
producer, a model whose attention is not plain causal) is computed, and the report says why:
never a wrong cache. :meth:`Agent.publish` stores a prompt (and the answer) and registers
every part as a segment source, without a second copy.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cachesvc.wire.keys import Kind
from cachesvc.wire.segments import SegmentSource, pack_prefix
from cachesvc_client import CacheServiceError, EntryData, Hit
from cachesvc_connectors.hf.consumer import Consumer
from cachesvc_connectors.hf.loader import LoadRequest, Staging, open_loader
from cachesvc_connectors.hf.producer import Producer
from cachesvc_connectors.hf.rope import Repositioner
from cachesvc_connectors.hf.selective import deviation, select
from cachesvc_connectors.reuse import DriftGuard, DriftOptions, Plan, blend_shares
from cachesvc_connectors.reuse.crosscontext import StrategySelector
from cachesvc_connectors.reuse.segments import (Action, AnchorOptions, SourceRule, Strategy, StrategyMix,
                                                choose_source, mix)

BASE_SALT = "cachesvc-segment-base"
"""Extra key of a segment's position-normalized copy (its own chain, never a prompt's)."""

_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TemplateMismatchError(ValueError):
    """A prompt's values do not fill its template's placeholders exactly."""


@dataclass(frozen=True, slots=True)
class Part:
    kind: str                  # "template" or "placeholder"
    name: str                  # the placeholder's name, or "P<j>" for template text
    start: int                 # first token's position in the prompt
    tokens: tuple[int, ...]

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(frozen=True, slots=True)
class AgentPrompt:
    """A filled template. Invariant: parts are contiguous from position 0."""

    template: str
    parts: tuple[Part, ...]

    @property
    def ids(self) -> list[int]:
        return [t for p in self.parts for t in p.tokens]

    def __len__(self) -> int:
        return self.parts[-1].end if self.parts else 0


class AgentTemplate:
    """``P0 {ph1} P1 … {phm} Pm``: text with ``{name}`` placeholders (:meth:`from_text`), or
    pieces ``("template", text or token ids)`` and ``("placeholder", name)``."""

    def __init__(self, name: str, pieces: Sequence[tuple[str, str | Sequence[int]]]) -> None:
        self.name = name
        self.pieces = list(pieces)
        self.placeholders = [n for kind, n in self.pieces if kind == "placeholder"]
        if len(set(self.placeholders)) != len(self.placeholders):
            raise TemplateMismatchError(f"template {name!r} repeats a placeholder: {self.placeholders}")

    @classmethod
    def from_text(cls, name: str, text: str) -> AgentTemplate:
        pieces, at = [], 0
        for m in _SLOT.finditer(text):
            pieces.append(("template", text[at:m.start()]))
            pieces.append(("placeholder", m.group(1)))
            at = m.end()
        pieces.append(("template", text[at:]))
        return cls(name, pieces)

    def fill(self, tokenizer, values: Mapping[str, str | Sequence[int]]) -> AgentPrompt:
        """Tokenize each part on its own; ``values`` maps every placeholder to text or
        token ids (and nothing else)."""
        missing = [n for n in self.placeholders if n not in values]
        extra = sorted(set(values) - set(self.placeholders))
        if missing or extra:
            raise TemplateMismatchError(f"template {self.name!r} has placeholders {self.placeholders}; "
                                        f"missing {missing}, unknown {extra}")
        parts, at, j = [], 0, 0
        for kind, piece in self.pieces:
            if kind == "template" and not isinstance(piece, str):
                tokens, name, j = tuple(int(t) for t in piece), f"P{j}", j + 1     # given as token ids
            elif kind == "template":
                tokens = tuple(tokenizer(piece, add_special_tokens=False)["input_ids"]) if piece else ()
                name, j = f"P{j}", j + 1
            else:
                value = values[piece]
                tokens = tuple(tokenizer(value, add_special_tokens=False)["input_ids"]) if isinstance(value, str) \
                    else tuple(int(t) for t in value)
                if not tokens:
                    raise TemplateMismatchError(f"placeholder {piece!r} of {self.name!r} is empty")
                name = piece
            if tokens or kind == "placeholder":
                parts.append(Part(kind, name, at, tokens))
                at += len(tokens)
        return AgentPrompt(self.name, tuple(parts))


@dataclass
class PartReport:
    name: str
    action: str                # what was done: compute, reuse, blend, anchor
    tokens: int
    reused_tokens: int = 0
    source: str = ""           # producer@offset of the span read
    shift: int = 0             # positions its keys moved
    plan: str = ""             # the pair's plan, for another model's span
    why: str = ""              # why less was reused than the strategy asked


@dataclass
class AgentReport:
    strategy: str
    prompt_tokens: int
    reused_tokens: int = 0     # tokens whose K/V were read, not computed (the last one never is)
    prefix_tokens: int = 0     # of them, the agent's own stored prefix
    prefill_s: float = 0.0
    chose: str = ""            # the planner's reason, with strategy "auto"
    parts: list[PartReport] = field(default_factory=list)

    @property
    def reuse_token_rate(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def fallback(self) -> str:
        return "; ".join(f"{p.name}: {p.why}" for p in self.parts if p.why)


@dataclass
class AgentPrefill:
    cache: DynamicCache        # the first N-1 prompt tokens (all N with ``logits``)
    report: AgentReport
    logits: torch.Tensor | None = None   # the last prompt token's logits ([vocab]), when asked for
    # What the anchor path learned from a miss, recorded off the request path: run by
    # :meth:`finish` once the answer is out (``Agent.generate`` does). The prompt's rows
    # of ``cache`` stay as they are while generation appends to it.
    pending: list = field(default_factory=list)

    def finish(self) -> None:
        for record in self.pending:
            record(self.cache)
        self.pending.clear()


@dataclass
class Span:
    """Rows read from the service: per (kind, layer) ``[count, heads, dim]`` (E: ``[count,
    hidden]``) as stored at positions ``offset``…, the slabs ``plan`` needs."""

    offset: int
    length: int
    kv: dict[tuple[Kind, int], torch.Tensor]
    plan: Plan


@dataclass
class CacheRows:
    """Cache rows [start, start+count) taken from ``span`` (keys moved by ``start -
    span.offset``); ``blend`` > 0: CacheBlend's ratio over them."""

    start: int
    count: int
    span: Span
    blend: float
    report: PartReport | None


def _join(pos: torch.Tensor, hidden: torch.Tensor | None, joining: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens entering the computed set at this layer: (start, hidden [1, n, H]) each."""
    new_pos = [torch.arange(start, start + h.shape[1], device=device) for start, h in joining]
    all_pos = torch.cat([pos, *new_pos])
    all_hidden = torch.cat(([hidden] if hidden is not None else []) + [h for _, h in joining], dim=1)
    order = torch.argsort(all_pos)
    return all_pos[order], all_hidden[:, order]


def _leave(pos: torch.Tensor, hidden: torch.Tensor, ranges: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    gone = torch.zeros_like(pos, dtype=torch.bool)
    for a, b in ranges:
        gone |= (pos >= a) & (pos < b)
    return pos[~gone], hidden[:, ~gone]


def _rows_of(keys: torch.Tensor, values: torch.Tensor, rows: CacheRows, pos: torch.Tensor):
    """The read K/V of ``rows``' tokens now in ``pos`` (copies, before they are overwritten)."""
    at = pos[(pos >= rows.start) & (pos < rows.start + rows.count)]
    return keys[:, :, at].clone(), values[:, :, at].clone()


class Agent:
    """One agent of a pipeline: its model (``consumer`` and ``producer`` of the same model),
    its name (the templates' and the anchor pool's), and how it picks strategies."""

    def __init__(self, name: str, consumer: Consumer, producer: Producer,
                 selector: StrategySelector | None = None, anchors: AnchorOptions | None = None) -> None:
        if producer.model_id != consumer.model_id:
            raise ValueError(f"an agent's producer and consumer are one model: {producer.model_id!r} "
                             f"vs {consumer.model_id!r}")
        self.name, self.consumer, self.producer = name, consumer, producer
        self.client, self.stack, self.model_id = consumer.client, consumer.stack, consumer.model_id
        self.family_id, self.family = consumer.family_id, consumer.registration.family
        self.selector = selector
        self.anchor_options = anchors or AnchorOptions()
        self.full_plan = Plan.full_reuse(self.stack.num_layers)
        self.rope, self._why_not = self._repositioner()
        self._anchored = None
        # Where spans are loaded, reused from one load to the next (their rows are copied
        # out at once): fresh buffers cost a page fault per 4 KiB, ~20 ms per prompt here.
        self._staging = Staging(pinned=self.stack.device.type == "cuda")

    def _repositioner(self) -> tuple[Repositioner | None, str]:
        """The model's key mover, or why it cannot take spans from other contexts."""
        if any(self.stack.window(layer) for layer in range(self.stack.num_layers)):
            return None, "sliding-window layers keep only part of the context: spans are computed"
        try:
            return Repositioner(self.stack), ""
        except TypeError as exc:
            return None, str(exc)

    # ------------------------------------------------------------------ publishing

    @torch.no_grad()
    def publish(self, prompt: AgentPrompt, answer: Sequence[int] = ()) -> None:
        """Store the prompt (and ``answer`` after it) and register every part, and the
        answer, as a segment source: other agents reuse them by content."""
        ids = prompt.ids + [int(t) for t in answer]
        self.producer.store(ids)
        hashes = self.client.hash_tokens(ids, self.family_id, include_partial=True)
        spans = [(p.tokens, p.start) for p in prompt.parts]
        if answer:
            spans.append((tuple(int(t) for t in answer), len(prompt)))
        for tokens, start in spans:
            source = self._source(hashes, start, len(tokens), ids[:start])
            try:
                self.client.put_segment(self.family_id, self.client.segment_key(tokens, self.family_id), source)
            except CacheServiceError:
                pass   # that chunk was evicted already: nothing to register

    def _source(self, hashes: Sequence[bytes], start: int, length: int, prefix: Sequence[int]) -> SegmentSource:
        chunk = self.client.chunk_size()
        return SegmentSource(self.model_id, tuple(hashes[:math.ceil((start + length) / chunk)]), start, length,
                             pack_prefix(prefix))

    def put_base(self, tokens: Sequence[int], kv: Mapping[tuple[Kind, int], torch.Tensor]) -> SegmentSource:
        """Store ``tokens``' K/V position-normalized (keys as if they started at position 0)
        as their own chain, and register it as the segment's BASE source."""
        chain = self.client.hash_tokens(list(tokens), self.family_id, extra_keys=(BASE_SALT,), include_partial=True)
        self._put_chain(chain, kv, len(tokens))
        source = SegmentSource(self.model_id, tuple(chain), 0, len(tokens), normalized=True)
        self.client.put_segment(self.family_id, self.client.segment_key(list(tokens), self.family_id), source)
        return source

    def _put_chain(self, chain: Sequence[bytes], kv: Mapping[tuple[Kind, int], torch.Tensor], n: int) -> None:
        chunk, dtype = self.client.chunk_size(), self.family.dtype.to_torch()
        host = {key: t.to(dtype).contiguous().cpu() for key, t in kv.items()}
        self.client.put(self.family_id, self.model_id, [
            EntryData(h, {key: t[i * chunk:min((i + 1) * chunk, n)] for key, t in host.items()})
            for i, h in enumerate(chain)])

    def sources(self, tokens: Sequence[int]) -> list[SegmentSource]:
        """The live sources of ``tokens`` as a segment (none when the service cannot say:
        the caller then computes)."""
        try:
            [found] = self.client.find_segments(self.family_id, [self.client.segment_key(list(tokens), self.family_id)])
        except CacheServiceError:
            return []
        return found

    # ------------------------------------------------------------------ choosing

    def choose(self, prompt: AgentPrompt) -> tuple[StrategyMix, str]:
        if self.selector is None:
            return mix("prefix_only"), "no selector: the agent's own prefix only"
        chosen = self.selector.choose(prompt.template)
        return mix(chosen.strategy), chosen.why

    # ------------------------------------------------------------------ prefill

    @torch.no_grad()
    def prefill(self, prompt: AgentPrompt, strategy: str | Strategy | StrategyMix = "auto",
                logits: bool = False) -> AgentPrefill:
        """The cache of the prompt's first N-1 tokens, built as ``strategy`` says (a name,
        ``blend@R``, one per placeholder as ``records=nearest,*=prefix_only``, or "auto":
        the selector's choice); with ``logits``, of all N tokens, and the last one's logits
        from the same pass."""
        t0 = time.perf_counter()
        ids = prompt.ids
        if len(ids) < 2:
            raise ValueError("a prompt needs at least 2 tokens")
        chose = ""
        if isinstance(strategy, str) and strategy == "auto":
            strategy, chose = self.choose(prompt)
        strategy = mix(strategy)
        report = AgentReport(strategy.name, len(ids), chose=chose)
        # prefix_only goes through the assembly too: P0 is read whole from a stored prompt
        # that starts with it, not only its leading whole chunks.
        after: list = []
        if strategy.prefix_cache:
            cache, last_logits, after = self._assemble(prompt, strategy, report, logits)
        else:
            cache, last_logits = self._dense(ids if logits else ids[:-1], logits)
        report.prefill_s = time.perf_counter() - t0
        if self.consumer.metrics is not None:
            self.consumer.metrics.observe_agent(report)
        return AgentPrefill(cache, report, logits=last_logits, pending=after)

    def _dense(self, ids: Sequence[int], logits: bool = False) -> tuple[DynamicCache, torch.Tensor | None]:
        """The model's own prefill of ``ids`` (and the last one's logits, if asked)."""
        cache = self.stack.new_cache()
        if not logits:
            self.consumer.model.model(input_ids=self.stack.ids(ids), past_key_values=cache, use_cache=True)
            return cache, None
        out = self.consumer.model(input_ids=self.stack.ids(ids), past_key_values=cache, use_cache=True,
                                  logits_to_keep=1)
        return cache, out.logits[0, -1]

    def _assemble(self, prompt: AgentPrompt, strategy: StrategyMix, report: AgentReport,
                  logits: bool) -> tuple[DynamicCache, torch.Tensor | None, list]:
        """Decide, part by part, which rows are read and which computed (``_collect``), then
        build the cache in one pass over the layers (``_build``), with the last token
        computed in it too when ``logits``. Also returns what the anchor path will record
        of its misses (``AgentPrefill.pending``)."""
        ids = prompt.ids
        last = len(ids) - 1                        # the parts fill tokens [0, last)
        rows, computed, after = self._collect(prompt, strategy, report, last)
        if logits:                                 # the last token goes through the same pass
            computed.append((last, len(ids)))
        cache, last_logits = self._build(ids, len(ids) if logits else last, rows, computed, logits)
        # Blended parts know how many tokens they recomputed only now.
        report.reused_tokens = report.prefix_tokens + sum(p.reused_tokens for p in report.parts)
        return cache, last_logits, after

    def _collect(self, prompt: AgentPrompt, strategies: StrategyMix, report: AgentReport,
                 last: int) -> tuple[list[CacheRows], list[tuple[int, int]], list]:
        ids, parts = prompt.ids, prompt.parts
        rows: list[CacheRows] = []
        computed: list[tuple[int, int]] = []
        after = []
        first = next((i for i, p in enumerate(parts) if p.kind == "placeholder"), len(parts))
        head = min(parts[first].start if first < len(parts) else last, last)
        if head >= 1:
            self._head(ids, parts[0], head, report, rows, computed)
        i, strategy = first, strategies.default
        while i < len(parts) and parts[i].start < last:
            part = parts[i]
            if part.kind == "placeholder":      # its strategy, and the following segment's
                strategy = strategies.of(part.name)
            if part.kind == "placeholder" and strategy.placeholder == Action.ANCHOR and not self._why_not:
                following = parts[i + 1] if i + 1 < len(parts) and parts[i + 1].kind == "template" else None
                self._anchor_path().collect(prompt, part, following, last, report, rows, computed, after)
                i += 2 if following is not None else 1
                continue
            action = strategy.placeholder if part.kind == "placeholder" else strategy.following
            if action == Action.ANCHOR:        # a model the anchor path cannot serve
                action = Action.COMPUTE
            end = min(part.end, last)
            row = PartReport(part.name, Action.COMPUTE.value, end - part.start)
            report.parts.append(row)
            span = None
            if action != Action.COMPUTE:
                row.why = self._why_not
                span = None if row.why else self._read(part, ids, strategy.source, row)
            if span is None:
                computed.append((part.start, end))
            else:
                ratio = strategy.ratio if action == Action.BLEND else 0.0
                rows.append(CacheRows(part.start, end - part.start, span, ratio, row))
                row.action, row.reused_tokens = action.value, end - part.start
            i += 1
        return rows, computed, after

    def _head(self, ids: list[int], p0: Part, head: int, report: AgentReport, rows: list[CacheRows],
              computed: list[tuple[int, int]]) -> None:
        """The tokens before the first placeholder: P0 read whole from a stored prompt of
        this model that starts with it (exact: nothing precedes it there either), else the
        longest stored prefix of this model (whole chunks, or a partial chunk it stored),
        the rest computed."""
        span = None
        if not self._why_not and p0.kind == "template" and p0.end == head:
            exact = next((s for s in self.sources(p0.tokens)
                          if s.offset == 0 and not s.normalized and s.producer == self.model_id), None)
            span = self.load(exact, self.full_plan) if exact is not None else None
        if span is None and not self._why_not:
            try:
                result = self.client.lookup_prompt(self.family_id, ids[:head], consumer=self.model_id,
                                                   producers=[self.model_id], locate=self.consumer.direct)
                hit = next((h for h in result.hits if h.producer == self.model_id), None)
            except CacheServiceError:
                hit = None
            n = min(hit.num_tokens, head) if hit is not None else 0
            span = self._load_hit(hit, 0, n, self.full_plan) if n else None
        n = min(span.length, head) if span is not None else 0
        if n:
            rows.append(CacheRows(0, n, span, 0.0, None))
        if n < head:
            computed.append((n, head))
        report.prefix_tokens = n

    # ------------------------------------------------------------------ reading spans

    def _read(self, part: Part, ids: list[int], rule: SourceRule, row: PartReport) -> Span | None:
        """The K/V of ``part``'s tokens from a source the rule picks (None, with
        ``row.why``, when there is none usable)."""
        source = choose_source(self.sources(part.tokens), ids[:part.start], rule, prefer=self.model_id)
        if source is None:
            row.why = f"no {rule.value} source of its {len(part.tokens)} tokens"
            return None
        plan = self.full_plan
        if source.producer != self.model_id:
            choice = self.consumer.plan_for(source.producer, source.length, len(ids))
            if choice.plan is None:
                row.why = f"{source.producer!r} has no plan for {self.model_id!r}: {choice.why}"
                return None
            plan = choice.plan
            row.plan = plan.describe()
        span = self.load(source, plan)
        if span is None:
            row.why = f"the span of {source.producer!r} did not load whole (evicted or failed its checksum)"
            return None
        row.source, row.shift = f"{source.producer}@{source.offset}", part.start - source.offset
        return span

    def load(self, source: SegmentSource, plan: Plan) -> Span | None:
        """The source's span, the slabs ``plan`` needs, loaded and verified (only the
        chunks covering the span); None if any did not arrive whole."""
        chunk = self.client.chunk_size()
        lo, hi = source.offset // chunk, math.ceil(source.end / chunk)
        try:
            result = self.client.lookup(self.family_id, list(source.chunk_hashes), producers=[source.producer],
                                        locate=self.consumer.direct)
        except CacheServiceError:
            return None
        hit = next((h for h in result.hits if h.producer == source.producer), None)
        if hit is None or hit.num_chunks < hi:
            return None
        span = self._load_hit(hit[lo:hi], source.offset - lo * chunk, source.length, plan)
        if span is not None:
            span.offset = source.offset
        return span

    def _load_hit(self, hit: Hit, first: int, count: int, plan: Plan) -> Span | None:
        """Rows [first, first+count) of ``hit``'s tokens, the slabs ``plan`` needs."""
        requests = [LoadRequest((Kind.K, Kind.V), a, b) for a, b in plan.reused_ranges()]
        requests += [LoadRequest((Kind.E,), a, a + 1) for a, _ in plan.groups]
        loader = open_loader(self.client, self.family, self.family_id, hit, requests, direct=self.consumer.direct,
                             device=self.stack.device, staging=self._staging)
        loader.run()
        rows = slice(first, first + count)
        kv = {}
        for r in requests:
            for kind in r.kinds:
                for layer in range(r.start, r.stop):
                    slab = loader.wait(kind, layer)
                    if slab is None:
                        return None
                    kv[(kind, layer)] = slab[rows].clone()   # out of the loader's buffers
        if loader.join() < hit.num_chunks:
            return None
        return Span(first, count, kv, plan)

    # ------------------------------------------------------------------ building the cache

    def _build(self, ids: list[int], last: int, rows: list[CacheRows], computed: list[tuple[int, int]],
               logits: bool = False) -> tuple[DynamicCache, torch.Tensor | None]:
        """The cache of tokens [0, last) in one pass over the layers (and, with ``logits``,
        the logits of token ``last - 1``, which must then be computed). At layer l: the rows
        read for l are written (keys re-rotated by their move, straight into the cache);
        then every token computed at l (the computed parts at every layer, a span's
        recompute group from its stored E, a blended span's chosen tokens) runs through
        the layer together (``DecoderStack.run_at``: their K/V overwrite their rows, each
        query sees keys up to its own position). One weight pass per layer, however many
        parts are computed: on a CPU a layer's weights cost as much to read for 10 tokens
        as for 100."""
        if not rows:
            return self._dense(ids[:last], logits)
        stack, dtype, layers = self.stack, self.stack.dtype, self.stack.num_layers
        cfg = self.family
        keys = [torch.zeros(1, cfg.num_kv_heads, last, cfg.head_dim, dtype=dtype, device=stack.device)
                for _ in range(layers)]
        values = [torch.zeros_like(k) for k in keys]
        moves = [self._move(r) for r in rows]
        pos = torch.tensor([p for a, b in computed for p in range(a, b)], dtype=torch.long, device=stack.device)
        hidden = stack.embed(stack.ids(ids[a] for a in pos.tolist())) if len(pos) else None
        leaves: dict[int, list[tuple[int, int]]] = {}          # layer -> [start, end) leaving after it
        for layer in range(layers):
            joining = []
            for r, move in zip(rows, moves, strict=True):
                if move is not None and r.span.plan.group_at(layer) is None:   # a layer the span's K/V fill
                    # [tokens, heads, dim] views of the head-major cache rows
                    move(r.span.kv[(Kind.K, layer)][:r.count], keys[layer][0, :, r.start:r.start + r.count]
                         .transpose(0, 1), layer)
                    # (the assignment converts as it copies)
                    values[layer][0, :, r.start:r.start + r.count] = r.span.kv[(Kind.V, layer)][:r.count].transpose(0, 1)
                group = r.span.plan.group_at(layer)
                if group is not None and group[0] == layer:        # a recompute group starts here
                    joining.append((r.start, r.span.kv[(Kind.E, layer)][:r.count].to(dtype).unsqueeze(0)))
                    leaves.setdefault(group[1] - 1, []).append((r.start, r.start + r.count))
                if layer == 0 and r.blend > 0:                      # CacheBlend: layer 0 over every token
                    joining.append((r.start, stack.embed(stack.ids(ids[r.start:r.start + r.count]))))
            if joining:
                pos, hidden = _join(pos, hidden, joining, stack.device)
            blended = [r for r in rows if r.blend > 0 and layer < 2]
            old = {id(r): _rows_of(keys[layer], values[layer], r, pos) for r in blended}
            if hidden is not None and len(pos):
                hidden = stack.run_at(hidden, layer, pos, keys[layer], values[layer])
            for r in blended:                                       # keep the most deviating
                pos, hidden = self._blend_select(r, layer, pos, hidden, keys[layer], values[layer], old[id(r)])
            if layer in leaves:
                pos, hidden = _leave(pos, hidden, leaves.pop(layer))
        cache = stack.new_cache()
        for layer in range(layers):
            cache.update(keys[layer], values[layer], layer)
        return cache, (stack.logits(hidden)[0, -1] if logits else None)

    def _move(self, rows: CacheRows):
        """How the rows' keys reach the cache: ``move(keys, out, layer)`` writes keys
        ([count, heads, dim]) moved by the rows' shift into ``out`` (a view of the cache
        rows, any strides); None when the span has no reused layer."""
        if not rows.span.plan.reused_ranges():
            return None
        shift = rows.start - rows.span.offset
        if not shift:
            return lambda keys, out, layer: out.copy_(keys)
        assert self.rope is not None   # spans are read only where keys can be moved
        return self.rope.mover(shift, self.stack.device)

    def _blend_select(self, rows: CacheRows, layer: int, pos: torch.Tensor, hidden: torch.Tensor,
                      keys: torch.Tensor, values: torch.Tensor, old) -> tuple[torch.Tensor, torch.Tensor]:
        """After layer 0 (then 1), keep the ``2·ratio`` (then ``ratio``) of the rows' tokens
        whose recomputed K/V deviate most from the read ones; the rest keep what was read."""
        mine = (pos >= rows.start) & (pos < rows.start + rows.count)
        if not bool(mine.any()):
            return pos, hidden
        at = pos[mine]
        scores = deviation(keys[:, :, at], values[:, :, at], *old)
        keep = math.ceil(blend_shares(rows.blend)[layer] * rows.count)
        chosen = at[select(at, scores, rows.start + rows.count, keep)]
        if rows.report is not None:
            rows.report.reused_tokens = rows.count - (len(chosen) if layer == 1 else 0)
        drop = mine.clone()
        drop[mine] = ~torch.isin(at, chosen)
        return pos[~drop], hidden[:, ~drop]

    def _anchor_path(self):
        if self._anchored is None:
            from cachesvc_connectors.hf.anchored import AnchorPath
            self._anchored = AnchorPath(self)
        return self._anchored

    def watch(self, options: DriftOptions | None = None) -> DriftGuard:
        """Let a drift guard sample this agent's planned strategies against its dense
        prefill (greedy answers compared) and demote one that stops keeping its promise."""
        if self.selector is None:
            raise ValueError("an agent without a strategy selector has nothing to watch")
        self.selector.guard = DriftGuard(_StrategyVerifier(self), self.selector.flag, options or DriftOptions())
        return self.selector.guard

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompt: AgentPrompt, strategy: str | Strategy | StrategyMix = "auto",
                 **generate_kwargs) -> tuple[torch.Tensor, AgentReport]:
        """``model.generate`` over the prompt with the assembled cache (sequences, prompt
        included, as ``generate`` returns them) and the report; the drift guard samples
        answers of planned strategies."""
        pre = self.prefill(prompt, strategy)
        ids = self.stack.ids(prompt.ids)
        out = self.consumer.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                           past_key_values=pre.cache, **generate_kwargs)
        pre.finish()
        if strategy == "auto" and self.selector is not None:
            self.selector.observe(prompt.template, prompt, pre.report.strategy)
        return out, pre.report


class _StrategyVerifier:
    """Answers an agent prompt greedily with a strategy and with the dense prefill
    (reuse.drift.Verifier; the guard's 'plan' is a reuse.crosscontext.StrategyStep)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @torch.no_grad()
    def same_answer(self, prompt: AgentPrompt, key: str, step, max_new_tokens: int) -> bool | None:
        return self._greedy(prompt, step.describe(), max_new_tokens) == self._greedy(prompt, "dense", max_new_tokens)

    def _greedy(self, prompt: AgentPrompt, strategy: str, new_tokens: int) -> list[int]:
        out, _ = self.agent.generate(prompt, strategy, max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=self.agent.consumer.model.config.eos_token_id)
        return out[0, len(prompt.ids):].tolist()

