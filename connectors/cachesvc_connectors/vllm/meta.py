"""What the scheduler-side connector tells the workers each step (vLLM sends it across
processes, so plain picklable data only: no clients, no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from cachesvc_client import Hit


@dataclass(frozen=True)
class LoadSpec:
    """Load tokens [start, stop) of ``hit`` (both multiples of the block size) into
    ``block_ids`` (the request's blocks for exactly those tokens). ``lease_id`` holds the
    hit's entries until the worker has loaded them, at the latest until ``lease_until``
    (wall-clock seconds, ``time.time()``; scheduler and worker share the node's host
    whenever the worker reads the entries in place, and so one clock)."""

    req_id: str
    hit: Hit
    start: int
    stop: int
    block_ids: tuple[int, ...]
    lease_id: str = ""
    lease_until: float = 0.0


@dataclass(frozen=True)
class SaveSpec:
    """Store chunks ``first .. first + len(hashes) - 1`` of a request (whole chunks,
    computed by the end of this step), read from its blocks ``block_ids`` (all of the
    request's blocks, from token 0)."""

    req_id: str
    first: int
    hashes: tuple[bytes, ...]
    block_ids: tuple[int, ...]


@dataclass
class CachesvcMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
