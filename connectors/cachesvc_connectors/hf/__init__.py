"""HuggingFace transformers connector: DroidSpeak producer and consumer.

``Producer`` prefills a context and stores K, V and E per chunk; ``Consumer`` reuses
them, across models of one family, recomputing the layer groups of a plan.
"""

from cachesvc_connectors.hf.consumer import Consumer, ConsumerOptions, ReuseReport
from cachesvc_connectors.hf.decoder import DecoderStack, UnsupportedModelError
from cachesvc_connectors.hf.family import FamilyMismatchError, family_of, weights_digest
from cachesvc_connectors.hf.producer import Producer, ProducerOptions, StoreReport

__all__ = ["Consumer", "ConsumerOptions", "DecoderStack", "FamilyMismatchError", "Producer",
           "ProducerOptions", "ReuseReport", "StoreReport", "UnsupportedModelError", "family_of",
           "weights_digest"]
