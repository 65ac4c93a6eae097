"""Cross-context reuse (agents) on tiny random-weight models against a real server: the
exact strategies and re-rotation are exact, another model's segment goes through the pair's
plan, fallbacks compute and say why, the planner's choice is demoted by the drift guard, and
KVCOMM's anchor path records on a miss and estimates after it."""

from __future__ import annotations

import random

import pytest
import torch
from prometheus_client import REGISTRY

from cachesvc_client import CacheClient, DType
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
from cachesvc_connectors.hf.agents import Agent, AgentTemplate, TemplateMismatchError
from cachesvc_connectors.reuse import DriftGuard, DriftOptions, Plan
from cachesvc_connectors.reuse.crosscontext import (CrossContextProfile, FidelityTarget, StrategyRow,
                                                    StrategySelector, publish_profile)
from cachesvc.wire.segments import SegmentSource, pack_prefix
from cachesvc_connectors.reuse.segments import AnchorOptions, SourceRule, choose_source, mix, similarity
from hf_models import fine_tune_of, last_logits, tiny_model, tokenizer

FP32 = DType.FLOAT32


def _words(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(255) for _ in range(n)]


def _text(tokens: list[int]) -> str:
    return " ".join(f"w{t}" for t in tokens)


def test_the_nearest_source_is_the_most_alike_prefix_though_not_every_one_is_scored():
    """choose_source skips candidates whose upper bounds cannot win: it picks what scoring
    every source picks (up to exact ties), over identical, shared-tail, cut and unlike
    prefixes from a small vocabulary (where the upper bounds are loose)."""
    rng = random.Random(5)
    for _ in range(60):
        mine = [rng.randrange(40) for _ in range(rng.randrange(700))]
        sources = []
        for _ in range(rng.randrange(1, 17)):
            roll = rng.random()
            if roll < 0.2:
                prefix = list(mine)
            elif roll < 0.45:
                prefix = [rng.randrange(40) for _ in range(rng.randrange(60))] + mine[-rng.randrange(1, 600):]
            elif roll < 0.7:
                prefix = mine[:rng.randrange(len(mine) + 1)] + [rng.randrange(40) for _ in range(rng.randrange(30))]
            else:
                prefix = [rng.randrange(40) for _ in range(rng.randrange(700))]
            sources.append(SegmentSource(rng.choice("ab"), (b"h",), len(prefix), 4, pack_prefix(prefix)))
        chosen = choose_source(sources, mine, SourceRule.NEAREST, prefer="a")
        best = max((similarity(s.prefix(), mine), s.producer == "a") for s in sources)
        assert (similarity(chosen.prefix(), mine), chosen.producer == "a") == best


def _agent(client, model, tok, model_id: str, name: str, **kw) -> Agent:
    consumer = Consumer(client, model, tok, model_id, ConsumerOptions(dtype=FP32, **kw.pop("consumer", {})))
    producer = Producer(client, model, tok, model_id, ProducerOptions(dtype=FP32))
    return Agent(name, consumer, producer, **kw)


@torch.no_grad()
def _logits(agent: Agent, prompt, strategy: str):
    """The last token's logits the way ``generate()`` gets them (a cache of N-1 tokens,
    then the model on the last one), checked against the one-pass ``logits=True`` prefill
    of the same strategy, which runs first (its anchor recordings are not run: the pool is
    left as the second finds it); with the first call's report."""
    ids = prompt.ids
    fused = agent.prefill(prompt, strategy, logits=True)
    assert fused.cache.get_seq_length() == len(ids) and fused.logits is not None
    pre = agent.prefill(prompt, strategy)
    assert pre.cache.get_seq_length() == len(ids) - 1 and pre.logits is None
    out = agent.consumer.model(input_ids=agent.stack.ids(ids[-1:]), past_key_values=pre.cache)
    pre.finish()
    assert torch.allclose(fused.logits, out.logits[0, -1], atol=1e-4, rtol=0), strategy
    assert fused.report.reused_tokens == pre.report.reused_tokens
    # The cache it leaves decodes on: its last row is the last prompt token's K/V.
    for layer in (0, len(out.past_key_values.layers) - 1):
        assert torch.allclose(fused.cache.layers[layer].keys, out.past_key_values.layers[layer].keys, atol=1e-4, rtol=0)
    return out.logits[0, -1], fused.report   # the first call's (a rotten source is gone for the second)


