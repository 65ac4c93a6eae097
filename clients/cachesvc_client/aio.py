"""asyncio client: the same calls as :class:`~cachesvc_client.client.CacheClient`, awaited.
Request building and result assembly are shared (cachesvc_client.codec); socket data
plane transfers run in a worker thread (``asyncio.to_thread``) so the loop stays free."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from grpc import aio

from cachesvc.wire.keys import NO_FAMILY, NO_MODEL, ChunkHash, FamilyId, FamilySpec, Kind, ModelId, chunk_hashes
from cachesvc.v1 import cachesvc_pb2 as pb
from cachesvc.v1 import cachesvc_pb2_grpc as pb_grpc
from cachesvc.wire.convert import family_from_proto, family_to_proto
from cachesvc_client.client import stats_to_dict
from cachesvc_client.codec import (EntryData, Hit, HitEntry, LookupResult, PutResult, Registered,
                                   SlabAssembler, Slabs, StoredEntry, bulk_methods, entries_from_proto,
                                   entry_columns, lookup_from_proto, plan_put, write_chunks)
from cachesvc_client.errors import CacheServiceError, NotFoundError, UnavailableError, from_rpc_error
from cachesvc_client.options import ClientOptions, batches
from cachesvc_client.prompt import verified
from cachesvc_client.transports import ShmTransport, Transport, choose_transport

__all__ = ["AsyncCacheClient"]


def _token_interceptors(metadata: tuple[tuple[str, str], ...]) -> list:
    """aio interceptors adding the API token to every call (one per call shape)."""
    def details(d):
        return aio.ClientCallDetails(d.method, d.timeout, aio.Metadata(*(tuple(d.metadata or ()) + metadata)),
                                     d.credentials, d.wait_for_ready)

    class UnaryUnary(aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, d, request):
            return await continuation(details(d), request)

    class UnaryStream(aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, d, request):
            return await continuation(details(d), request)

    class StreamUnary(aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, d, requests):
            return await continuation(details(d), requests)

    class StreamStream(aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, d, requests):
            return await continuation(details(d), requests)
    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]


class AsyncCacheClient:
    """Create inside a running event loop; ``async with`` closes the channel."""

    def __init__(self, target: str, options: ClientOptions | None = None) -> None:
        self.target = target
        self.options = options or ClientOptions()
        credentials = self.options.credentials()
        interceptors = _token_interceptors(self.options.metadata()) if self.options.token else None
        self._channel = aio.insecure_channel(target, options=self.options.channel_options(),
                                             interceptors=interceptors) if credentials is None \
            else aio.secure_channel(target, credentials, options=self.options.channel_options(),
                                    interceptors=interceptors)
        self._stub = pb_grpc.CacheServiceStub(self._channel)
        self._get_slabs, self._write_slabs = bulk_methods(self._channel)
        self._families: dict[str, FamilySpec] = {}
        self._chunk_size: int | None = None
        self._transports: dict[str, Transport | None] = {}

    async def __aenter__(self) -> "AsyncCacheClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for transport in self._transports.values():
            if transport is not None:
                transport.close()
        await self._channel.close()

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout_s)
        except asyncio.TimeoutError:
            raise CacheServiceError(f"{self.target} not reachable within {timeout_s} s") from None

    async def _call(self, method: Any, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return await method(request, timeout=timeout_s or self.options.timeout_s)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def register_model(self, model_id: ModelId, weights_digest: str, family: FamilySpec,
                             replace: bool = False, tenant: str = "") -> Registered:
        """See CacheClient.register_model."""
        model = pb.ModelSpec(model_id=model_id, weights_digest=weights_digest,
                             family=family_to_proto(family))
        resp = await self._call(self._stub.RegisterModel, pb.RegisterModelRequest(
            model=model, replace=replace, tenant=tenant or self.options.tenant))
        self._families[resp.family_id] = family
        self._chunk_size = resp.chunk_size
        return Registered(FamilyId(resp.family_id), resp.chunk_size, resp.created)

    async def family(self, family_id: FamilyId, tenant: str = "") -> FamilySpec:
        """As :meth:`CacheClient.family`."""
        if family_id not in self._families:
            req = pb.ListModelsRequest(tenant=tenant or self.options.tenant)
            resp = await self._call(self._stub.ListModels, req)
            for m in resp.models:
                self._families[m.family_id] = family_from_proto(m.model.family)
        if family_id not in self._families:
            raise NotFoundError(f"family {family_id} has no registered model on {self.target}")
        return self._families[family_id]

    async def hash_tokens(self, tokens: Sequence[int], family_id: FamilyId, *, tenant: str = "",
                          extra_keys: Sequence[str | bytes] = (),
                          include_partial: bool = False) -> list[ChunkHash]:
        if self._chunk_size is None:
            self._chunk_size = (await self.stats())["chunk_size"]
        return chunk_hashes(tokens, FamilyId(family_id), tenant=tenant or self.options.tenant,
                            chunk_size=self._chunk_size, extra_keys=extra_keys,
                            include_partial=include_partial)

    async def _transport(self, name: str | None) -> Transport | None:
        """As CacheClient._transport; socket transports run in a worker thread."""
        name = name or self.options.transport
        if name == "grpc":
            return None
        if name not in self._transports:
            fetch = (await self._call(self._stub.Stats, pb.StatsRequest())).fetch
            self._transports[name] = choose_transport(name, fetch, self.target, self.options)
        return self._transports[name]

    async def put(self, family_id: FamilyId, producer: ModelId, entries: Sequence[EntryData],
                  tenant: str = "", transport: str | None = None) -> PutResult:
        """As CacheClient.put: on the node's host, Reserve and Commit go over its Unix socket
        with the bytes (in a worker thread)."""
        family = await self.family(family_id, tenant)
        chosen = await self._transport(transport)
        local = chosen if isinstance(chosen, ShmTransport) else None
        committed = present = sent = 0
        for batch in batches(entries, self.options.max_put_bytes):
            plan = plan_put(tenant or self.options.tenant, family_id, family, producer, batch)
            res, committer = await self._reserve(plan.request, local)
            try:
                todo = [t for t in res.targets if not t.already_present]
                if todo and chosen is not None:
                    await asyncio.to_thread(chosen.write, res.reservation_id, plan, todo)
                elif todo:
                    await self._call(self._write_slabs,
                                     _aiter(write_chunks(res.reservation_id, plan, todo)),
                                     self.options.data_timeout_s)
                commit = pb.CommitRequest(reservation_id=res.reservation_id)   # no fallback: see CacheClient.put
                resp = await (asyncio.to_thread(committer.commit, commit) if committer is not None
                              else self._call(self._stub.Commit, commit))
                committed += resp.entries_committed
            except BaseException:
                try:
                    await self._stub.Abort(pb.AbortRequest(reservation_id=res.reservation_id),
                                           timeout=self.options.timeout_s)
                except grpc.RpcError:
                    pass   # already closed or server gone; expiry reclaims it
                raise
            present += sum(t.already_present for t in res.targets)
            sent += sum(t.size_bytes for t in todo)
        return PutResult(committed, present, sent)

    async def _reserve(self, request: pb.ReserveRequest,
                       local: ShmTransport | None) -> tuple[pb.ReserveResponse, ShmTransport | None]:
        """As CacheClient._reserve."""
        res, by_socket = await self._socket_or_grpc(local, local and local.reserve, self._stub.Reserve, request)
        return res, local if by_socket else None

    async def _socket_or_grpc(self, local: ShmTransport | None, ask, rpc, request) -> tuple:
        """As CacheClient._socket_or_grpc, the socket's call in a worker thread."""
        if local is not None:
            try:
                return await asyncio.to_thread(ask, request), True
            except UnavailableError:
                pass
        return await self._call(rpc, request), False

    async def lookup(self, family_id: FamilyId, hashes: Sequence[bytes], *, consumer: ModelId = NO_MODEL,
                     producers: Sequence[str] = (), lease_ttl_s: int = 0,
                     tenant: str = "", tail_hashes: Sequence[bytes] = (), offer_tails: bool = False,
                     locate: bool = False) -> LookupResult:
        req = pb.LookupRequest(tenant=tenant or self.options.tenant, family_id=family_id,
                               chunk_hashes=hashes, consumer=consumer, producers=producers,
                               lease_ttl_s=lease_ttl_s, tail_hashes=tail_hashes, offer_tails=offer_tails,
                               locate=locate)
        local = await self._local()
        return lookup_from_proto((await self._socket_or_grpc(local, local and local.lookup, self._stub.Lookup, req))[0])

    async def _local(self) -> ShmTransport | None:
        """As CacheClient._local: where this client is on the node's host, lookups and
        unpins go over the node's Unix socket (in a worker thread, as transfers do)."""
        local = await self._transport(self.options.transport)
        return local if isinstance(local, ShmTransport) else None

    async def lookup_prompt(self, family_id: FamilyId, tokens: Sequence[int], *, consumer: ModelId = NO_MODEL,
                            producers: Sequence[str] = (), lease_ttl_s: int = 0, tenant: str = "",
                            extra_keys: Sequence[str | bytes] = (), locate: bool = False,
                            hashes: Sequence[bytes] | None = None) -> LookupResult:
        """As CacheClient.lookup_prompt."""
        tenant = tenant or self.options.tenant
        if hashes is None:
            hashes = await self.hash_tokens(tokens, family_id, tenant=tenant, extra_keys=extra_keys,
                                            include_partial=True)
        result = await self.lookup(family_id, hashes, consumer=consumer, producers=producers,
                                   lease_ttl_s=lease_ttl_s, tenant=tenant, offer_tails=True, locate=locate)
        return verified(tokens, hashes, result, self._chunk_size, tenant, family_id, extra_keys)

    async def get(self, family_id: FamilyId, entries: Hit | Sequence[HitEntry],
                  kinds: Sequence[Kind] = (Kind.K, Kind.V), layers: tuple[int, int] | None = None,
                  *, out: Mapping[Kind, Any] | None = None, as_torch: bool = False,
                  tenant: str = "", transport: str | None = None) -> Slabs:
        family = await self.family(family_id, tenant)
        chosen = await self._transport(transport)
        start, end = layers or (0, family.num_layers)
        ids, tokens = entry_columns(entries)
        asm = SlabAssembler(family, tokens, kinds, start, end, out, as_torch)
        req = pb.GetSlabsRequest(tenant=tenant or self.options.tenant, family_id=family_id,
                                 entry_ids=ids, kinds=[int(k) for k in kinds],
                                 layer_start=start, layer_end=end)
        if chosen is not None:
            await asyncio.to_thread(_drain, chosen.fetch(req, asm))
            return dataclasses.replace(asm.result(), transport=chosen.name)
        try:
            async for run in self._get_slabs(req, timeout=self.options.data_timeout_s):
                asm.feed(run)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return dataclasses.replace(asm.result(), transport="grpc")

    async def delete(self, family_id: FamilyId, *, entry_ids: Sequence[bytes] = (),
                     chunk_hashes: Sequence[bytes] = (), producer: str = "", tenant: str = "") -> int:
        req = pb.DeleteRequest(tenant=tenant or self.options.tenant, family_id=family_id,
                               entry_ids=entry_ids, chunk_hashes=chunk_hashes, producer=producer)
        return (await self._call(self._stub.Delete, req)).entries_deleted

    async def pin(self, family_id: FamilyId, entry_ids: Sequence[bytes], ttl_s: int,
                  tenant: str = "") -> str:
        req = pb.PinRequest(tenant=tenant or self.options.tenant, family_id=family_id,
                            entry_ids=entry_ids, ttl_s=ttl_s)
        return (await self._call(self._stub.Pin, req)).lease_id

    async def unpin(self, lease_id: str) -> None:
        local = await self._local()
        await self._socket_or_grpc(local, local and local.unpin, self._stub.Unpin, pb.UnpinRequest(lease_id=lease_id))

    async def list_models(self, tenant: str = "") -> list[dict]:
        resp = await self._call(self._stub.ListModels, pb.ListModelsRequest(tenant=tenant or self.options.tenant))
        return [{"model_id": m.model.model_id, "weights_digest": m.model.weights_digest,
                 "family_id": m.family_id} for m in resp.models]

    async def list_entries(self, *, family_id: FamilyId = NO_FAMILY, producer: ModelId = NO_MODEL, tenant: str = "",
                           limit: int = 100, page_token: str = "") -> tuple[list[StoredEntry], str]:
        req = pb.ListEntriesRequest(tenant=tenant, family_id=family_id, producer=producer,
                                    limit=limit, page_token=page_token)
        resp = await self._call(self._stub.ListEntries, req)
        return entries_from_proto(resp), resp.next_page_token

    async def stats(self) -> dict:
        return stats_to_dict(await self._call(self._stub.Stats, pb.StatsRequest()))


def _drain(frames) -> None:
    for _ in frames:
        pass


async def _aiter(items):
    for item in items:
        yield item
