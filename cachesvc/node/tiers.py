"""Moving entries between the tiers: memory extents with LRU eviction (and spill to disk in
spill mode), the disk writer (write-through queue, spill, shutdown), and reloading the
disk tier at start. Part of the store (cachesvc.node.store), which owns the lock.

Locking: methods named ``*_locked`` run under the store lock; the others take it
themselves and never hold it during disk I/O.
"""

from __future__ import annotations

import logging
import queue
import threading

from cachesvc.node.arena import Arena
from cachesvc.node.catalog import Catalog, EntryRecord
from cachesvc.node.disk import DiskTier
from cachesvc.node.models import ModelRegistry
from cachesvc.node.records import DiskMode, StoreConfig
from cachesvc.wire.errors import NotFound, ResourceExhausted
from cachesvc.wire.keys import EntryId

log = logging.getLogger("cachesvc.node.store")


class Tiers:
    """Capacity is never exceeded: memory by the arena's construction, disk by reserving a
    file's bytes in ``catalog.disk_used`` before writing it."""

    def __init__(self, lock: threading.Lock, catalog: Catalog, arena: Arena, disk: DiskTier | None,
                 config: StoreConfig, counters: dict[str, int]) -> None:
        self._lock, self.catalog, self.arena, self.disk = lock, catalog, arena, disk
        self.config, self.counters = config, counters
        self.persist_queue: queue.Queue[EntryId | None] = queue.Queue()

    # ------------------------------------------------------------ memory

    def allocate(self, size_bytes: int, tenant: str) -> int:
        """An arena extent charged to ``tenant``, evicting (and spilling) LRU entries that
        nobody holds: the tenant's own while it is at its quota, anyone's when the tier
        is full."""
        catalog = self.catalog
        quota = self.config.quotas.get(tenant)
        limit = quota.memory_bytes if quota else 0
        need = self.arena.rounded(size_bytes)
        if limit and need > limit:
            raise ResourceExhausted(f"an entry of {size_bytes} bytes is over tenant {tenant!r}'s memory quota "
                                    f"of {limit} bytes")
        while True:
            with self._lock:
                if limit and self.arena.used_by.get(tenant, 0) + need > limit:
                    victim = next((r for r in catalog.mem_lru.values()
                                   if r.meta.tenant == tenant and not r.busy), None)
                    if victim is None:
                        raise ResourceExhausted(
                            f"tenant {tenant!r}'s memory quota ({limit} bytes) is full and every entry of it is "
                            f"pinned, being read or reserved ({self.arena.used_by.get(tenant, 0)} bytes used)")
                else:
                    offset = self.arena.alloc(size_bytes, tenant)
                    if offset is not None:
                        return offset
                    victim = next((r for r in catalog.mem_lru.values() if not r.busy), None)
                    if victim is None:
                        raise ResourceExhausted(
                            f"memory tier full: no room for {size_bytes} bytes and every entry is "
                            f"pinned, being read or reserved ({self.arena.used_bytes} of "
                            f"{self.arena.capacity_bytes} bytes used)")
                spill = self.config.disk_mode == DiskMode.SPILL and not victim.disk_bytes
                if not spill:
                    catalog.drop_memory(victim)
                    continue
            if not self.persist(victim.meta.entry_id):   # outside the lock
                with self._lock:   # could not spill (disk full or failing): drop it
                    if victim.mem_offset is not None and not victim.busy and not victim.disk_bytes:
                        catalog.drop_memory(victim)

    # ------------------------------------------------------------ disk

    def load_disk_locked(self, models: ModelRegistry) -> None:
        """Index every whole entry file of a registered producer (at start)."""
        assert self.disk is not None
        scan = self.disk.scan()
        kept = 0
        for meta in scan.entries:
            try:
                model = models.get(meta.producer, tenant=meta.tenant)
            except NotFound:
                model = None
            if model is None or model.family_id != meta.family_id:
                log.warning("dropping entry of unknown producer",
                            extra={"entry": meta.entry_id.hex(), "producer": meta.producer})
                self.disk.remove(meta.entry_id)
                continue
            self.catalog.add_on_disk(EntryRecord(meta, disk_bytes=self.disk.file_bytes(meta)))
            kept += 1
        self.catalog.evict_disk(0, self.config.disk_capacity_bytes)
        for tenant, quota in self.config.quotas.items():      # a quota lowered since the last run
            if quota.disk_bytes:
                self.catalog.evict_disk(0, self.config.disk_capacity_bytes, tenant, quota.disk_bytes)
        log.info("disk tier loaded", extra={"entries": kept, "dropped_torn": len(scan.dropped),
                                            "bytes": self.catalog.disk_used})

    def persist(self, entry: EntryId) -> bool:
        """Write one memory entry to disk (call without the lock). True if it is on disk
        afterwards, or no longer needs to be (gone or deleted)."""
        assert self.disk is not None
        catalog = self.catalog
        with self._lock:
            rec = catalog.entries.get(entry)
            if rec is None or rec.deleted or rec.mem_offset is None or rec.disk_bytes:
                return True
            need = self.disk.file_bytes(rec.meta)
            tenant = rec.meta.tenant
            quota = self.config.quotas.get(tenant)
            if not catalog.evict_disk(need, self.config.disk_capacity_bytes, tenant, quota.disk_bytes if quota else 0):
                return False
            catalog.charge_disk(tenant, need)   # reserved before writing: capacity holds
            rec.readers += 1
        ok = True
        try:
            start = rec.mem_offset
            self.disk.write(rec.meta, self.arena.view[start:start + rec.meta.size_bytes])
        except OSError as exc:
            ok = False
            log.error("disk write failed", extra={"entry": entry.hex(), "error": str(exc)})
        with self._lock:
            rec.readers -= 1
            if ok:
                rec.disk_bytes = need
                catalog.disk_lru[entry] = rec
                self.counters["disk_writes"] += 1
            else:
                catalog.charge_disk(tenant, -need)
                self.counters["disk_write_errors"] += 1
            catalog.release(rec)
        return ok

    def persist_loop(self) -> None:
        """The write-through writer: persists queued entries until it dequeues None."""
        while True:
            entry = self.persist_queue.get()
            if entry is None:
                return
            self.persist(entry)

    def persist_all(self) -> None:
        """Make every memory entry durable (shutdown)."""
        with self._lock:
            dirty = [r.meta.entry_id for r in self.catalog.mem_lru.values() if not r.disk_bytes]
        for entry in dirty:
            self.persist(entry)
