"""The cluster's shared state in Redis: membership, the global chunk index, models, and
where entries are placed. Shared by nodes (which write it) and the SDK (which may read
it straight from Redis); docs/cluster.md describes the schema in prose.

Keys, under a namespace ``NS`` (default ``cachesvc``):

- ``NS:nodes`` — hash, node id → JSON :class:`Member` (endpoints, incarnation, and the
  Redis-clock millisecond its heartbeat expires at). One key, so the member list is one
  read (and one hash slot in Redis Cluster). A member whose ``expires_ms`` has passed is
  dead to every reader, whether or not anyone has removed it yet.
- ``NS:ix:`` + 8 bytes of blake2b(tenant, family) + the raw 32-byte chunk hash — hash,
  one per chunk; field
  ``PRODUCER \\x1f NODE \\x1f ENTRYHEX`` → :class:`IndexRecord` (position, layout, tier,
  the publishing node's incarnation). A node writes a field only after the entry
  committed and deletes it when the entry leaves its index, so no reader anywhere sees a
  half-written entry. Partial chunks are also listed under ``NS:tl:`` + the same 8 bytes +
  the parent hash they were put with (value: the record and the chunk's own hash), so a
  lookup offers them as a node's own lookup does. A field counts only while its node is live *in the incarnation it
  was written in*: when a node loses track of what Redis holds for it (Redis restarted,
  a publish failed) it takes a new incarnation and republishes everything it holds, and
  every older field of it stops counting at once, wherever it lies.
- ``NS:held:NODE`` — set of the (index key, field) places NODE wrote: what it cleans at its
  next resync (fields of entries it lost track of) and what the others delete once it
  has been gone for ten heartbeat TTLs.
- ``NS:profiles`` — hash, ``TENANT \x1f PRODUCER \x1f CONSUMER`` → JSON (both digests and
  the document): reuse profiles are cluster-wide too (the newest put anywhere wins).
- ``NS:models`` — hash, ``TENANT \x1f MODEL`` → JSON (weights digest and family): models
  are per tenant and cluster-wide, nodes adopt what others registered, and a record
  counts only while its digest is the model's current one in its tenant (a node that was
  away when the model was replaced comes back with entries of the old weights: they
  never hit). A field without a tenant (written before models had tenants) is the
  default tenant's.

Placement is rendezvous hashing of the chunk hash over live nodes: every producer of a
chunk lands on the same nodes, so a cross-model consumer's hits sit beside its own.

Redis is reached through redis-py (imported lazily: a lone node needs no Redis).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cachesvc.wire.keys import DEFAULT_TENANT, ENTRY_ID_BYTES, EntryId, Tier
from cachesvc.wire.layout import Layout

DEFAULT_NAMESPACE = "cachesvc"
SEP = "\x1f"                 # field separator inside index fields: never in a model id or node id
LOOKUP_BATCHES = (32, 256)   # Redis Cluster: first pipelined reads of a lookup; then the rest in one
MEMO_ROWS = 1 << 16          # judged index rows a reader remembers per membership state

# Every chunk's fields, in order, up to the first chunk nobody holds: a lookup's reads in
# one round trip, stopping where the run must end anyway.
_CHAIN_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  local row = redis.call('HGETALL', key)
  if #row == 0 then break end
  out[i] = row
end
return out
"""


@dataclass(frozen=True, slots=True)
class Member:
    """A node as the cluster sees it. ``transports``: data-plane endpoints by name,
    values as the node's FetchDescriptor has them (bytes, stored hex)."""

    node_id: str
    grpc_address: str
    host_id: str
    incarnation: int
    expires_ms: int
    transports: dict[str, bytes] = field(default_factory=dict)

    def to_json(self) -> str:
        doc = asdict(self)
        doc["transports"] = {k: v.hex() for k, v in self.transports.items()}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> "Member":
        doc = json.loads(text)
        doc["transports"] = {k: bytes.fromhex(v) for k, v in doc.get("transports", {}).items()}
        return cls(**doc)


