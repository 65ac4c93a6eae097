"""The quality harness's grouping: several questions over one context are answered from
each model's own cache of the context, which must give exactly the answers separate full
prefills give (with tiny random-weight models through a real server), and only the first
question per context is timed as a full prefill."""

from __future__ import annotations

import random

import torch

from cachesvc_client import CacheClient
from cachesvc_connectors.reuse.plan import Plan
from cachesvc_lab.evaluate import BASE, REFERENCE, SAME, PairEvaluator, plan_name
from hf_models import VOCAB, fine_tune_of, tiny_model, tokenizer


def _samples(contexts: int, questions: int, tokens: int) -> list[tuple[list[int], list[int], str]]:
    rng = random.Random(3)
    out = []
    for _ in range(contexts):
        context = [rng.randrange(VOCAB - 1) for _ in range(tokens)]
        out += [(context, context + [rng.randrange(VOCAB - 1) for _ in range(5)], "") for _ in range(questions)]
    return out


def test_questions_over_one_context_answer_like_separate_prefills(client: CacheClient):
    base = tiny_model("llama", num_layers=4)
    tuned = fine_tune_of(base, range(2, 4))
    tok = tokenizer()
    evaluator = PairEvaluator(client, base, tuned, tok, "tiny-base", "tiny-tuned", max_new_tokens=4)
    samples = _samples(2, 3, 300)
    # The ground truth of each sample: the consumer's own full prefill of that prompt alone.
    truth = [evaluator.full_prefill(tuned, ids).text.strip().splitlines()[0] for _, ids, _ in samples]
    samples = [(c, ids, t) for (c, ids, _), t in zip(samples, truth, strict=True)]
    plans = [Plan.full_reuse(4), Plan.parse("[2,4)", 4)]
    grouped = evaluator.run_ids(samples, plans, same_model=True)
    assert grouped[REFERENCE].exact == [1.0] * 6, "a cached-context answer differs from the full prefill's"
    assert grouped[REFERENCE].timed == [0, 3] and len(grouped[REFERENCE].ttft_s) == 2
    assert grouped[plan_name(plans[1])].timed == list(range(6))        # reuse: every request timed
    # Interleaved, no two consecutive samples share a context: every answer is a full prefill.
    order = [0, 3, 1, 4, 2, 5]
    separate = evaluator.run_ids([samples[i] for i in order], plans, same_model=True)
    assert separate[REFERENCE].timed == list(range(6))
    for name in (BASE, SAME, plan_name(plans[0]), plan_name(plans[1])):
        assert [grouped[name].exact[i] for i in order] == separate[name].exact, name
        assert [grouped[name].identical[i] for i in order] == separate[name].identical, name
        kl_grouped = torch.tensor([grouped[name].kl[i] for i in order])
        assert torch.allclose(kl_grouped, torch.tensor(separate[name].kl), atol=1e-4), name
