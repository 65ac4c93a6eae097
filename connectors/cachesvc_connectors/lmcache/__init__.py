"""LMCache integrations that run inside LMCache's own process (and virtualenv).

``l2_adapter``: a plugin for LMCache's multiprocess server (``lmcache server
--l2-adapter '{"type": "plugin", "module_path": "cachesvc_connectors.lmcache.l2_adapter",
"class_name": "CachesvcL2Adapter", "adapter_params": {"address": "HOST:PORT"}}'``),
storing LMCache's chunks in a cachesvc node through its ``lm://`` endpoint.

Nothing here is imported by our own packages: it needs ``lmcache`` (and torch), which
live in LMCache's virtualenv (``make lmcache-venv``), not ours.
"""
