"""The HF side of the drift guard: answer a prompt greedily through a plan and with the
consumer's own full prefill (reuse.drift.Verifier), and record a demotion in the service."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cachesvc.wire.keys import ModelId
from cachesvc_client import CacheServiceError
from cachesvc_connectors.reuse.drift import DemotionEvent
from cachesvc_connectors.reuse.plan import Plan


class AnswerVerifier:
    """Verifier over a ``cachesvc_connectors.hf.Consumer``."""

    def __init__(self, consumer) -> None:
        self.consumer = consumer

    @torch.no_grad()
    def same_answer(self, ids: Sequence[int], producer: ModelId, plan: Plan, max_new_tokens: int) -> bool | None:
        ids = list(ids)
        pre = self.consumer.prefill_with(ids, producer, plan)
        if pre is None:
            return None
        return self._greedy(ids, pre.cache, max_new_tokens) == self._greedy(ids, None, max_new_tokens)

    def _greedy(self, ids: Sequence[int], cache, new_tokens: int) -> list[int]:
        """The consumer's greedy answer to ``ids`` with ``cache`` (None: its own prefill)."""
        consumer = self.consumer
        input_ids = consumer.stack.ids(list(ids))
        kwargs = {"past_key_values": cache} if cache is not None else {}
        out = consumer.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      max_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=consumer.model.config.eos_token_id, **kwargs)
        return out[0, len(ids):].tolist()

    def flag(self, event: DemotionEvent) -> str:
        """Flag the pair in the service's registry (best effort: the demotion stands either
        way, and the guard's metrics keep the flag)."""
        consumer = self.consumer
        reason = (f"drift guard of {consumer.model_id!r}: plan {event.plan} gave {event.rate:.2f} identical "
                  f"answers over {event.samples} checks, profile promised {event.expected:.2f}; "
                  f"demoted to {event.demoted_to}")
        try:
            applied = consumer.client.flag_profile(event.producer, consumer.model_id, reason,
                                                   consumer.profile_version(event.producer))
        except CacheServiceError as exc:
            return f"not recorded: {exc}"
        return "applied" if applied else "not applied: the profile was replaced since"
