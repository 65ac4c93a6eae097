"""Records the store takes and returns: its configuration, put inputs, and the results
of reserve, lookup and read. Plain data, no behaviour (cachesvc.store acts on them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from cachesvc.entries import EntryMeta, SlabSpec
from cachesvc.keys import Kind


class Tier(enum.IntEnum):
    """Values equal the proto enum ``cachesvc.v1.Tier``."""

    MEMORY = 1
    DISK = 2


class DiskMode(str, enum.Enum):
    WRITE_THROUGH = "write_through"  # every commit is queued for disk; drained on close
    SPILL = "spill"                  # written on eviction from memory, and on close
    OFF = "off"                      # memory only


@dataclass(frozen=True, slots=True)
class StoreConfig:
    memory_capacity_bytes: int
    chunk_size: int = 256
    disk_dir: Path | None = None          # required unless disk_mode is OFF
    disk_capacity_bytes: int = 0
    disk_mode: DiskMode = DiskMode.OFF
    disk_fsync: bool = False
    reservation_ttl_s: float = 30.0       # default idle lifetime of a reservation
    max_run_bytes: int = 4 << 20          # target size of one ReadRun message
    reap_interval_s: float = 0.5


@dataclass(frozen=True, slots=True)
class EntryInput:
    """One entry of a put, as the writer describes it."""

    chunk_hash: bytes
    position_offset: int
    num_tokens: int
    slabs: list[SlabSpec]


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
    tiers: list[int]           # Tier value of metas[i]


@dataclass(frozen=True, slots=True)
class LookupResult:
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
