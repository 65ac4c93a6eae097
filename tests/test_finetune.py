"""The shipped adapters: each file matches its recorded sha256 and recipe, and the merge
is bit-exact whatever order the rank sum is added in (why the merged weights' digest is
the same on every machine). Merging the real adapters into SmolLM2 and checking the
shipped digest is in test_real_model.py."""

from __future__ import annotations

import torch

from cachesvc_lab import finetune


def test_every_recipe_has_a_shipped_adapter_that_matches():
    for name in finetune.RECIPES:
        recipe, meta = finetune.shipped(name)
        assert recipe == finetune.RECIPES[name] and len(meta["weights_digest"]) == 32


def test_the_merge_does_not_depend_on_summation_order():
    gen = torch.Generator().manual_seed(0)
    rank, rows, cols = 16, 96, 80
    a = (torch.randn(rank, cols, generator=gen) * 0.05).to(torch.bfloat16)
    b = (torch.randn(rows, rank, generator=gen) * 1e-3).to(torch.bfloat16)
    weight = torch.randn(rows, cols, generator=gen)
    by_matmul = (weight.double() + (b.double() @ a.double()) * 2.0).float()
    backwards = torch.zeros(rows, cols, dtype=torch.float64)
    for r in reversed(range(rank)):                  # another order, no BLAS
        backwards += b.double()[:, r:r + 1] * a.double()[r:r + 1, :]
    by_loop = (weight.double() + backwards * 2.0).float()
    assert torch.equal(by_matmul, by_loop)
    # the same in fp32 is not order-independent: that is why the merge runs in float64
    assert not torch.equal((b.float() @ a.float()), sum(b.float()[:, r:r + 1] * a.float()[r:r + 1, :]
                                                        for r in reversed(range(rank))))


def test_seeded_task_data_is_the_same_in_every_process():
    """Training, profiling and demo data come from seeded generators; a set of names once
    made them depend on PYTHONHASHSEED (so on the process)."""
    import os
    import subprocess
    import sys
    code = ("from cachesvc_lab import tasks; import hashlib; "
            "print(hashlib.sha256(repr(tasks.dataset('train', 8, 25, 0)).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(digests) == 1


def test_a_packed_step_scores_each_question_as_its_own_prompt():
    """Training packs several questions over one context into one sequence (each question
    block sees the context and itself only); its loss must equal the loss of the same
    questions asked one prompt at a time."""
    import random

    from cachesvc_lab import smollm2, tasks
    from hf_models import tiny_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2.converted()))
    model = tiny_model("llama", vocab_size=len(tok))
    examples = tasks.make_questions(random.Random(5), 12, 4)
    packed = finetune.pack(tok, examples)
    total, count = 0.0, 0
    with torch.no_grad():
        loss = finetune._loss(model, packed)
        for example in examples:
            prompt = tasks.prompt_ids(tok, example)
            answer = tok.encode(example.answer + "<|im_end|>", add_special_tokens=False)
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum").item()
            count += len(answer)
    assert abs(loss.item() - total / count) < 1e-5
    # and the blocks are really apart: letting question blocks see each other changes the loss
    leaky = finetune.Packed(packed.ids, packed.positions, torch.ones_like(packed.mask).tril(), packed.labels)
    with torch.no_grad():
        assert abs(finetune._loss(model, leaky).item() - total / count) > 1e-4
    # starting at a layer from the frozen layers' hidden state is the same step
    with torch.no_grad():
        resumed = finetune._loss(model, packed, 2, finetune.entering(model, packed, 2))
    assert abs(resumed.item() - loss.item()) < 1e-5
    # the trainer's split attention (the context causal, unmasked; the questions masked) is
    # the same step as one masked attention, gradients included
    adapters = finetune._adapt(model, finetune.Recipe("t", (1, 3), rank=4))
    for lora in adapters.values():
        torch.nn.init.normal_(lora.b, std=0.05)
    grads = []
    for implementation in ("sdpa", finetune.PACKED_ATTENTION):
        model.set_attn_implementation(implementation)
        finetune._loss(model, packed).backward()
        grads.append(torch.cat([p.grad.flatten() for a in adapters.values() for p in (a.a, a.b)]))
        for lora in adapters.values():
            lora.a.grad = lora.b.grad = None
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
