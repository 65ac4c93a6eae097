"""KVCOMM's anchor-corrected reuse of a placeholder and the template segment after it
(ALGORITHMS.md), over the service's anchor pool (node.anchors) and segment sources.

All K/V here are position-normalized (keys de-rotated to start at position 0) until they go
into the cache, so offsets measured at one position apply at another. For content ``c`` in
placeholder ``ph`` of agent ``a`` followed by template segment ``F``:

- ``base(c)``: c's stored normalized copy (the first context that stored it, de-rotated);
- an anchor k holds ``base(k)`` and, per agent, ΔPH = real(k in a) − base(k) and
  ΔPF = real(F after k in a) − ref(F), ``ref(F)`` being F's own normalized copy;
- the estimate: placeholder tokens ``base(c) + Σ_k w_k(t) ΔPH_k``, with per-token weights
  from the distance between c's and each anchor's base keys; the following segment
  ``ref(F) + Σ_k W_k ΔPF_k`` with weights per (layer, head, channel) from distances over
  tokens; layer 0 uncorrected. Distances are divided by their mean and a temperature
  (raw ones give one-hot weights on SmolLM2, FACTS.md).
- content far from every anchor (the entropy rule), an empty pool, or anchors without
  this agent's offsets: a **miss**. Both parts are computed (exact), c becomes an anchor
  and this agent's offsets are recorded, so the next content can be estimated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from cachesvc.wire.keys import Kind
from cachesvc.wire.segments import AnchorDelta, SegmentSource
from cachesvc_client import CacheServiceError
from cachesvc_connectors.reuse.segments import SourceRule, admission, choose_source

DELTA_SALT = "cachesvc-anchor-delta"

Slabs = dict[tuple[Kind, int], torch.Tensor]     # (kind, layer) -> [tokens, heads, dim], float32


class AnchorMiss(Exception):
    """No estimate for this content: compute it and record (the message says why)."""


@dataclass
class _Estimate:
    placeholder: Slabs
    following: Slabs
    anchors: list[bytes]


class AnchorPath:
    """An agent's anchor-corrected reuse (one per hf.agents.Agent)."""

    def __init__(self, agent) -> None:
        self.agent = agent
        self.options = agent.anchor_options
        self.layers = range(agent.stack.num_layers)

    def collect(self, prompt, part, following, last: int, report, rows: list, computed: list, after: list) -> None:
        """Decide ``part`` (a placeholder) and ``following`` (the template segment after it,
        or None), up to token ``last``: estimated rows into ``rows``, or, on a miss,
        computed ranges into ``computed`` and a recording step into ``after`` (run on the
        built cache once the answer is out: ``AgentPrefill.finish``)."""
        from cachesvc_connectors.hf.agents import PartReport, CacheRows, Span
        count = min(part.end, last) - part.start
        f_count = min(following.end, last) - following.start if following is not None else 0
        row = PartReport(part.name, "anchor", count)
        f_row = PartReport(following.name, "anchor", f_count) if following is not None else None
        report.parts += [r for r in (row, f_row) if r is not None]
        full = self.agent.full_plan
        try:
            if count < len(part.tokens):
                raise AnchorMiss("the placeholder ends the prompt")
            est = self._estimate(prompt.ids, part, following, f_count)
        except AnchorMiss as miss:
            row.action, row.why = "compute", str(miss)
            computed.append((part.start, part.start + count))
            if f_row is not None:
                f_row.action = "compute"
                computed.append((following.start, following.start + f_count))
            if count == len(part.tokens):
                def record(cache: DynamicCache) -> None:
                    failed = self._record(cache, part, following, f_count)
                    if failed:
                        row.why += f"; not recorded in the anchor pool: {failed}"
                after.append(record)
            return
        # Normalized rows: moved by their start, as from a span stored at offset 0.
        rows.append(CacheRows(part.start, count, Span(0, count, est.placeholder, full), 0.0, row))
        row.reused_tokens = count
        if f_row is not None and f_count:
            rows.append(CacheRows(following.start, f_count, Span(0, f_count, est.following, full), 0.0, f_row))
            f_row.reused_tokens = f_count
        try:
            self.agent.client.activate_anchors(self.agent.family_id, part.name, est.anchors)
        except CacheServiceError:
            pass   # a lost activation only makes the anchor likelier to be evicted

    # ------------------------------------------------------------------ estimate

    def _estimate(self, ids: list[int], part, following, f_count: int) -> _Estimate:
        agent, n = self.agent, len(part.tokens)
        base_c = self._base(part.tokens, ids[:part.start])
        if base_c is None:
            raise AnchorMiss("no stored copy of the content")
        try:
            pool = agent.client.find_anchors(agent.family_id, part.name, min_length=n)
        except CacheServiceError as exc:
            raise AnchorMiss(f"anchor pool unreachable: {exc}") from None
        pool = [a for a in pool if a.base.producer == agent.model_id]
        bases = [(a, self._load(a.base)) for a in pool]
        bases = [(a, b) for a, b in bases if b is not None]
        if not bases:
            raise AnchorMiss("no anchors for this placeholder yet")
        distances = [_mean_l2(base_c, b, n, Kind.V) for _, b in bases]
        becomes, chosen = admission(distances, self.options)
        if becomes:
            raise AnchorMiss(f"new content (entropy rule over {len(bases)} anchors)")
        chosen = chosen[:self.options.max_anchors]
        picked = [bases[i] for i in chosen]
        deltas = []
        for anchor, base in picked:
            delta = anchor.deltas.get(agent.name)
            if delta is None:
                raise AnchorMiss(f"anchor {anchor.segment_key.hex()[:8]} has no offsets of agent {agent.name!r}")
            if following is not None and delta.following_length != f_count:
                raise AnchorMiss("the anchor's following segment differs in length")
            d_ph = self._load(SegmentSource(delta.producer, delta.placeholder_hashes, 0, anchor.length))
            d_pf = self._load(SegmentSource(delta.producer, delta.following_hashes, 0, f_count)) if f_count else {}
            if d_ph is None or d_pf is None:
                raise AnchorMiss("an anchor's offsets did not load whole")
            deltas.append((anchor, base, d_ph, d_pf))
        ph = self._correct_tokens(base_c, deltas, n)
        pf: Slabs = {}
        if f_count:
            ref = self._base(following.tokens[:f_count])
            if ref is None:
                raise AnchorMiss("no stored copy of the following segment")
            pf = self._correct_channels(ref, base_c, deltas, n)
        return _Estimate(ph, pf, [a.segment_key for a, *_ in deltas])

    def _correct_tokens(self, base_c: Slabs, deltas: list, n: int) -> Slabs:
        """base + Σ_k w_k(t) ΔPH_k, w per token from the anchors' key distances."""
        t = self.options.temperature
        dist = torch.stack([(base_c[(Kind.K, layer)] - b[(Kind.K, layer)][:n]).abs().mean(dim=(1, 2))
                            for _, b, *_ in deltas for layer in self.layers]).view(len(deltas), -1, n).mean(1)
        w = torch.softmax(-dist / (dist.mean() + 1e-9) / t, dim=0)                 # [anchors, tokens]
        out = {}
        for (kind, layer), value in base_c.items():
            if layer == 0:
                out[(kind, layer)] = value
                continue
            shift = sum(w[k][:, None, None] * d[(kind, layer)][:n] for k, (_, _, d, _) in enumerate(deltas))
            out[(kind, layer)] = value + shift
        return out

    def _correct_channels(self, ref: Slabs, base_c: Slabs, deltas: list, n: int) -> Slabs:
        """ref + Σ_k W_k ΔPF_k, W per (layer, head, channel) from L2 distances over tokens."""
        t = self.options.temperature
        out = {}
        for (kind, layer), value in ref.items():
            if layer == 0:
                out[(kind, layer)] = value
                continue
            dist = torch.stack([(base_c[(kind, layer)] - b[(kind, layer)][:n]).norm(dim=0) for _, b, *_ in deltas])
            w = torch.softmax(-dist / (dist.mean() + 1e-9) / t, dim=0)             # [anchors, heads, dim]
            out[(kind, layer)] = value + sum(w[k][None] * pf[(kind, layer)] for k, (*_, pf) in enumerate(deltas))
        return out

    # ------------------------------------------------------------------ recording a miss

    def _record(self, cache: DynamicCache, part, following, f_count: int) -> str:
        """After computing the parts: store what the pool needs (bases where missing, this
        agent's offsets) and make the content an anchor. '' when done, else why not: the
        pool stays as it was (the node admits nothing partial) and the caller reports it."""
        agent = self.agent
        real_ph = self._rows(cache, part.start, len(part.tokens))
        base_source = self._source_of(part.tokens)
        base = self._load(base_source) if base_source is not None else None
        try:
            if base is None:
                base_source, base = agent.put_base(part.tokens, real_ph), real_ph
            d_ph = {k: real_ph[k] - base[k] for k in real_ph}
            key = agent.client.segment_key(list(part.tokens), agent.family_id)
            ph_chain = self._put_delta(part.tokens, key, part.name, "ph", d_ph)
            pf_chain: tuple[bytes, ...] = ()
            if f_count:
                f_tokens = following.tokens[:f_count]
                real_pf = self._rows(cache, following.start, f_count)
                ref = self._base(f_tokens)
                if ref is None:
                    agent.put_base(f_tokens, real_pf)
                    ref = real_pf
                pf_chain = self._put_delta(f_tokens, key, part.name, "pf", {k: real_pf[k] - ref[k] for k in real_pf})
            agent.client.admit_anchor(agent.family_id, part.name, key, base_source)
            agent.client.record_anchor(agent.family_id, part.name, key,
                                       AnchorDelta(agent.name, agent.model_id, ph_chain, pf_chain, f_count))
        except CacheServiceError as exc:
            return str(exc)
        return ""

    def _put_delta(self, tokens, content_key: bytes, placeholder: str, which: str, slabs: Slabs) -> tuple[bytes, ...]:
        """Offsets over ``tokens`` (their rows), stored under a chain of those tokens keyed
        by the anchored content, the agent, the placeholder and which offsets they are."""
        agent = self.agent
        chain = agent.client.hash_tokens(list(tokens), agent.family_id, include_partial=True,
                                         extra_keys=(DELTA_SALT, content_key, agent.name, placeholder, which))
        agent._put_chain(chain, slabs, len(next(iter(slabs.values()))))
        return tuple(chain)

    def _rows(self, cache: DynamicCache, start: int, count: int) -> Slabs:
        """Rows [start, start+count) of every layer, token-major, keys de-rotated to 0."""
        rows = {}
        for layer in self.layers:
            rows[(Kind.K, layer)] = cache.layers[layer].keys[0, :, start:start + count].transpose(0, 1).float()
            rows[(Kind.V, layer)] = cache.layers[layer].values[0, :, start:start + count].transpose(0, 1).float()
        return self._normalized(rows, start)

    def _normalized(self, slabs: Slabs, offset: int) -> Slabs:
        """``slabs`` (float32) with the keys of every layer moved from ``offset`` to 0."""
        if offset:
            keys = self.agent.rope.shift(torch.stack([slabs[(Kind.K, layer)] for layer in self.layers]), -offset)
            for layer in self.layers:
                slabs[(Kind.K, layer)] = keys[layer]
        return slabs

    # ------------------------------------------------------------------ reading

    def _source_of(self, tokens, prefix: list[int] | None = None) -> SegmentSource | None:
        """This model's normalized copy of ``tokens``, else (given the ``prefix`` they sit
        behind) its stored span with the nearest prefix."""
        own = [s for s in self.agent.sources(tokens) if s.producer == self.agent.model_id]
        found = choose_source(own, [], SourceRule.BASE)
        if found is None and prefix is not None:
            found = choose_source(own, prefix, SourceRule.NEAREST)
        return found

    def _base(self, tokens, prefix: list[int] | None = None) -> Slabs | None:
        """``tokens``' normalized K/V (see :meth:`_source_of`), None when none loads."""
        source = self._source_of(tokens, prefix)
        return self._load(source) if source is not None else None

    def _load(self, source: SegmentSource) -> Slabs | None:
        """A source's K/V in float32, keys moved to position 0; an empty chain is no rows."""
        if not source.chunk_hashes:
            return {}
        span = self.agent.load(source, self.agent.full_plan)
        return self._normalized({k: v.float() for k, v in span.kv.items()}, source.offset) if span is not None else None


def _mean_l2(a: Slabs, b: Slabs, n: int, kind: Kind) -> float:
    """Mean over layers, heads and tokens of the L2 distance per channel vector."""
    layers = sorted({layer for k, layer in a if k == kind})
    return float(torch.stack([(a[(kind, layer)][:n] - b[(kind, layer)][:n]).norm(dim=-1).mean()
                              for layer in layers]).mean())

