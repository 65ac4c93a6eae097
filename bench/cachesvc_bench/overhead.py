"""``cachesvc bench overhead``: the reuse path's fixed cost, where compute and bytes are negligible.

A tiny random-weight Llama (``llama-tiny``: 2 layers, hidden 64) reuses its own stored
context (mode ``same_model``), and a copy of it with layer 1 perturbed reuses the
original's under the plan [1,2) (mode ``plan``). Each mode runs both ways a consumer on
the node's host can read (``fetch``): ``direct``, the slabs copied straight out of the
node's memory tier after a lookup that located them (the default), and ``dataplane``,
fetched with GetSlabs over shm by a loader thread (``ConsumerOptions(direct=False)``;
what a consumer on another host does, over its transport). Per context length,
``--requests`` requests (30 unless given): a context is stored, then the context plus a
16-token question goes through every consumer's ``Consumer.generate`` for one token,
the consumers taking turns on the same prompts. TTFT runs from the prompt in
to the token out. In the same run, the baseline is ``generate()`` of the same prompt over
the cache that path assembles, already in memory (a copy, made untimed), so
``fixed_overhead_ms`` = median TTFT − median baseline is what the reuse path adds, and
``overhead_beyond_compute_ms`` the same without the compute a reuse must do (the suffix,
the plan's recomputed layers): what the plumbing costs. At 2048 tokens a recomputed layer
is not negligible even at hidden 64 (a 2064 x 2064 attention).

The breakdown (medians, ms) comes from the consumer's report and a timer on the model's
first forward: ``lookup`` (hashing and the lookups), ``choose`` (hit and plan),
``fetch_setup`` (the loader built and started), ``first_slab`` (its start to the first
slab in hand), ``load`` (all slabs), ``wait`` (the assembly blocked on slabs),
``assembly`` (assembling, waits excluded), ``compute`` (the part of the assembly that
is the consumer's own layers: the suffix through reused layers, and recompute groups
over every token), ``generate_setup`` (``generate()`` called to
its first forward) and ``first_token`` (that forward to the token out).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch
from tqdm import tqdm

from cachesvc_bench import synthetic
from cachesvc_bench.common import finish, machine, model_server
from cachesvc_client import CacheClient, DType
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
from cachesvc_connectors.reuse import Plan
from cachesvc_lab.evaluate import FirstToken

SHAPE = "llama-tiny"
QUESTION_TOKENS = 16
PHASES = ("lookup", "choose", "fetch_setup", "first_slab", "load", "wait", "assembly", "compute",
          "generate_setup", "first_token")


class _FirstForward:
    """A forward pre-hook noting when the model's first forward of a ``generate()`` starts."""

    def __init__(self, model) -> None:
        self.at = 0.0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, *_args) -> None:
        if not self.at:
            self.at = time.perf_counter()


@torch.no_grad()
def _generate(model, ids: list[int], cache, forward: _FirstForward) -> tuple[float, float, int]:
    """``generate()`` of one token over ``cache``: (seconds to the token, seconds to the
    first forward, the token)."""
    input_ids = torch.tensor([ids], device=model.device)
    first, forward.at = FirstToken(), 0.0
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
                         max_new_tokens=1, do_sample=False, streamer=first, pad_token_id=0)
    return first.at - t0, forward.at - t0, int(out[0, -1])


def _request(consumer: Consumer, forward: _FirstForward, ids: list[int]) -> dict:
    """One request through the reuse path, then the baseline on a copy of its cache."""
    model = consumer.model
    first, forward.at = FirstToken(), 0.0
    t0 = time.perf_counter()
    out, report = consumer.generate(ids, max_new_tokens=1, do_sample=False, streamer=first, pad_token_id=0)
    ttft, forward_at = first.at - t0, forward.at
    ms = {"lookup": report.lookup_s, "choose": report.choose_s, "fetch_setup": report.fetch_setup_s,
          "first_slab": report.first_slab_s, "load": report.fetch_s, "wait": report.wait_s,
          "assembly": report.assembly_s, "compute": report.suffix_s + report.recompute_s,
          "generate_setup": forward_at - t0 - report.prefill_s,
          "first_token": first.at - forward_at}
    assembled = consumer.prefill(ids).cache
    baseline, baseline_setup, token = _generate(model, ids, copy.deepcopy(assembled), forward)
    return {"ttft_s": ttft, "baseline_ttft_s": baseline, "baseline_generate_setup_s": baseline_setup,
            "ms": ms, "mode": report.mode, "reused_tokens": report.reused_tokens,
            "bytes_fetched": report.bytes_fetched, "transport": report.transport,
            "identical": int(out[0, -1]) == token}