@pytest.fixture(scope="module")
def base():
    return tiny_model("llama", seed=0), tokenizer()


def _template(name: str, prefix: list[int], suffix: list[int]) -> AgentTemplate:
    return AgentTemplate.from_text(name, f"{_text(prefix)} {{question}} {_text(suffix)}")


def test_same_prefix_and_blend_at_one_are_exact(client: CacheClient, base):
    model, tok = base
    agent = _agent(client, model, tok, "m", "a1")
    template = _template("a1", _words(300, 1), _words(20, 2))
    prompt = template.fill(tok, {"question": _words(200, 3)})
    assert [p.name for p in prompt.parts] == ["P0", "question", "P1"]
    agent.publish(prompt)
    dense = last_logits(model, prompt.ids)
    nearest = ("cachesvc_agent_prefills_total", {"strategy": "nearest"})
    seen = REGISTRY.get_sample_value(*nearest) or 0
    for strategy in ("nearest", "reuse_all", "blend@1", "prefix_only", "dense", "question=reuse_all,*=dense"):
        logits, report = _logits(agent, prompt, strategy)
        assert torch.allclose(logits, dense, atol=1e-4, rtol=0), strategy
    _, report = _logits(agent, prompt, "reuse_all")
    assert report.reused_tokens == len(prompt.ids) - 1 and report.fallback == ""
    _, report = _logits(agent, prompt, "nearest")
    assert report.reused_tokens == 500 and report.prefix_tokens == 300 and report.parts[0].shift == 0 and report.parts[1].action == "compute"
    assert REGISTRY.get_sample_value(*nearest) == seen + 4          # the consumer's metrics count them (2 paths each)


def test_a_segment_behind_another_prefix_is_re_rotated_exactly(client: CacheClient, base):
    model, tok = base
    writer, reader = _agent(client, model, tok, "m", "writer"), _agent(client, model, tok, "m", "reader")
    content = _words(150, 4)
    written = _template("writer", _words(37, 5), _words(10, 6)).fill(tok, {"question": content})
    writer.publish(written)
    prompt = _template("reader", _words(94, 7), _words(12, 8)).fill(tok, {"question": content})
    pre = reader.prefill(prompt, "nearest")
    [question] = [p for p in pre.report.parts if p.name == "question"]
    assert question.action == "reuse" and question.shift == 94 - 37 and question.source == "m@37"
    # Layer 0's keys depend on the token and its position only: re-rotated, they are exactly
    # what a prefill at the new offset computes.
    own = reader.stack.new_cache()
    model.model(input_ids=reader.stack.ids(prompt.ids[:-1]), past_key_values=own, use_cache=True)
    got, want = pre.cache.layers[0].keys[:, :, 94:244], own.layers[0].keys[:, :, 94:244]
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert pre.report.reuse_token_rate == pytest.approx(150 / len(prompt.ids))


def test_another_models_segment_goes_through_the_pairs_plan(client: CacheClient, base):
    model, tok = base
    other = fine_tune_of(model, range(4), seed=7)       # every layer differs; embedding shared
    writer = _agent(client, model, tok, "base", "writer")
    reader = _agent(client, other, tok, "tuned", "reader",
                    consumer={"default_plan": Plan.recompute_all(4)})
    content = _words(120, 9)
    writer.publish(_template("writer", _words(40, 10), _words(8, 11)).fill(tok, {"question": content}))
    prompt = _template("reader", _words(60, 12), _words(9, 13)).fill(tok, {"question": content})
    logits, report = _logits(reader, prompt, "nearest")
    [question] = [p for p in report.parts if p.name == "question"]
    assert question.source == "base@40" and question.plan == "[0,4)"
    # Recomputing every layer from the shared embedding at the new positions is exact.
    assert torch.allclose(logits, last_logits(other, prompt.ids), atol=1e-4, rtol=0)


