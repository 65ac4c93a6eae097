"""cachesvc connectors: inference-engine integrations and the reuse algorithms.

``cachesvc_connectors.reuse`` is engine-neutral (plans, profiles, cost model, planner,
drift guard; no torch). ``cachesvc_connectors.hf`` is the HuggingFace transformers
connector (DroidSpeak producer and consumer), and ``cachesvc_connectors.profiler`` the HF
profiler. Tensors live here (torch), never in the service.
"""
