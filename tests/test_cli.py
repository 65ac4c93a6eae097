"""The ``cachesvc`` command line, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY, make_entry


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cachesvc.node.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_stats_and_ls(server, client, rng):
    reg = client.register_model("producer-a", "0123abcd", TINY)
    hashes = client.hash_tokens(list(range(512)), reg.family_id)
    client.put(reg.family_id, "producer-a", [make_entry(rng, TINY, h, 256) for h in hashes])
    stats = json.loads(_cli("stats", "--target", server.address).stdout)
    assert stats["entries"] == 2 and stats["models"] == 1 and stats["chunk_size"] == 256
    out = _cli("ls", "--target", server.address).stdout.splitlines()
    assert len(out) == 3 and all("producer-a" in line and "4/4/4" in line for line in out[1:])
    models = _cli("ls", "--models", "--target", server.address).stdout
    assert "producer-a" in models and reg.family_id in models
    client.register_model("consumer-b", "4567cdef", TINY)
    client.put_profile("producer-a", "consumer-b", "0123abcd", "4567cdef", {"plans": []})
    client.flag_profile("producer-a", "consumer-b", "plan [2,4) drifted")
    [line] = _cli("ls", "--profiles", "--target", server.address).stdout.splitlines()
    assert "producer-a" in line and "consumer-b" in line and "flagged x1: plan [2,4) drifted" in line


def test_serve_rejects_bad_config():
    proc = _cli("serve", "--memory-bytes", "plenty", timeout=30)
    assert proc.returncode == 2 and "memory_bytes: not a size" in proc.stderr


def test_bench_lookup_small(tmp_path):
    out = tmp_path / "lookup.json"
    proc = _cli("bench", "lookup", "--json", str(out), "--entries", "4096", "--batch", "1024",
                "--rounds", "20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["index_entries"] == 4096
    for key in ("p50_ms", "p99_ms", "chunks_per_s"):
        assert doc[key] > 0 and doc["single"][key] > 0
    assert doc["batched"]["chunks_per_call"] == 1024 and doc["single"]["chunks_per_call"] == 1
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "| batched | 1024 |" in proc.stdout


def test_bench_dataplane_fields(tmp_path):
    out = tmp_path / "dataplane.json"
    proc = _cli("bench", "dataplane", "--json", str(out), "--paths", "tcp,shm,shm-direct", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {(r["path"], r["op"]) for r in rows} == {(p, o) for p in ("tcp", "shm") for o in ("get", "put")} | \
        {("shm-direct", "get")}                        # its puts are shm's
    for r in rows:
        assert r["size_bytes"] > 0 and r["gbps"] > 0 and r["ceiling_gbps"] > 0
        if r["path"] == "shm-direct":
            assert r["copy_only_gbps"] > 0 and r["memfd_ceiling_gbps"] > 0 and r["locating_lookup_ms"] > 0
    assert {r["request"] for r in rows} >= {"4MiB", "64MiB", "256MiB", "smollm2-2048tok-kv",
                                            "smollm2-2048tok-kv-layerwise"}
    assert set(doc["layerwise_vs_whole"]) == {"tcp", "shm", "shm-direct"}
    lmcache = doc["lmcache"]
    assert "get_gbps" in lmcache and "put_gbps" in lmcache
    if lmcache["status"].startswith("ok"):   # LMCache's virtualenv is there (make test builds it)
        assert [s["request"] for s in lmcache["sizes"]] == ["64MiB", "256MiB"]
        assert all(s["lm_get_gbps"] > 0 and s["tcp_ceiling_gbps"] > 0 for s in lmcache["sizes"])
        chunks = lmcache["chunks_4mib"]
        assert (chunks["identical"], chunks["identical_after_restart"], chunks["wrong"]) == (100, 100, 0)
        assert lmcache["l2"]["cachesvc"]["load_ok"] == "96/96"
    elif os.environ.get("CI"):
        pytest.fail(f"the LMCache comparison did not run in CI: {lmcache['status']}")
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "| shm | get | 256MiB |" in proc.stdout


def test_bench_reuse_takes_the_profiles_best_plan(tmp_path):
    """`cachesvc bench reuse --plan NAME=profile` measures the profile's smallest plan at
    --min-quality, several plans per consumer can be given, and a missing profile is a
    clear exit."""
    from cachesvc_bench.reuse import _plans
    from cachesvc_connectors.reuse import Plan
    from test_reuse_profile import _profile
    (tmp_path / "profile-tuned.json").write_text(json.dumps(_profile().to_json()))
    plans = _plans("tuned=profile;tuned=[0,2);other=[1,3)", 8, tmp_path, 0.95)
    assert plans == {"tuned": [Plan(8, ((4, 6),)), Plan(8, ((0, 2),))], "other": [Plan(8, ((1, 3),))]}
    assert _plans("tuned=profile", 8, tmp_path, 1.01) == {"tuned": [Plan(8, ((4, 6), (7, 8)))]}  # the best
    with pytest.raises(SystemExit, match="profile-missing.json missing"):
        _plans("missing=profile", 8, tmp_path, 0.95)


def test_bench_reuse_unaligned_fields(tmp_path):
    """`cachesvc bench reuse --unaligned`: a context of 300 tokens (not a chunk multiple)
    plus a 24-token question, on a sliding-window shape: the whole context is reused (its
    partial chunk too), only the question runs as the suffix, the greedy output is the
    model's own, and every figure the issue names is in the JSON (and a plot is written)."""
    out = tmp_path / "unaligned.json"
    proc = _cli("bench", "reuse", "--unaligned", "gemma3-tiny", "--contexts", "300", "--requests", "2",
                "--new-tokens", "4", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    [row] = doc["rows"]
    assert row["model"] == "gemma3-tiny" and row["reused_tokens"] == 300 and row["suffix_tokens"] == 23
    assert row["identical"] == 1.0 and row["modes"] == ["same_model"]
    for field in ("ttft_s", "full_prefill_ttft_s", "suffix_s", "model_suffix_s", "decode_ms_per_token",
                  "baseline_decode_ms_per_token"):
        assert row[field] > 0, field
    assert (tmp_path / "unaligned.png").stat().st_size > 0


def test_bench_overhead_fields(tmp_path):
    """`cachesvc bench overhead`: both modes, the figures issue 12 names, the breakdown,
    answers identical to generate() on the assembled cache, and a plot."""
    out = tmp_path / "overhead.json"
    proc = _cli("bench", "overhead", "--contexts", "300", "--requests", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert [(r["mode"], r["fetch"], r["served_as"], r["transport"]) for r in doc["rows"]] == [
        ("same_model", "direct", ["same_model"], ["shm-direct"]), ("same_model", "dataplane", ["same_model"], ["shm"]),
        ("plan", "direct", ["cross_model"], ["shm-direct"]), ("plan", "dataplane", ["cross_model"], ["shm"])]
    for row in doc["rows"]:
        assert row["context_tokens"] == 300 and row["reused_tokens"] == 300 and row["identical"] == 1.0
        assert row["ttft_s"] > 0 and row["baseline_ttft_s"] > 0 and "fixed_overhead_ms" in row
        assert "overhead_beyond_compute_ms" in row
        assert set(row["breakdown_ms"]) >= {"lookup", "fetch_setup", "first_slab", "assembly", "compute",
                                            "generate_setup", "first_token"}
        assert all(v >= 0 for v in row["breakdown_ms"].values()), row["breakdown_ms"]
    assert (tmp_path / "overhead.png").stat().st_size > 0


def test_bench_reuse_synthetic_load_fields(tmp_path):
    """`cachesvc bench reuse --synthetic`: every reusing row says how fast its slabs
    loaded and the ceiling for the same bytes measured in the same run."""
    out = tmp_path / "reuse.json"
    proc = _cli("bench", "reuse", "--synthetic", "llama-tiny", "--contexts", "600", "--prompts-per-context", "1",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["full_prefill", "same_model", "full_reuse", "plan"]
    assert rows[0]["load_gbps"] is None and rows[0]["load_ceiling_gbps"] is None
    for row in rows[1:]:
        assert row["bytes_fetched"] > 0 and row["load_gbps"] > 0 and row["load_ceiling_gbps"] > 0


def test_bench_soak_fields(tmp_path):
    """`cachesvc bench soak`: a short oversubscribed run of three tenants' writers, readers
    and deleters; every read checked byte for byte, the figures issue 17 names."""
    out = tmp_path / "soak.json"
    proc = _cli("bench", "soak", "--minutes", "0.1", "--memory-mib", "32", "--workers", "3", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["wrong_bytes"] == 0 and doc["errors"] == 0
    assert doc["ops"] > 100 and doc["reads_hit"] > 0 and doc["reads_missed"] > 0
    assert all(doc["ops_by_kind"][op] > 0 for op in ("put", "read", "delete"))
    for name in ("minutes", "peak_rss_over_budget", "fd_growth", "thread_growth", "p99_lookup_ms"):
        assert isinstance(doc[name], (int, float)), name
    assert doc["key_space_bytes"] >= 10 * doc["memory_bytes"] * 0.99 and len(doc["samples"]) >= 3
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_bench_agents_fields(tmp_path):
    """`cachesvc bench agents` on a tiny random-weight shape: every mode on the same calls,
    the fields issue 16 names, the exact modes exact, the reusing ones reading placeholders,
    the planner's profile measured in the run, and a plot."""
    out = tmp_path / "agents.json"
    proc = _cli("bench", "agents", "--model", "llama-tiny", "--agents", "3", "--input-tokens", "300",
                "--prefix-tokens", "100", "--output-tokens", "60", "--agent-rounds", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    rows = {r["mode"]: r for r in doc["rows"]}
    assert list(rows) == ["dense", "prefix_only", "nearest", "reuse_all", "blend", "kvcomm", "planner"]
    for row in rows.values():
        assert row["workload"] == "copy" and row["agents"] == 3 and row["calls"] == 6
        for field in ("reuse_token_rate", "reuse_call_rate", "ttft_s", "prompt_speedup", "first_token_kl",
                      "top1_agreement", "identical_rate", "task_score", "last_agent_speedup"):
            assert field in row, field
    for mode in ("dense", "prefix_only"):
        assert rows[mode]["first_token_kl"] == 0.0 and rows[mode]["identical_rate"] == 1.0
    assert rows["dense"]["reuse_token_rate"] == 0.0 and rows["prefix_only"]["reuse_token_rate"] > 0
    # Agents 2 and 3 read the input (and agent 3 agent 2's answer) from other contexts.
    assert rows["nearest"]["reuse_call_rate"] == pytest.approx(4 / 6, abs=1e-3) and rows["nearest"]["reuse_token_rate"] > 0.5
    assert rows["reuse_all"]["reuse_token_rate"] > rows["nearest"]["reuse_token_rate"]
    assert set(doc["profile"]["templates"]) == {"agent1", "agent2", "agent3"}
    assert sum(rows["planner"]["strategies"].values()) == 6
    assert doc["node"]["segment_sources"] > 0 and (tmp_path / "agents.png").stat().st_size > 0


def test_bench_agents_calibrates_each_placeholder_alone(tmp_path):
    """`--calibrate placeholder`: each strategy measured on each placeholder alone, a
    profile row per (template, placeholder), and the planner answering with a strategy
    per placeholder."""
    out = tmp_path / "agents.json"
    proc = _cli("bench", "agents", "--model", "llama-tiny", "--agents", "3", "--input-tokens", "200",
                "--prefix-tokens", "64", "--output-tokens", "40", "--agent-rounds", "1", "--modes",
                "dense,nearest,planner", "--calibrate", "placeholder", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    templates = doc["profile"]["templates"]
    # agent3 reads the input and the answers of agents 1 and 2: each placeholder gets its own rows
    assert {r["placeholder"] for r in templates["agent3"] if r["placeholder"]} == {"input", "answer1", "answer2"}
    assert {r["placeholder"] for r in templates["agent1"] if r["placeholder"]} == {"input"}
    planner = next(r for r in doc["rows"] if r["mode"] == "planner")
    assert sum(planner["strategies"].values()) == 3
    assert all("=" in name for name in planner["strategies"]), planner["strategies"]
    # The mixes it would use that reuse something were measured whole; none missing the target was used.
    target = doc["target"]
    missed = {r["strategy"] for rows in templates.values() for r in rows if not r["placeholder"]
              and "=" in r["strategy"] and not (r["median_kl"] <= target["max_kl"] and r["top1"] >= target["min_top1"])}
    assert not missed & set(planner["strategies"]), (missed, planner["strategies"])
