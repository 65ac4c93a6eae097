"""Looking a prompt up by its tokens, where a stored context may end mid-chunk: the logic
both clients share around their two Lookup calls (docs/chunk-keys.md, "Finding a partial
chunk by its prefix"). Pure functions; no I/O."""

from __future__ import annotations

from collections.abc import Sequence

from cachesvc.wire.keys import DEFAULT_TENANT, ChunkHash, FamilyId, chain_root, encode_extra_keys, tail_hashes
from cachesvc_client.codec import LookupResult


def held_chunks(result: LookupResult) -> int:
    """The longest hit's chunk count (0 when nothing hit)."""
    return max((hit.num_chunks for hit in result.hits), default=0)


def tail_probe(tokens: Sequence[int], hashes: Sequence[ChunkHash], first: LookupResult, chunk_size: int,
               tenant: str, family_id: FamilyId, extra_keys: Sequence[str | bytes] = ()
               ) -> tuple[list[ChunkHash], list[ChunkHash]] | None:
    """For the second lookup: (the chain hashes every hit of ``first`` covers, the tail
    candidates after them), or None when nothing more can hit (every chunk of the prompt
    hit, or no token follows). ``hashes`` is the prompt's chain, its own trailing partial
    chunk included."""
    held = held_chunks(first)
    rest = tokens[held * chunk_size:held * chunk_size + chunk_size - 1]
    if held == len(hashes) or not rest:
        return None
    parent = hashes[held - 1] if held else chain_root(tenant or DEFAULT_TENANT, FamilyId(family_id), chunk_size)
    return list(hashes[:held]), tail_hashes(parent, rest, encode_extra_keys(extra_keys))


def choose(first: LookupResult, probed: LookupResult) -> tuple[LookupResult, LookupResult]:
    """(the answer to keep, the one to drop): the probe's when it reached further."""
    return (probed, first) if held_chunks(probed) > held_chunks(first) else (first, probed)