@dataclass(frozen=True, slots=True)
class IndexRecord:
    """One node's copy of one entry, as the global index lists it."""

    producer: str
    node_id: str
    entry_id: EntryId
    position_offset: int
    layout: Layout
    tier: Tier
    weights_digest: str
    incarnation: int
    chunk_hash: bytes = b""        # tail records only: the partial chunk's own hash

    @property
    def field(self) -> str:
        return index_field(self.producer, self.node_id, self.entry_id)

    def value(self) -> str:
        lay = self.layout
        parts = [str(self.position_offset), str(lay.num_tokens), _mask(lay.k_layers), _mask(lay.v_layers),
                 _mask(lay.e_layers), str(int(self.tier)), self.weights_digest, str(self.incarnation)]
        if self.chunk_hash:
            parts.append(self.chunk_hash.hex())
        return " ".join(parts)

    @classmethod
    def parse(cls, field_: str | bytes, value: str | bytes) -> "IndexRecord":
        """ValueError on anything malformed (a reader skips such a field)."""
        if isinstance(field_, bytes):
            field_ = field_.decode()
        if isinstance(value, bytes):
            value = value.decode()
        producer, node_id, entry_hex = field_.split(SEP)
        entry_id = bytes.fromhex(entry_hex)
        if len(entry_id) != ENTRY_ID_BYTES:
            raise ValueError(f"entry id of {len(entry_id)} bytes")
        pos, tokens, k, v, e, tier, digest, inc, *chunk = value.split(" ")
        if len(chunk) > 1:
            raise ValueError("trailing tokens in an index record")
        return cls(producer, node_id, EntryId(entry_id), int(pos),
                   Layout(int(tokens), _layers(k), _layers(v), _layers(e)), Tier(int(tier)), digest, int(inc),
                   bytes.fromhex(chunk[0]) if chunk else b"")


def model_field(tenant: str, model_id: str) -> str:
    """``NS:models`` field of a tenant's model."""
    return f"{tenant}{SEP}{model_id}"


def profile_field(tenant: str, producer: str, consumer: str) -> str:
    """``NS:profiles`` field of a tenant's pair."""
    return f"{tenant}{SEP}{producer}{SEP}{consumer}"


def split_field(field_: bytes | str, parts: int) -> tuple[str, ...]:
    """A models (``parts`` 2) or profiles (3) field as (tenant, ids…); ValueError if
    malformed. A field one part short predates tenants: the default tenant's."""
    items = (field_.decode() if isinstance(field_, bytes) else field_).split(SEP)
    if len(items) == parts - 1:
        items.insert(0, DEFAULT_TENANT)
    if len(items) != parts or not all(items[1:]):
        raise ValueError(f"malformed field {field_!r}")
    return tuple(items)


def index_field(producer: str, node_id: str, entry_id: bytes) -> str:
    return f"{producer}{SEP}{node_id}{SEP}{entry_id.hex()}"


HELD_SEP = b"\x1e"


def held_member(key: bytes, field: str) -> bytes:
    """One place a node wrote (an index key and its field), as its ``held`` set lists it."""
    return key + HELD_SEP + field.encode()


def split_held_member(member: bytes) -> tuple[bytes, bytes]:
    key, _, field = member.rpartition(HELD_SEP)
    return key, field


_PARSED: dict[tuple[bytes | str, bytes | str], IndexRecord] = {}
_PARSED_MAX = 1 << 18


def parsed(field_: bytes | str, value: bytes | str) -> IndexRecord:
    """:meth:`IndexRecord.parse`, remembered: the same chunks are looked up again and
    again (a hot context behind every request), and parsing dominates a lookup's client
    side (ValueError as parse)."""
    key = (field_, value)
    rec = _PARSED.get(key)
    if rec is None:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        rec = _PARSED[key] = IndexRecord.parse(field_, value)
    return rec


def _mask(layers: Iterable[int]) -> str:
    bits = 0
    for layer in layers:
        bits |= 1 << layer
    return format(bits, "x")


@functools.lru_cache(maxsize=4096)
def _layers(mask: str) -> tuple[int, ...]:
    bits = int(mask, 16)
    return tuple(i for i in range(bits.bit_length()) if bits >> i & 1)


@dataclass(frozen=True, slots=True)
class ClusterHit:
    """One producer's longest run of leading chunks across the cluster: per chunk i, the
    entry (the same id on every replica) and ``owners[i]``, the live nodes holding it."""

    producer: str
    entry_ids: list[EntryId]
    position_offsets: list[int]
    layouts: list[Layout]
    tiers: list[Tier]
    owners: list[tuple[str, ...]]
    tails: list[tuple[IndexRecord, tuple[str, ...]]] = field(default_factory=list)   # offers, longest first


