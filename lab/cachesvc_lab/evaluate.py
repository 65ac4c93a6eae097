"""Quality and fidelity of cross-model reuse on a real (producer, consumer) pair.

For every held-out example the producer stores the context once; then each *variant*
answers the full prompt (context + question) greedily:

- ``consumer``: the consumer's own full prefill (the reference for fidelity);
- ``producer``: the producer alone (the base the fine-tune should beat);
- ``plan:<groups>``: the consumer through the connector with that plan; ``full reuse``
  is the empty plan;
- ``cacheblend:<ratio>``: the consumer reusing every layer of the producer's K/V with
  CacheBlend-style selective token recompute (cachesvc_lab.blend), the paper's other baseline.

Two kinds of figures per variant: *task quality* against the ground truth (exact match,
contains, edit similarity) with ``gain_retained = (variant − producer) / (consumer −
producer)``; and *fidelity* to the consumer's full prefill (identical answers, edit
similarity of answers, KL of the first-token distribution). Intervals are 95% bootstrap
intervals over examples (2000 resamples, fixed seed).

Several questions over one context (consecutive samples with the same context ids) cost
one prefill per model: the first question's full prefill is timed, and the later ones
are answered from that prefill's own cache of the context (the same computation, so the
same answers; their TTFT is not a full prefill's and is not recorded). Reuse variants
are timed on every question.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cachesvc.wire.keys import DType, Kind
from cachesvc_client import CacheClient
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions, ReuseReport
from cachesvc_lab.blend import BlendConsumer
from cachesvc_lab import tasks
from cachesvc_connectors.reuse.plan import Plan

REFERENCE, BASE, SAME = "consumer", "producer", "same_model"


@dataclass
class Answer:
    text: str
    first_logprobs: torch.Tensor      # log-softmax of the first generated position
    ttft_s: float | None              # prompt in, first token out (model loaded); None: from a cached context
    report: ReuseReport | None = None
    cache: object | None = None       # the model's own cache after the answer (full prefills only)


@dataclass
class VariantResult:
    """Per-example figures of one variant, aggregated by :func:`summarize`."""

    name: str
    exact: list[float] = field(default_factory=list)
    contains: list[float] = field(default_factory=list)
    edit_similarity: list[float] = field(default_factory=list)
    identical: list[float] = field(default_factory=list)        # answer == consumer's
    fidelity_es: list[float] = field(default_factory=list)      # ES to the consumer's answer
    kl: list[float] = field(default_factory=list)               # KL(consumer || variant), nats
    ttft_s: list[float] = field(default_factory=list)
    timed: list[int] = field(default_factory=list)              # the sample index of each ttft_s
    recomputed_layers: int = 0
    bytes_fetched: list[int] = field(default_factory=list)
    fetch_s: list[float] = field(default_factory=list)          # the loader's time for those bytes
    hidden_fraction: list[float] = field(default_factory=list)
    fallbacks: int = 0


class FirstToken:
    """A ``generate`` streamer that notes when the first new token comes out."""

    def __init__(self) -> None:
        self.calls, self.at = 0, 0.0

    def put(self, _value) -> None:
        self.calls += 1
        if self.calls == 2:          # the first call carries the prompt
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class PairEvaluator:
    """Runs variants for a (producer, consumer) pair against one cachesvc server."""

    def __init__(self, client: CacheClient, producer_model, consumer_model, tokenizer,
                 producer_id: str, consumer_id: str, dtype: DType = DType.BFLOAT16,
                 max_new_tokens: int = 8, after_reuse: Callable[[ReuseReport], None] | None = None) -> None:
        """``after_reuse`` sees each timed reuse's report once its answer is in (a
        benchmark samples its ceiling there, at the same moment of the host)."""
        self.client, self.tokenizer = client, tokenizer
        self.after_reuse = after_reuse
        self.producer_model, self.consumer_model = producer_model, consumer_model
        self.producer = Producer(client, producer_model, tokenizer, producer_id, ProducerOptions(dtype=dtype))
        # The consumer storing its own prefill: what same-model reuse reads.
        self.own = Producer(client, consumer_model, tokenizer, consumer_id, ProducerOptions(dtype=dtype))
        self.consumer_id, self.dtype = consumer_id, dtype
        self.max_new_tokens = max_new_tokens
        self._consumers: dict[tuple[str, str], Consumer] = {}     # (variant, producer)

    def consumer(self, plan: Plan | None, producer: str) -> Consumer:
        """A consumer that reads only ``producer``'s entries, with ``plan`` (None: same model)."""
        key = (plan_name(plan) if plan is not None else SAME, producer)
        if key not in self._consumers:
            self._consumers[key] = Consumer(*self._consumer_args(producer, plan))
        return self._consumers[key]

    def blend_consumer(self, ratio: float, producer: str) -> BlendConsumer:
        """A CacheBlend-style consumer of ``producer``'s entries recomputing ``ratio`` of the tokens."""
        key = (blend_name(ratio), producer)
        if key not in self._consumers:
            self._consumers[key] = BlendConsumer(*self._consumer_args(producer), ratio=ratio)
        return self._consumers[key]

    def _consumer_args(self, producer: str, plan: Plan | None = None) -> tuple:
        return (self.client, self.consumer_model, self.tokenizer, self.consumer_id,
                ConsumerOptions(default_plan=plan, producers=[producer], dtype=self.dtype))

    def _gen_kwargs(self) -> dict:
        return dict(max_new_tokens=self.max_new_tokens, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=self.tokenizer.eos_token_id)

    def _answer(self, out, prompt_len: int, t0: float | None, first: FirstToken,
                report: ReuseReport | None = None) -> Answer:
        text = self.tokenizer.decode(out.sequences[0, prompt_len:], skip_special_tokens=True)
        return Answer(text, torch.log_softmax(out.logits[0][0].float().cpu(), -1),
                      None if t0 is None else first.at - t0, report)

    @torch.no_grad()
    def full_prefill(self, model, ids: list[int], context_cache=None) -> Answer:
        """``model``'s greedy answer to ``ids``, timed from the prompt in; with
        ``context_cache`` (the model's own cache of a prefix of ``ids``, left untouched)
        only the rest is computed and the answer is not timed."""
        first = FirstToken()
        input_ids = torch.tensor([ids], device=model.device)
        extra = {} if context_cache is None else {"past_key_values": copy.deepcopy(context_cache)}
        t0 = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             streamer=first, **extra, **self._gen_kwargs())
        answer = self._answer(out, len(ids), t0 if context_cache is None else None, first)
        answer.cache = out.past_key_values
        return answer

    @torch.no_grad()
    def reuse(self, consumer: Consumer, ids: list[int]) -> Answer:
        first = FirstToken()
        t0 = time.perf_counter()
        out, report = consumer.generate(ids, streamer=first, **self._gen_kwargs())
        answer = self._answer(out, len(ids), t0, first, report)
        if self.after_reuse is not None:
            self.after_reuse(report)
        return answer

    def run(self, examples: Sequence[tasks.Example], plans: Sequence[Plan], same_model: bool = False,
            progress: Callable[[], None] = lambda: None, blends: Sequence[float] = ()
            ) -> dict[str, VariantResult]:
        """Every variant on every example; results by variant name: ``consumer``
        (full prefill), ``producer``, ``same_model`` (if asked), ``plan:<groups>`` and
        ``cacheblend:<ratio>`` (for each of ``blends``)."""
        samples = [(tasks.context_ids(self.tokenizer, e), tasks.prompt_ids(self.tokenizer, e), e.answer)
                   for e in examples]
        return self.run_ids(samples, plans, same_model, progress, blends)

    def run_ids(self, samples: Sequence[tuple[list[int], list[int], str]], plans: Sequence[Plan],
                same_model: bool = False, progress: Callable[[], None] = lambda: None,
                blends: Sequence[float] = ()) -> dict[str, VariantResult]:
        """As :meth:`run`, over (context ids, prompt ids, true answer) samples; the prompt
        starts with the context. Task scores are meaningless where the answer is unknown
        (random-token prompts): read only fidelity and TTFT there."""
        names = [REFERENCE, BASE] + ([SAME] if same_model else []) + [plan_name(p) for p in plans] + \
            [blend_name(r) for r in blends]
        results = {name: VariantResult(name) for name in names}
        for plan in plans:
            results[plan_name(plan)].recomputed_layers = plan.recomputed_layers
        for context, group in itertools.groupby(enumerate(samples), key=lambda item: item[1][0]):
            if same_model:
                self.own.store(context)
            self.producer.store(context)
            caches: dict[str, object] = {}      # variant -> its model's own cache of the context
            for index, (_, ids, truth) in group:
                answers = {}
                for name, model in ((REFERENCE, self.consumer_model), (BASE, self.producer_model)):
                    answers[name] = self.full_prefill(model, ids, caches.get(name))
                    if name not in caches:
                        cache = caches[name] = answers[name].cache
                        cache.crop(len(context) - cache.get_seq_length())   # keep the context only
                if same_model:
                    answers[SAME] = self.reuse(self.consumer(None, self.consumer_id), ids)
                for plan in plans:
                    answers[plan_name(plan)] = self.reuse(self.consumer(plan, self.producer.model_id), ids)
                for ratio in blends:
                    answers[blend_name(ratio)] = self.reuse(self.blend_consumer(ratio, self.producer.model_id), ids)
                for name, ans in answers.items():
                    _record(results[name], ans, answers[REFERENCE], truth, index)
                progress()
            hashes = self.client.hash_tokens(context, self.producer.family_id, include_partial=True)
            self.client.delete(self.producer.family_id, chunk_hashes=hashes)   # both producers'
        return results


