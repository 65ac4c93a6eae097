"""cachesvc connectors: inference-engine integrations and the reuse algorithms.

Tensors live here (torch), never in the service. ``cachesvc_connectors.plan`` is
engine-neutral; ``cachesvc_connectors.hf`` is the HuggingFace transformers connector
(DroidSpeak producer and consumer).
"""
