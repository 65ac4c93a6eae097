"""What the store takes and returns: its configuration, put inputs, the results of
reserve, lookup and read, and the handle that holds a read's entries. Plain data, but
for that handle's release (cachesvc.node.store acts on the rest)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cachesvc.node.entries import EntryMeta, SlabSpec
from cachesvc.wire.errors import InvalidArgument
from cachesvc.wire.keys import DEFAULT_TENANT, Kind, Tier


class DiskMode(str, enum.Enum):
    WRITE_THROUGH = "write_through"  # every commit is queued for disk; drained on close
    SPILL = "spill"                  # written on eviction from memory, and on close
    OFF = "off"                      # memory only


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's share of the tiers (0: bounded by the tier alone). A tenant over its
    quota evicts its own least recently used entries, never another tenant's."""

    memory_bytes: int = 0
    disk_bytes: int = 0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    memory_capacity_bytes: int
    memory_prefault: bool = False         # allocate the whole tier at start (see Arena)
    chunk_size: int = 256
    disk_dir: Path | None = None          # required unless disk_mode is OFF
    disk_capacity_bytes: int = 0
    disk_mode: DiskMode = DiskMode.OFF
    disk_fsync: bool = False
    reservation_ttl_s: float = 30.0       # default idle lifetime of a reservation
    max_run_bytes: int = 4 << 20          # target size of one ReadRun message
    reap_interval_s: float = 0.5
    quotas: Mapping[str, Quota] = field(default_factory=dict)   # tenant -> its quota
    segment_sources: int = 65536          # bound of the segment index (node.segments)
    anchor_pool_bytes: int = 256 << 20    # byte budget of the anchor pools (node.anchors)


@dataclass(frozen=True, slots=True)
class EntryInput:
    """One entry of a put, as the writer describes it."""

    chunk_hash: bytes
    position_offset: int
    num_tokens: int
    slabs: list[SlabSpec]
    parent_hash: bytes = b""     # a partial chunk's parent in the chain (optional)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What reserve() returns: where each entry's bytes go."""

    reservation_id: str
    entries: list[EntryMeta]
    already_present: list[bool]
    expires_in_s: float


@dataclass(frozen=True, slots=True)
class ProducerHit:
    producer: str
    same_model: bool
    metas: list[EntryMeta]     # metas[i] covers chunk i of the request
    tiers: list[Tier]          # where metas[i] lives
    tails: list[EntryMeta] = field(default_factory=list)   # partial chunks offered after the run, longest first
    tail_tiers: list[Tier] = field(default_factory=list)
    # With a locating lookup: each entry's payload offset in the memory tier (-1: disk only).
    arena_offsets: list[int] = field(default_factory=list)
    tail_arena_offsets: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class LookupAnswer:
    hits: list[ProducerHit]    # longest first
    lease_id: str


@dataclass(frozen=True, slots=True)
class ReadRun:
    """Consecutive layers of one kind of one entry, or a miss.

    ``data`` may be a view of the memory tier (then ``arena_offset`` says where): it is
    valid until the read iterator finishes or is closed, since every entry of the read is
    held until then. Copy it to keep it longer.
    """

    entry_index: int
    kind: Kind
    layer_start: int
    num_layers: int
    checksums: tuple[int, ...] = ()
    data: bytes | memoryview = b""
    missing_reason: str = ""   # non-empty: these layers are not available
    arena_offset: int = -1     # byte offset of data in the memory tier; -1 if not there


class ReadHandle:
    """Iterate for the :class:`ReadRun` s of one read; ``close()`` (or leaving the
    ``with`` block) lets go of its entries. Views in the runs stay valid until then."""

    def __init__(self, runs: Iterator[ReadRun], release: Callable[[], None]) -> None:
        self._runs = runs
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[ReadRun]:
        return self._runs

    def close(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __enter__(self) -> "ReadHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:   # a handle dropped unclosed must not pin entries forever
        self.close()


MAX_TENANT_CHARS = 128


def tenant_name(tenant: str) -> str:
    """A request's tenant as the store keys it: "" is the default tenant. Control
    characters are refused: the cluster's Redis fields join a tenant to ids with them."""
    if len(tenant) > MAX_TENANT_CHARS:
        raise InvalidArgument(f"tenant is {len(tenant)} chars, at most {MAX_TENANT_CHARS}")
    if any(ord(c) < 0x20 or c == "\x7f" for c in tenant):
        raise InvalidArgument(f"tenant {tenant!r} holds control characters")
    return tenant or DEFAULT_TENANT