class Keys:
    """Key names under one namespace."""

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        if not namespace or ":" in namespace:
            raise ValueError(f"cluster namespace {namespace!r} must be non-empty and without ':'")
        self.ns = namespace
        self.nodes = f"{namespace}:nodes"
        self.models = f"{namespace}:models"
        self.profiles = f"{namespace}:profiles"
        self.models_version = f"{namespace}:models:version"   # bumped on every change of models or profiles
        self.settings = f"{namespace}:settings"     # what every member must share (its chunk size)
        self._chunk_prefix = f"{namespace}:ix:".encode()
        self._tail_prefix = f"{namespace}:tl:".encode()
        self._spaces: dict[tuple[str, str], bytes] = {}

    def chunk(self, tenant: str, family_id: str, chunk_hash: bytes) -> bytes:
        """The chunk's index key, binary: the prefix, 8 bytes naming (tenant, family),
        the raw chunk hash (a 1024-chunk lookup sends 54 KB of keys, not 120 KB of hex).
        The hash already commits to tenant and family; naming them in the key too keeps
        one tenant from even seeing that another's chunks exist, as a node's own index
        does (tests/test_tenants.py)."""
        return self._space(tenant, family_id) + bytes(chunk_hash)

    def chunks(self, tenant: str, family_id: str, hashes: Sequence[bytes]) -> list[bytes]:
        """:meth:`chunk` of each hash (a lookup's 1024 keys in one pass)."""
        space = self._space(tenant, family_id)
        return [space + bytes(h) for h in hashes]

    def _space(self, tenant: str, family_id: str) -> bytes:
        space = self._spaces.get((tenant, family_id))
        if space is None:
            space = self._spaces[(tenant, family_id)] = self._chunk_prefix + hashlib.blake2b(
                f"{tenant}\x00{family_id}".encode(), digest_size=8).digest()
        return space

    def held(self, node_id: str) -> str:
        """The set of (index key, field) places ``node_id`` has written."""
        return f"{self.ns}:held:{node_id}"

    def tails(self, tenant: str, family_id: str, parent: bytes) -> bytes:
        """The partial chunks put with ``parent`` (as a node's lookup offers them)."""
        return self.chunk(tenant, family_id, parent).replace(self._chunk_prefix, self._tail_prefix, 1)


def connect(url: str) -> Any:
    """A redis-py client for ``url``: ``redis://host:port/db`` for a standalone Redis,
    with ``?cluster=true`` for Redis Cluster (keys then spread over its shards)."""
    import redis
    from urllib.parse import parse_qs, urlsplit
    query = parse_qs(urlsplit(url).query)
    clustered = query.pop("cluster", ["false"])[0].lower() in ("1", "true", "yes")
    plain = url.split("?")[0] + ("?" + "&".join(f"{k}={v[0]}" for k, v in query.items()) if query else "")
    options = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0, "health_check_interval": 10}
    if clustered:
        from redis.cluster import RedisCluster
        return RedisCluster.from_url(plain, **options)
    return redis.Redis.from_url(plain, **options)


