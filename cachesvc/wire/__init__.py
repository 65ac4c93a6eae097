"""What the node and its clients both speak, and nothing only one side runs.

- ``keys``: identity types (``ChunkHash``, ``FamilyId``, ``ModelId``, ``EntryId``), kinds,
  dtypes, tiers, the family id and the chunk hash chain (docs/chunk-keys.md);
- ``layout``: which layers of each kind an entry holds;
- ``convert``: domain records ⇄ proto messages;
- ``framing``: copy-light encoding of the two bulk gRPC messages;
- ``protocol``: the data plane's frames and requests (socket, shm, UCX);
- ``ucxlib``: the UCX worker both ends drive;
- ``errors``: the typed domain errors.

The generated stubs stay in ``cachesvc.v1`` beside this package (protoc derives their
module path from ``protos/cachesvc/v1/cachesvc.proto``; moving them would rename the
.proto every other language sees). Nothing here imports ``cachesvc.node``, torch or the
SDK: tests/test_layout.py checks it.
"""