def test_what_cannot_be_reused_is_computed_and_the_report_says_why(client: CacheClient, base):
    model, tok = base
    agent = _agent(client, model, tok, "m", "a1")
    template = _template("a1", _words(30, 14), _words(10, 15))
    with pytest.raises(TemplateMismatchError, match=r"missing \['question'\], unknown \['other'\]"):
        template.fill(tok, {"other": "w1"})
    prompt = template.fill(tok, {"question": _words(80, 16)})
    logits, report = _logits(agent, prompt, "nearest")                     # never published
    assert report.reused_tokens == 0 and "no nearest source" in report.fallback
    assert torch.allclose(logits, last_logits(model, prompt.ids), atol=1e-4, rtol=0)
    agent.publish(prompt)
    [[source]] = client.find_segments(agent.family_id, [client.segment_key(_words(80, 16), agent.family_id)])
    client.delete(agent.family_id, chunk_hashes=list(source.chunk_hashes))  # evicted under the reader
    logits, report = _logits(agent, prompt, "reuse_all")
    assert "no nearest source" in report.fallback or "did not load whole" in report.fallback
    assert torch.allclose(logits, last_logits(model, prompt.ids), atol=1e-4, rtol=0)
    # A sliding-window model computes spans (its layers keep only part of the context).
    gemma = _agent(client, tiny_model("gemma3", seed=0), tok, "g", "g1")
    prompt = _template("g1", _words(30, 17), _words(10, 18)).fill(tok, {"question": _words(40, 19)})
    gemma.publish(prompt)
    _, report = _logits(gemma, prompt, "nearest")
    assert report.parts[0].action == "compute" and "sliding-window" in report.fallback


def test_the_planner_picks_from_the_profile_and_the_guard_demotes(client: CacheClient, base):
    model, tok = base
    tuned = fine_tune_of(model, range(1, 4), seed=3, scale=2.0)     # a reader far from the writer
    writer = _agent(client, model, tok, "base", "writer")
    profile = CrossContextProfile("f", {"reader": [
        StrategyRow("reuse_all", 8, 0.001, 1.0, 0.95, 0.1),      # promised, cheapest
        StrategyRow("nearest", 8, 0.002, 1.0, 0.80, 0.3),
        StrategyRow("blend@0.3", 8, 0.5, 0.5, 0.6, 0.5),         # misses the target
        StrategyRow("prefix_only", 8, 0.0, 1.0, 0.2, 0.8)]})
    reader = _agent(client, tuned, tok, "tuned", "reader", consumer={"default_plan": Plan.full_reuse(4)})
    # The profile lives in the service, as the model's own pair (versioned by its weights).
    assert publish_profile(client, "tuned", reader.consumer.registration.weights_digest, profile) == 1
    selector = reader.selector = StrategySelector.from_service(client, "tuned", FidelityTarget(0.015, 0.95))
    assert selector.source is not None and selector.source.version == 1
    guard = reader.watch(DriftOptions(sample_fraction=1.0, min_samples=3, window=3, background=False,
                                      max_new_tokens=4, expected_quality=0.95))
    assert selector.choose("reader").strategy == "reuse_all"
    for seed in range(3):
        content = _words(60, 100 + seed)
        writer.publish(_template("writer", _words(50, 20), _words(8, 21)).fill(tok, {"question": content}))
        prompt = _template("reader", _words(70, 22), _words(8, 23)).fill(tok, {"question": content})
        _, report = reader.generate(prompt, max_new_tokens=2, do_sample=False)
        assert report.strategy == "reuse_all" and report.chose.startswith("cheapest")
    assert guard.metrics()["demotions"] == 1
    after = selector.choose("reader")
    assert after.strategy == "nearest" and "demoted" in after.why
    # ... and the demotion flagged the profile in the service for re-profiling.
    [stored] = client.list_profiles("tuned", "tuned")
    assert stored.flags == 1 and "reuse_all" in stored.flagged and not stored.stale
    # Without a profile in the service (another model), a selector falls back, saying why.
    bare = StrategySelector.from_service(client, "base")
    assert bare.source is None and bare.choose("reader").strategy == "prefix_only"
    assert selector.choose("nobody").strategy == "prefix_only"