def redis_now_ms(client: Any) -> int:
    """Redis's clock in ms: every heartbeat is stamped and judged by the same clock, so
    the hosts' clocks need not agree."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


class ClusterIndex:
    """Readers of the shared state (membership and the global index). Thread-safe as
    redis-py's client is; membership is cached for ``members_ttl_s``."""

    def __init__(self, client: Any, namespace: str = DEFAULT_NAMESPACE, members_ttl_s: float = 0.25) -> None:
        self.client = client
        self.keys = Keys(namespace)
        self._members_ttl_s = members_ttl_s
        self._members: tuple[float, dict[str, Member], dict[str, str]] = (0.0, {}, {})
        self._clustered = type(client).__name__ == "RedisCluster"
        self._script = None if self._clustered else client.register_script(_CHAIN_SCRIPT)
        self._memo_state: tuple = ()
        self._memo_rows: dict = {}
        # Members whose heartbeat had expired at the last read (raw hash field -> ms since
        # it expired, -1 for an unparsable one): what a node's janitor forgets.
        self.gone: dict[bytes | str, int] = {}

    def members(self, fresh: bool = False) -> dict[str, Member]:
        """Live members by node id (expired heartbeats left out)."""
        return self._state(fresh)[0]

    def _state(self, fresh: bool) -> tuple[dict[str, Member], dict[tuple[str, str], str]]:
        """Live members, and every tenant's models' current digests by (tenant, model id)."""
        at, cached, digests = self._members
        if not fresh and time.monotonic() - at < self._members_ttl_s:
            return cached, digests
        pipe = self.client.pipeline(transaction=False)
        if self._clustered:       # Redis Cluster pipelines keyed commands only
            now = redis_now_ms(self.client)
        else:
            pipe.time()
        pipe.hgetall(self.keys.nodes)
        pipe.hgetall(self.keys.models)
        answers = pipe.execute()
        if not self._clustered:
            seconds, micros = answers.pop(0)
            now = int(seconds) * 1000 + int(micros) // 1000
        rows, models = answers
        live, self.gone = {}, {}
        for node_id, raw in rows.items():
            try:
                member = Member.from_json(raw)
            except (ValueError, TypeError, KeyError):
                self.gone[node_id] = -1            # unparsable: as good as gone forever
                continue
            if member.expires_ms > now:
                live[member.node_id] = member
            else:
                self.gone[node_id] = now - member.expires_ms
        digests = {}
        for field_, raw in models.items():
            try:
                digests[split_field(field_, 2)] = json.loads(raw)["weights_digest"]
            except (ValueError, KeyError, TypeError):
                continue
        self._members = (time.monotonic(), live, digests)
        return live, digests

    def lookup(self, tenant: str, family_id: str, hashes: Sequence[bytes], producers: Sequence[str] = (),
               root: bytes | None = None) -> list[ClusterHit]:
        """Per producer, its longest run of leading ``hashes`` held by live nodes (in the
        incarnation they wrote it in, of the producer's current weights), longest first.
        With the chain's ``root``, also the partial chunks offered after each run (after
        the root for producers without one): ``ClusterHit.tails``."""
        members, every = self._state(False)
        digests = _of_tenant(every, tenant)
        wanted = frozenset(producers)
        rows = self._rows(tenant, family_id, hashes)
        if any(_unknown_producer(row, digests) for row in rows[:1]):
            members, every = self._state(True)     # a model newer than the cached registry
            digests = _of_tenant(every, tenant)
        runs: dict[str, ClusterHit] = {}
        active: set[str] | None = None          # producers whose run reaches the current chunk
        memo = self._memo(members, every)
        for row in rows:
            key = (tenant, row, wanted)
            found = memo.get(key)
            if found is None:
                found = memo[key] = _live_records(row, members, digests, wanted)
            if active is None:
                active = set(found)
                for producer in active:
                    runs[producer] = ClusterHit(producer, [], [], [], [], [])
            else:
                active &= found.keys()
            if not active:
                break
            for producer in active:
                entry, owners = found[producer]
                hit = runs[producer]
                hit.entry_ids.append(entry.entry_id)
                hit.position_offsets.append(entry.position_offset)
                hit.layouts.append(entry.layout)
                hit.tiers.append(entry.tier)
                hit.owners.append(owners)
        hits = [h for h in runs.values() if h.entry_ids]
        if root is not None:
            hits = self._offer(tenant, family_id, hashes, hits, root, members, digests, wanted)
        return sorted(hits, key=lambda h: (-len(h.entry_ids), h.producer))

    def _offer(self, tenant: str, family_id: str, hashes: Sequence[bytes], hits: list[ClusterHit], root: bytes,
               members: dict[str, Member], digests: dict[str, str], wanted: frozenset[str]) -> list[ClusterHit]:
        """``hits`` with their tails, plus hits of only tails after the root (producers
        with no run: a context shorter than a chunk)."""
        by_parent: dict[bytes, set[str] | None] = {}
        for hit in hits:
            if len(hit.entry_ids) < len(hashes):
                by_parent.setdefault(bytes(hashes[len(hit.entry_ids) - 1]), set()).add(hit.producer)
        by_parent.setdefault(bytes(root), None)          # None: any producer without a run
        pipe = self.client.pipeline(transaction=False)
        for parent in by_parent:
            pipe.hgetall(self.keys.tails(tenant, family_id, parent))
        with_run = {h.producer: h for h in hits}
        for producers, row in zip(by_parent.values(), pipe.execute(), strict=True):
            flat = tuple(x for pair in row.items() for x in pair)
            found = {key: recs for key, recs in _counting(flat, members, digests, wanted).items()
                     if recs[0].chunk_hash and ((producers is None and key[0] not in with_run) or
                                                (producers and key[0] in producers))}
            for (producer, _), recs in sorted(found.items(), key=lambda kv: -kv[1][0].layout.num_tokens):
                hit = with_run.get(producer)
                if hit is None:
                    hit = with_run[producer] = ClusterHit(producer, [], [], [], [], [])
                    hits.append(hit)
                hit.tails.append((recs[0], tuple(sorted(r.node_id for r in recs))))
        return hits

    def _rows(self, tenant: str, family_id: str, hashes: Sequence[bytes]) -> list[tuple]:
        """Each chunk's index fields and values, flat (field, value, field, value, ...),
        up to the first chunk nobody has. One script call on a standalone Redis (it
        stops at that chunk itself); on Redis Cluster, whose keys of one call must share
        a slot, pipelined reads in growing batches."""
        keys = self.keys.chunks(tenant, family_id, hashes)
        if not keys:
            return []
        if not self._clustered:
            return [tuple(row) for row in self._script(keys=keys)]
        out: list[tuple] = []
        done, sizes = 0, iter(LOOKUP_BATCHES)
        while done < len(keys):
            batch = keys[done:done + next(sizes, len(keys))]
            pipe = self.client.pipeline(transaction=False)
            for key in batch:
                pipe.hgetall(key)
            for row in pipe.execute():
                if not row:
                    return out
                out.append(tuple(x for pair in row.items() for x in pair))
            done += len(batch)
        return out

    def _memo(self, members: dict[str, Member], digests: dict[tuple[str, str], str]) -> dict:
        """Rows already judged under this membership and registry: a hot context's chunks
        are looked up again and again, and judging them dominates a lookup."""
        state = (tuple(sorted((m.node_id, m.incarnation) for m in members.values())), tuple(sorted(digests.items())))
        if state != self._memo_state or len(self._memo_rows) > MEMO_ROWS:
            self._memo_state, self._memo_rows = state, {}
        return self._memo_rows

    def models(self) -> dict[tuple[str, str], dict]:
        """Every model registered in the cluster: (tenant, id) → {weights_digest, family
        (hex of the FamilySpec proto)}."""
        out = {}
        for key, raw in self.client.hgetall(self.keys.models).items():
            try:
                out[split_field(key, 2)] = json.loads(raw)
            except ValueError:
                continue
        return out


