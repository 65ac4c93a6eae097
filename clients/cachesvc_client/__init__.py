"""cachesvc client SDK: register models, put entries, look up prompts, fetch layer ranges.

    from cachesvc_client import CacheClient, FamilySpec, DType, Kind, EntryData
"""

from cachesvc.wire.keys import (NO_FAMILY, NO_MODEL, ChunkHash, DType, EntryId, FamilyId, FamilySpec, Kind, ModelId,
                                Tier, canonical_json, chunk_hashes)
from cachesvc_client.aio import AsyncCacheClient
from cachesvc_client.client import CacheClient
from cachesvc_client.codec import (EntryData, Hit, HitEntry, Layout, Location, LookupResult, Missing,
                                   PutResult, Registered, Slabs, StoredEntry, StoredProfile)
from cachesvc_client.errors import (CacheServiceError, DeadlineExceededError,
                                    FailedPreconditionError, InvalidArgumentError, NotFoundError,
                                    PermissionDeniedError, ResourceExhaustedError, UnauthenticatedError,
                                    UnavailableError)
from cachesvc_client.local import ArenaReader
from cachesvc.wire.segments import AnchorDelta, AnchorInfo, SegmentSource
from cachesvc_client.options import ClientOptions, RetryPolicy

__all__ = [
    "AnchorDelta", "AnchorInfo", "SegmentSource",
    "ArenaReader", "AsyncCacheClient", "CacheClient", "ClientOptions", "RetryPolicy", "ChunkHash", "DType", "EntryId", "FamilyId",
    "FamilySpec", "Kind", "ModelId", "NO_FAMILY", "NO_MODEL", "Tier",
    "EntryData", "Hit", "HitEntry", "Layout", "Location", "LookupResult", "Missing", "PutResult", "Registered",
    "Slabs", "StoredEntry", "StoredProfile", "canonical_json", "chunk_hashes", "CacheServiceError", "DeadlineExceededError",
    "FailedPreconditionError", "InvalidArgumentError", "NotFoundError", "PermissionDeniedError",
    "ResourceExhaustedError", "UnauthenticatedError", "UnavailableError",
]