def test_kvcomm_records_on_a_miss_and_estimates_after(client: CacheClient, base):
    model, tok = base
    agent = _agent(client, model, tok, "m", "a1", anchors=AnchorOptions(gamma=1.0, min_anchors=2))
    peer = _agent(client, model, tok, "m", "peer")
    template = _template("a1", _words(40, 30), _words(12, 31))
    reports = []
    for seed in range(4):
        content = _words(250, 40 + seed)        # with the 12 after it, past a chunk (256)
        peer.publish(_template("peer", _words(25, 32), _words(5, 33)).fill(tok, {"question": content}))
        prompt = template.fill(tok, {"question": content})
        logits, report = _logits(agent, prompt, "kvcomm")
        assert torch.isfinite(logits).all()
        reports.append(report)
    # The first two are misses (fewer than two anchors): computed exactly and recorded.
    assert [r.reused_tokens for r in reports[:2]] == [0, 0]
    assert "no anchors" in reports[0].fallback and "not recorded" not in reports[0].fallback
    anchors = client.find_anchors(agent.family_id, "question")
    assert len(anchors) >= 2 and all("a1" in a.deltas for a in anchors)
    # With gamma = 1 the entropy rule admits nothing more: later content is estimated.
    assert reports[-1].reused_tokens == 250 + 11 and reports[-1].fallback == ""
    assert sum(a.activations for a in client.find_anchors(agent.family_id, "question")) >= 1


def _rot(srv, client, family_id: str, chain, producer: str) -> None:
    """Flip a byte in the middle of the first entry file of ``chain`` (the node is stopped)."""
    hit = client.lookup(family_id, list(chain), producers=[producer]).hits[0]
    name = hit.entry_ids[0].hex()
    path = srv.data_dir / "entries" / name[:2] / f"{name}.ent"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_rotten_segments_and_anchors_are_computed_never_used(server_factory, base):
    model, tok = base
    srv = server_factory("--memory-bytes", "64MiB")
    template = _template("a1", _words(40, 50), _words(12, 51))
    with CacheClient(srv.address) as client:
        agent = _agent(client, model, tok, "m", "a1", anchors=AnchorOptions(gamma=1.0))
        writer = _agent(client, model, tok, "m", "writer")
        for seed in range(3):                     # two anchors with a1's offsets, and a third content
            content = _words(64, 60 + seed)
            writer.publish(_template("writer", _words(25, 52), _words(5, 53)).fill(tok, {"question": content}))
            _logits(agent, template.fill(tok, {"question": content}), "kvcomm")
        anchors = client.find_anchors(agent.family_id, "question")
        assert len(anchors) == 2
        key = client.segment_key(_words(64, 62), agent.family_id)
        [sources] = client.find_segments(agent.family_id, [key])
        span = next(s for s in sources if not s.normalized)
        deltas = [(a.deltas["a1"].placeholder_hashes, a.deltas["a1"].producer) for a in anchors]
        family_id = agent.family_id
        srv.stop()
        srv.start()                               # entries reload from disk
    with CacheClient(srv.address) as client:
        client.wait_ready()
        _rot(srv, client, family_id, span.chunk_hashes, span.producer)
        for chain, producer in deltas:
            _rot(srv, client, family_id, chain, producer)
    srv.stop()
    srv.start()
    with CacheClient(srv.address) as client:
        client.wait_ready()
        agent = _agent(client, model, tok, "m", "a1", anchors=AnchorOptions(gamma=1.0))
        prompt = template.fill(tok, {"question": _words(64, 62)})
        logits, report = _logits(agent, prompt, "nearest")
        assert report.parts[0].action == "compute" and "did not load whole" in report.fallback
        assert torch.allclose(logits, last_logits(model, prompt.ids), atol=1e-4, rtol=0)
        prompt = template.fill(tok, {"question": _words(64, 70)})
        writer = _agent(client, model, tok, "m", "writer")
        writer.publish(_template("writer", _words(25, 52), _words(5, 53)).fill(tok, {"question": _words(64, 70)}))
        logits, report = _logits(agent, prompt, "kvcomm")
        assert report.parts[0].action == "compute" and report.reused_tokens == 0
        assert torch.allclose(logits, last_logits(model, prompt.ids), atol=1e-4, rtol=0)