def plan_name(plan: Plan) -> str:
    return f"plan:{plan.describe()}"


def blend_name(ratio: float) -> str:
    return f"cacheblend:{ratio:g}"


def _record(result: VariantResult, ans: Answer, ref: Answer, truth: str, index: int) -> None:
    s = tasks.score(ans.text, truth)
    result.exact.append(s.exact)
    result.contains.append(s.contains)
    result.edit_similarity.append(s.edit_similarity)
    result.identical.append(float(ans.text.strip() == ref.text.strip()))
    result.fidelity_es.append(difflib.SequenceMatcher(None, ans.text.strip(), ref.text.strip()).ratio())
    result.kl.append(float(torch.sum(ref.first_logprobs.exp() * (ref.first_logprobs - ans.first_logprobs))))
    if ans.ttft_s is not None:
        result.ttft_s.append(ans.ttft_s)
        result.timed.append(index)
    if ans.report is not None:
        result.bytes_fetched.append(ans.report.bytes_fetched)
        result.fetch_s.append(ans.report.fetch_s)
        result.hidden_fraction.append(ans.report.hidden_fraction)
        result.fallbacks += ans.report.mode == "prefill"


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _bootstrap(stat: Callable[[list[int]], float], n: int, resamples: int = 2000) -> tuple[float, float]:
    rng = random.Random(0)
    values = sorted(stat([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    return values[int(0.025 * resamples)], values[int(0.975 * resamples) - 1]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """95% bootstrap interval of the mean of ``values`` (2000 resamples, fixed seed)."""
    if not values:
        return float("nan"), float("nan")
    return _bootstrap(lambda idx: _mean([values[i] for i in idx]), len(values))


def summarize(results: dict[str, VariantResult]) -> list[dict]:
    """One row per variant: means with 95% bootstrap intervals."""
    ref, base = results[REFERENCE], results[BASE]
    n = len(ref.exact)

    def gain(idx: list[int], v: VariantResult) -> float:
        top = _mean([ref.exact[i] for i in idx]) - _mean([base.exact[i] for i in idx])
        return (_mean([v.exact[i] for i in idx]) - _mean([base.exact[i] for i in idx])) / top \
            if top else float("nan")

    rows = []
    for name, v in results.items():
        row = {"variant": name, "examples": n, "recomputed_layers": v.recomputed_layers,
               "quality": round(_mean(v.exact), 4),
               "quality_ci": [round(x, 4) for x in _bootstrap(lambda i, v=v: _mean([v.exact[j] for j in i]), n)],
               "contains": round(_mean(v.contains), 4),
               "edit_similarity": round(_mean(v.edit_similarity), 4),
               "gain_retained": round(gain(list(range(n)), v), 4),
               "gain_retained_ci": [round(x, 4) for x in _bootstrap(lambda i, v=v: gain(i, v), n)],
               "fidelity": {"identical": round(_mean(v.identical), 4),
                            "edit_similarity": round(_mean(v.fidelity_es), 4),
                            "first_token_kl": round(_mean(v.kl), 5)},
               "ttft_s": round(sorted(v.ttft_s)[len(v.ttft_s) // 2], 4)}
        if v.bytes_fetched:
            loading = sum(v.fetch_s)
            row.update(bytes_fetched=int(_mean(v.bytes_fetched)),
                       load_gbps=round(sum(v.bytes_fetched) / loading / 1e9, 3) if loading else None,
                       hidden_fraction=round(_mean(v.hidden_fraction), 3), fallbacks=v.fallbacks)
        rows.append(row)
    return rows


@torch.no_grad()
def layer_deviation(producer_model, consumer_model, ids: list[int]) -> list[dict]:
    """Per layer: relative L2 deviation ‖X_consumer − X_producer‖ / ‖X_consumer‖ of K, V
    (post-RoPE, as cached) and E (the hidden state entering the layer)."""
    outs = [m.model(input_ids=torch.tensor([ids], device=m.device), use_cache=True, output_hidden_states=True)
            for m in (producer_model, consumer_model)]
    rows = []
    for layer in range(len(consumer_model.model.layers)):
        pc, cc = outs[0].past_key_values.layers[layer], outs[1].past_key_values.layers[layer]
        dev = {Kind.K: (pc.keys, cc.keys), Kind.V: (pc.values, cc.values),
               Kind.E: (outs[0].hidden_states[layer], outs[1].hidden_states[layer])}
        rows.append({"layer": layer, **{k.name: round(float((c - p).norm() / c.norm()), 5)
                                         for k, (p, c) in dev.items()}})
    return rows