def _row(mode: str, fetch: str, tokens: int, done: list[dict]) -> dict:
    med = statistics.median
    ttft, baseline = med(d["ttft_s"] for d in done), med(d["baseline_ttft_s"] for d in done)
    return {"mode": mode, "fetch": fetch, "context_tokens": tokens, "prompt_tokens": tokens + QUESTION_TOKENS,
            "ttft_s": round(ttft, 5), "baseline_ttft_s": round(baseline, 5),
            "fixed_overhead_ms": round((ttft - baseline) * 1e3, 3),
            "overhead_beyond_compute_ms": round((med(d["ttft_s"] - d["ms"]["compute"] for d in done) - baseline)
                                                * 1e3, 3),
            "breakdown_ms": {phase: round(med(d["ms"][phase] for d in done) * 1e3, 3) for phase in PHASES},
            "baseline_generate_setup_ms": round(med(d["baseline_generate_setup_s"] for d in done) * 1e3, 3),
            "reused_tokens": round(med(d["reused_tokens"] for d in done)),
            "bytes_fetched": round(med(d["bytes_fetched"] for d in done)),
            "transport": sorted({d["transport"] for d in done}),
            "served_as": sorted({d["mode"] for d in done}),
            "identical": round(sum(d["identical"] for d in done) / len(done), 3), "requests": len(done)}


def run(args: argparse.Namespace) -> dict:
    contexts = [int(c) for c in args.contexts.split(",")]
    requests = args.requests or 30
    shape = synthetic.SHAPES[SHAPE]
    producer_model, tuned, tokenizer = synthetic.pair(SHAPE, args.device)
    plan = Plan(shape.layers, (synthetic.default_plan(shape),))
    rows = []
    fetches = {"direct": True, "dataplane": False}
    with model_server(args.device) as srv, CacheClient(srv.address) as client:
        producer = Producer(client, producer_model, tokenizer, "tiny", ProducerOptions(dtype=DType.FLOAT32))
        consumers = {}
        for fetch, direct in fetches.items():
            consumers[("same_model", fetch)] = Consumer(client, producer_model, tokenizer, "tiny",
                                                        ConsumerOptions(dtype=DType.FLOAT32, direct=direct))
            consumers[("plan", fetch)] = Consumer(client, tuned, tokenizer, "tiny-tuned",
                                                  ConsumerOptions(dtype=DType.FLOAT32, plans={"tiny": plan},
                                                                  direct=direct))
        forwards = {id(m): _FirstForward(m) for m in (producer_model, tuned)}
        rng = random.Random(args.seed)
        for mode in ("same_model", "plan"):
            for tokens in contexts:
                done: dict[str, list[dict]] = {fetch: [] for fetch in fetches}
                for number in tqdm(range(requests + 3), desc=f"overhead {mode} @{tokens}", unit="request"):
                    context = [rng.randrange(shape.vocab) for _ in range(tokens)]
                    producer.store(context)
                    prompt = context + [rng.randrange(shape.vocab) for _ in range(QUESTION_TOKENS)]
                    for fetch in fetches:
                        consumer = consumers[(mode, fetch)]
                        outcome = _request(consumer, forwards[id(consumer.model)], prompt)
                        if number >= 3:   # the first three warm the path up
                            done[fetch].append(outcome)
                rows += [_row(mode, fetch, tokens, done[fetch]) for fetch in fetches]
    return {"benchmark": "overhead", "machine": machine(), "device": args.device, "shape": SHAPE,
            "plan": plan.describe(), "rows": rows}


def plot(doc: dict, path) -> None:
    """Per mode and length: TTFT's phases stacked, beside the baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = doc["rows"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4.5))
    shown = ("lookup", "choose", "fetch_setup", "wait", "assembly", "compute", "generate_setup", "first_token")
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for phase in shown:   # the assembly drawn without its compute, which is drawn apart
        heights = [r["breakdown_ms"][phase] - (r["breakdown_ms"]["compute"] if phase == "assembly" else 0)
                   for r in rows]
        ax.bar([i - 0.2 for i in x], heights, 0.4, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.bar([i + 0.2 for i in x], [r["baseline_ttft_s"] * 1e3 for r in rows], 0.4, color="gray",
           label="baseline: generate() on the assembled cache")
    ax.scatter(x, [r["ttft_s"] * 1e3 for r in rows], color="black", marker="_", s=400, label="TTFT", zorder=3)
    ax.set(xticks=list(x), xticklabels=[f"{r['mode']}\n{r['fetch']}\n{r['context_tokens']}" for r in rows], ylabel="ms",
           title=f"reuse path's fixed cost ({doc['shape']}, {doc['device']})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    doc = run(args)
    return finish(args.json, doc, plot,
                  ["mode", "fetch", "context", "TTFT ms", "baseline ms", "fixed overhead ms", "beyond compute ms",
                   *PHASES, "identical"],
                  [[r["mode"], r["fetch"], r["context_tokens"], round(r["ttft_s"] * 1e3, 2), round(r["baseline_ttft_s"] * 1e3, 2),
                    r["fixed_overhead_ms"], r["overhead_beyond_compute_ms"], *(r["breakdown_ms"][p] for p in PHASES),
                    r["identical"]]
                   for r in doc["rows"]])
