"""Key derivation: committed vectors, plus an independent re-implementation from the
prose in docs/chunk-keys.md so the vectors themselves are checked."""

import hashlib
import json
import struct
from pathlib import Path

import pytest

from cachesvc.wire.keys import (DType, FamilySpec, canonical_json, chain_root, chunk_hashes, encode_extra_keys,
                                entry_id, family_id, tail_hashes)

VECTORS = json.loads((Path(__file__).parent / "vectors" / "keys.json").read_text())


def _tokens(spec):
    return list(range(*spec["range"])) if "range" in spec else spec["list"]


def _family(doc) -> FamilySpec:
    return FamilySpec(doc["architecture"], doc["num_layers"], doc["num_kv_heads"], doc["head_dim"],
                      doc["hidden_size"], doc["rope_theta"], doc["rope_scaling_json"],
                      doc["tokenizer_fingerprint"], DType.parse(doc["dtype"]))


def _reference_chain(tokens, fam_id, tenant, chunk_size, extras, include_partial):
    """Written from the spec text, not from cachesvc.wire.keys."""
    lp = lambda b: struct.pack("<I", len(b)) + b  # noqa: E731
    h = hashlib.sha256(b"cachesvc-chain-v1\x00" + lp(tenant.encode()) + lp(fam_id.encode()) +
                       struct.pack("<I", chunk_size)).digest()
    extra = b"".join(lp(e.encode()) for e in extras)
    out = []
    stop = len(tokens) if include_partial else len(tokens) // chunk_size * chunk_size
    for i in range(0, stop, chunk_size):
        chunk = tokens[i:i + chunk_size]
        h = hashlib.sha256(h + struct.pack("<I", len(chunk)) +
                           b"".join(struct.pack("<I", t) for t in chunk) + lp(extra)).digest()
        out.append(h.hex())
    return out


@pytest.mark.parametrize("doc", VECTORS["families"], ids=lambda d: d["architecture"])
def test_family_id_vectors(doc):
    assert family_id(_family(doc)) == doc["family_id"]


def test_family_id_reference():
    doc = VECTORS["families"][0]
    canon = canonical_json({
        "architecture": doc["architecture"], "dtype": doc["dtype"], "head_dim": doc["head_dim"],
        "hidden_size": doc["hidden_size"], "num_kv_heads": doc["num_kv_heads"],
        "num_layers": doc["num_layers"], "rope_scaling": doc["rope_scaling_json"],
        "rope_theta_f64le": struct.pack("<d", doc["rope_theta"]).hex(),
        "tokenizer": doc["tokenizer_fingerprint"]})
    assert hashlib.sha256(b"cachesvc-family-v1\x00" + canon.encode()).digest()[:16].hex() == doc["family_id"]


@pytest.mark.parametrize("case", VECTORS["chains"], ids=lambda c: f"{c['tenant']}-{c['chunk_size']}-{len(c['hashes'])}")
def test_chain_vectors(case):
    toks = _tokens(case["tokens"])
    got = chunk_hashes(toks, case["family_id"], tenant=case["tenant"], chunk_size=case["chunk_size"],
                       extra_keys=case["extra_keys"], include_partial=case["include_partial"])
    assert [h.hex() for h in got] == case["hashes"]
    assert chain_root(case["tenant"], case["family_id"], case["chunk_size"]).hex() == case["root"]
    assert case["hashes"] == _reference_chain(toks, case["family_id"], case["tenant"], case["chunk_size"],
                                              case["extra_keys"], case["include_partial"])


@pytest.mark.parametrize("case", VECTORS["tails"], ids=lambda c: f"tail-{len(c['hashes'])}")
def test_tail_vectors(case):
    toks, parent = _tokens(case["tokens"]), bytes.fromhex(case["parent"])
    got = tail_hashes(parent, toks, encode_extra_keys(case["extra_keys"]))
    assert [h.hex() for h in got] == case["hashes"]


def test_a_tail_candidate_is_the_chain_of_the_prefix_cut_there():
    """The candidate of length L after chunk k is the partial chunk a producer stored for
    a context ending L tokens into chunk k: the lookup finds it by hash alone."""
    fid = VECTORS["families"][0]["family_id"]
    toks = list(range(1000, 1700))
    chain = chunk_hashes(toks, fid, chunk_size=256)
    for k, parent in ((0, chain_root("default", fid, 256)), (2, chain[1])):
        rest = toks[k * 256:k * 256 + 255]
        tails = tail_hashes(parent, rest)
        assert len(tails) == len(rest)
        for cut in (1, 17, len(rest)):
            stored = chunk_hashes(toks[:k * 256 + cut], fid, chunk_size=256, include_partial=True)
            assert stored[-1] == tails[len(rest) - cut]
        assert not set(tails) & set(chain)        # never a full chunk's hash


def test_entry_id_vector():
    v = VECTORS["entry_ids"][0]
    assert entry_id(v["tenant"], v["family_id"], bytes.fromhex(v["chunk_hash"]), v["producer"],
                    v["position_offset"]).hex() == v["entry_id"]


def test_chain_properties():
    fid = VECTORS["families"][0]["family_id"]
    toks = list(range(1000))
    full = chunk_hashes(toks, fid)
    assert len(full) == 3                                      # 1000 // 256, partial left out
    assert chunk_hashes(toks[:600], fid) == full[:2]           # prefix property
    assert len(chunk_hashes(toks, fid, include_partial=True)) == 4
    # a partial chunk never collides with a full chunk of the same prefix
    part = chunk_hashes(toks[:256 + 10], fid, include_partial=True)
    assert part[0] == full[0] and part[1] != full[1]
    # namespacing: tenant, family, chunk size and extra keys all change every hash
    others = [chunk_hashes(toks, fid, tenant="other"), chunk_hashes(toks, "0" * 32),
              chunk_hashes(toks[:768], fid, chunk_size=128)[1::2],
              chunk_hashes(toks, fid, extra_keys=["lora:a"])]
    for other in others:
        assert not set(other) & set(full)
    # one changed token changes its chunk and every later one, not earlier ones
    changed = chunk_hashes(toks[:300] + [9999] + toks[301:], fid)
    assert changed[0] == full[0] and changed[1] != full[1] and changed[2] != full[2]


def test_bad_tokens_rejected():
    with pytest.raises(ValueError, match="0..2\\*\\*32-1"):
        chunk_hashes([-1] * 256, "0" * 32)


def test_family_validation_names_field():
    good = _family(VECTORS["families"][0])
    good.validate()
    with pytest.raises(ValueError, match="num_kv_heads"):
        FamilySpec(**{**{f: getattr(good, f) for f in good.__dataclass_fields__}, "num_kv_heads": 0}).validate()
    with pytest.raises(ValueError, match="canonical"):
        FamilySpec(**{**{f: getattr(good, f) for f in good.__dataclass_fields__},
                      "rope_scaling_json": '{"b": 1, "a": 2}'}).validate()
