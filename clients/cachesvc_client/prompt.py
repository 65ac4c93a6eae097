"""Looking a prompt up by its tokens, where a stored context may end mid-chunk: what both
clients do with a lookup's offered tails (docs/chunk-keys.md, "Finding a partial chunk
by its prefix"). Pure functions; no I/O."""

from __future__ import annotations

from collections.abc import Sequence

from cachesvc.wire.keys import ChunkHash, FamilyId, encode_extra_keys, next_chunk_hash, parent_of
from cachesvc_client.codec import LookupResult


def verified(tokens: Sequence[int], hashes: Sequence[ChunkHash], result: LookupResult, chunk_size: int,
             tenant: str, family_id: FamilyId, extra_keys: Sequence[str | bytes] = ()) -> LookupResult:
    """``result`` (a lookup of the prompt's chain ``hashes`` with ``offer_tails``) with each
    hit extended by the longest offered partial chunk that the prompt's next tokens hash
    to, and without hits that then hold nothing. An offer is only a hit once hashed here:
    the service never sees the tokens."""
    extras = encode_extra_keys(extra_keys)
    hits = []
    for hit in result.hits:
        chosen = hit
        if hit.tails:
            chosen = hit[:hit.num_chunks]   # the run alone, unless an offer verifies
            start = hit.num_chunks * chunk_size
            rest = tokens[start:start + chunk_size - 1]
            parent = parent_of(hashes, hit.num_chunks, tenant, FamilyId(family_id), chunk_size)
            for offer in hit.tails:   # longest first
                size = offer.layout.num_tokens
                if size <= len(rest) and next_chunk_hash(parent, rest[:size], extras) == offer.chunk_hash:
                    chosen = hit.with_tail(offer)
                    break
        if chosen.num_chunks:
            hits.append(chosen)
    hits.sort(key=lambda h: -h.num_tokens)
    return LookupResult(hits, result.lease_id, result.nodes)
