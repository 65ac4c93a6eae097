"""The segment index: content key -> spans of stored chains that hold the segment's K/V
(cross-context reuse, docs/agents.md). A source is a reference, never a copy: the bytes
stay in the entries of the chain it names, under their own eviction.

Part of the store, which owns the lock: every method runs under it. A source is only
accepted when every chunk of its chain is committed for its producer, and a find drops the
sources whose chunks have gone since (evicted, deleted, replaced), so a reader never gets a
span it cannot read whole; it may still lose the race with an eviction after the find, and
then sees a miss on its fetch, as with any lookup.

The index is bounded (``max_sources``, least recently used out first) and, with the disk
tier, journaled to ``segments.jsonl`` (one line per change; compacted on start and when
mostly superseded), so sources come back with the entries they point at after a restart.
Changes are queued under the store lock and written after it is released (``take`` /
``write``), as the store does all its disk I/O.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from cachesvc.wire.segments import SegmentSource

log = logging.getLogger(__name__)

Key = tuple[str, str, bytes]          # (tenant, family_id, segment_key)
MAX_SOURCES_PER_SEGMENT = 16          # the newest; enough to pick a nearest prefix from


class SegmentIndex:
    """Invariant: ``count`` is the number of sources over every key; ``_order`` holds each
    key once, least recently used first."""

    def __init__(self, max_sources: int, journal: Path | None = None) -> None:
        if max_sources < 1:
            raise ValueError(f"segment sources bound must be >= 1, got {max_sources}")
        self.max_sources = max_sources
        self._order: OrderedDict[Key, list[SegmentSource]] = OrderedDict()
        self.count = 0
        self._journal = journal
        self._lines = 0                  # records in the journal file
        self._pending: list[str] | None = None    # changes not yet written (None: not journaling)
        if journal is not None:
            self._replay(journal)
            self._pending = []

    # ------------------------------------------------------------ changes

    def put(self, key: Key, source: SegmentSource) -> int:
        """Add ``source`` (a repeat of a known span only refreshes it); returns how many
        sources the key has."""
        old = self._order.pop(key, [])
        sources = ([s for s in old if not s.same_span(source)] + [source])[-MAX_SOURCES_PER_SEGMENT:]
        self._order[key] = sources
        self.count += len(sources) - len(old)
        self._write({"op": "put", "key": _key_json(key), "source": _source_json(source)})
        while self.count > self.max_sources:
            self._evict_oldest()
        return len(self._order.get(key, ()))

    def peek(self, key: Key) -> list[SegmentSource]:
        """The key's sources, oldest first, as they are (no check, no change)."""
        return list(self._order.get(key, ()))

    def find(self, key: Key, live: Callable[[SegmentSource], bool | None], limit: int = 0) -> list[SegmentSource]:
        """The key's live sources, newest first (at most ``limit``; 0: all); dead ones
        (``live`` False) are dropped for good, unchecked ones (None) kept but not returned."""
        sources = self._order.get(key)
        if not sources:
            return []
        verdicts = [live(s) for s in sources]
        alive = [s for s, v in zip(sources, verdicts, strict=True) if v]
        kept = [s for s, v in zip(sources, verdicts, strict=True) if v is not False]
        if len(kept) != len(sources):
            self._set(key, kept)
        if alive:
            self._order.move_to_end(key)
        alive = alive[::-1]
        return alive[:limit] if limit else alive

    def _set(self, key: Key, sources: list[SegmentSource]) -> None:
        self.count += len(sources) - len(self._order.get(key, ()))
        if sources:
            self._order[key] = sources
        else:
            self._order.pop(key, None)
        self._write({"op": "set", "key": _key_json(key), "sources": [_source_json(s) for s in sources]})

    def _evict_oldest(self) -> None:
        key, sources = next(iter(self._order.items()))
        self._set(key, sources[1:])     # its oldest source first

    # ------------------------------------------------------------ journal

    def _write(self, record: dict) -> None:
        """Queue a change for the journal (written by :meth:`write`, outside the lock)."""
        if self._pending is not None:
            self._pending.append(json.dumps(record, separators=(",", ":")))

    def take(self) -> tuple[list[str], list[str] | None]:
        """Under the store lock: the queued lines, and, when the file is mostly superseded
        records, a snapshot of every live source to rewrite it with instead."""
        if self._pending is None:
            return [], None
        lines, self._pending = self._pending, []
        if self._journal is None or self._lines + len(lines) <= 4 * self.count + 1024:
            return lines, None
        return [], self._snapshot()

    def write(self, lines: list[str], snapshot: list[str] | None) -> None:
        """Without the store lock (the caller serializes writers): append, or rewrite."""
        if self._journal is None:
            return
        try:
            if snapshot is not None:
                self._rewrite(snapshot)
            elif lines:
                with self._journal.open("a") as fh:
                    fh.write("\n".join(lines) + "\n")
                self._lines += len(lines)
        except OSError as exc:   # the index still serves; sources are lost at the next restart only
            log.warning("segment journal write failed: %s", exc)

    def _replay(self, path: Path) -> None:
        """Rebuild the index from the journal (the same changes; nothing is queued while
        ``_pending`` is None), then rewrite it compacted."""
        if path.exists():
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                    key = _key_of(record["key"])
                    if record["op"] == "put":
                        self.put(key, _source_of(record["source"]))
                    else:
                        self._set(key, [_source_of(s) for s in record["sources"]])
                except (ValueError, KeyError, TypeError) as exc:
                    # A torn last line after a crash: what came before it stands.
                    log.warning("segment journal %s line %d skipped: %s", path, number, exc)
        self._rewrite(self._snapshot())

    def _snapshot(self) -> list[str]:
        return [json.dumps({"op": "put", "key": _key_json(key), "source": _source_json(source)},
                           separators=(",", ":"))
                for key, sources in self._order.items() for source in sources]

    def _rewrite(self, lines: list[str]) -> None:
        """The journal as ``lines`` (one put per live source, oldest first; tmp + rename)."""
        assert self._journal is not None
        tmp = self._journal.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(self._journal)
        self._lines = len(lines)


def _key_json(key: Key) -> list:
    return [key[0], key[1], key[2].hex()]


def _key_of(value: Sequence) -> Key:
    return (str(value[0]), str(value[1]), bytes.fromhex(value[2]))


def _source_json(s: SegmentSource) -> dict:
    return {"producer": s.producer, "chunks": [h.hex() for h in s.chunk_hashes], "offset": s.offset,
            "length": s.length, "prefix": s.prefix_tokens.hex(), "normalized": s.normalized}


def _source_of(d: dict) -> SegmentSource:
    return SegmentSource(str(d["producer"]), tuple(bytes.fromhex(h) for h in d["chunks"]), int(d["offset"]),
                         int(d["length"]), bytes.fromhex(d["prefix"]), bool(d.get("normalized", False)))