class _Differs:
    """A verifier whose reused answers never match the dense ones (the guard's input)."""

    def same_answer(self, prompt, key, step, max_new_tokens) -> bool:
        return False


def test_per_placeholder_rows_give_each_placeholder_its_own_strategy():
    profile = CrossContextProfile("f", {"t": [
        StrategyRow("nearest", 4, 0.001, 1.0, 0.90, 0.20, "records"),
        StrategyRow("reuse_all", 4, 0.001, 1.0, 0.95, 0.10, "records"),
        StrategyRow("nearest", 4, 0.5, 0.5, 0.30, 0.60, "question"),      # misses the target
        StrategyRow("blend", 4, 0.01, 1.0, 0.20, 0.70, "question"),
        StrategyRow("nearest", 4, 0.5, 0.5, 0.90, 0.30)]})                 # the template-wide row
    assert CrossContextProfile.from_json(profile.to_json()) == profile
    selector = StrategySelector(profile, FidelityTarget(0.015, 0.95))
    ladder = [s.name for s in selector.ladder("t")]
    assert ladder == ["question=blend,records=reuse_all,*=prefix_only",
                      "question=prefix_only,records=nearest,*=prefix_only",
                      "question=prefix_only,records=prefix_only,*=prefix_only"]
    chosen = selector.choose("t")
    assert chosen.strategy == ladder[0] and chosen.why.startswith("per placeholder")
    chosen_mix = mix(chosen.strategy)
    assert chosen_mix.name == chosen.strategy and chosen_mix.of("records").name == "reuse_all"
    assert chosen_mix.of("system").name == "prefix_only"
    # A demotion moves every placeholder one rung up its own ladder.
    selector.guard = DriftGuard(_Differs(), selector.flag, DriftOptions(sample_fraction=1.0, min_samples=2,
                                                                       window=2, background=False))
    for _ in range(2):
        selector.observe("t", object(), chosen.strategy)
    assert selector.choose("t").strategy == ladder[1] and "demoted" in selector.choose("t").why
    for spec in ("records=", "a=nearest,a=dense", "x=nope", "=nearest"):
        with pytest.raises(ValueError):
            mix(spec)


def test_a_mix_measured_whole_that_misses_the_target_is_left_out():
    """Per-placeholder fidelity does not compose: two placeholders each fine alone may
    miss the target together; the profile's measurement of the mix whole decides."""
    profile = CrossContextProfile("f", {"t": [StrategyRow("nearest", 4, 0.001, 1.0, 0.9, 0.2, "records"),
                                              StrategyRow("nearest", 4, 0.001, 1.0, 0.9, 0.3, "question")]})
    target = FidelityTarget(0.015, 0.95)
    both, exact = ("question=nearest,records=nearest,*=prefix_only",
                   "question=prefix_only,records=prefix_only,*=prefix_only")
    assert [s.name for s in StrategySelector(profile, target).ladder("t")] == [both, exact]
    profile.templates["t"].append(StrategyRow(both, 2, 0.004, 1.0, 0.9, 0.2))      # whole, meets: kept
    assert StrategySelector(profile, target).choose("t").strategy == both
    profile.templates["t"][-1] = StrategyRow(both, 2, 0.04, 0.8, 0.9, 0.2)          # whole, misses
    selector = StrategySelector(profile, target)
    assert [(s.name, s.rank) for s in selector.ladder("t")] == [(exact, 0)]
    assert selector.choose("t").strategy == exact
    # A mix that computes every placeholder is exact: it meets the target whatever a
    # (noisy) row says, and the drift guard never samples it.
    profile.templates["t"].append(StrategyRow(exact, 2, 0.5, 0.5, 0.0, 1.0))
    selector = StrategySelector(profile, target)
    assert selector.choose("t").strategy == exact
    selector.guard = DriftGuard(_Differs(), selector.flag, DriftOptions(sample_fraction=1.0, min_samples=1,
                                                                       window=1, background=False))
    for _ in range(3):
        selector.observe("t", object(), exact)
    assert selector.choose("t").strategy == exact and "demoted" not in selector.choose("t").why