def _of_tenant(digests: dict[tuple[str, str], str], tenant: str) -> dict[str, str]:
    """The models of one tenant: a lookup judges records against its own tenant's only."""
    return {model_id: digest for (owner, model_id), digest in digests.items() if owner == tenant}


def _unknown_producer(row: tuple, digests: dict[str, str]) -> bool:
    for field_, value in zip(row[::2], row[1::2], strict=True):
        try:
            if parsed(field_, value).producer not in digests:
                return True
        except (ValueError, TypeError):
            continue
    return False


def _counting(row: tuple, members: dict[str, Member], digests: dict[str, str], wanted: frozenset[str]
              ) -> dict[tuple[str, bytes], list[IndexRecord]]:
    """The records of a flat row (fields and values) that count, by (producer, entry):
    their node live in the incarnation they were written in, of the producer's current
    weights, of a wanted producer (all when none is named). Malformed fields are skipped."""
    out: dict[tuple[str, bytes], list[IndexRecord]] = {}
    for field_, value in zip(row[::2], row[1::2], strict=True):
        try:
            rec = parsed(field_, value)
        except (ValueError, TypeError):
            continue
        member = members.get(rec.node_id)
        if member is None or member.incarnation != rec.incarnation or (wanted and rec.producer not in wanted) \
                or digests.get(rec.producer) != rec.weights_digest:
            continue
        out.setdefault((rec.producer, rec.entry_id), []).append(rec)
    return out


def _live_records(row: tuple, members: dict[str, Member], digests: dict[str, str], wanted: frozenset[str]
                  ) -> dict[str, tuple[IndexRecord, tuple[str, ...]]]:
    """Per producer of one chunk (a flat row of fields and values): the entry with the
    most live owners, and those owners (a record of other weights than the producer's
    current ones does not count)."""
    best: dict[str, tuple[IndexRecord, tuple[str, ...]]] = {}
    for (producer, _), recs in _counting(row, members, digests, wanted).items():
        if producer not in best or len(recs) > len(best[producer][1]):
            best[producer] = (recs[0], tuple(sorted(r.node_id for r in recs)))
    return best


def rendezvous(key: bytes, nodes: Iterable[str], replicas: int) -> list[str]:
    """The ``replicas`` nodes with the highest weight for ``key`` (highest random weight
    hashing): adding or removing a node moves only the keys it gains or held."""
    def weight(node: str) -> bytes:
        return hashlib.blake2b(key + b"\x00" + node.encode(), digest_size=8).digest()
    return sorted(nodes, key=weight, reverse=True)[:replicas]


__all__ = ["DEFAULT_NAMESPACE", "Member", "IndexRecord", "ClusterHit", "ClusterIndex", "Keys", "connect",
           "redis_now_ms", "rendezvous", "index_field"]
