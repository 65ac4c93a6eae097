"""``cachesvc bench agents``: cross-context reuse in multi-agent pipelines (issue 16).

Two workloads, each a pipeline of agents run round after round against one node:

- ``copy``: the paper's TTFT setting made offline. N fully connected agents; agent k's
  prompt is its own ``--prefix-tokens`` prefix, the round's ``--input-tokens`` input, and
  the answers of agents 1..k-1 (``--output-tokens`` each), then a short instruction; every
  token a random symbol. Answers are drawn, not generated (TTFT is what is measured), and
  published with their agent's prompt, so later agents find them by content.
- ``task``: the access-code task (cachesvc_lab.tasks). Every agent reads the round's
  records (``--context-tokens``) and question behind its own system prompt and answers
  it; agent 1 is the base model (SmolLM2), the others ``--task-consumer`` (a fine-tune of
  it), so a shared segment another model stored goes through the pair's plan
  (``--agent-plan``). The score is exact match of the code.

Every call is timed in every mode on the same prompts: ``dense`` (the agent's own full
prefill: the reference for fidelity), ``prefix_only`` (its stored prefix reused), each
strategy of reuse.segments, and ``planner`` (the strategy a cross-context profile picks per
agent, the profile measured on ``--calibration-rounds`` rounds of other content in the same
run; with ``--calibrate placeholder`` each strategy is measured on each placeholder alone,
so the planner gives each placeholder its own, and the mixes that makes are then measured
whole on as many rounds again: one missing the target is not used). An agent publishes its
prompt (and answer) after its call was measured in every mode.

TTFT is prompt in, first-token logits out (models loaded), in one pass in every mode
(``Agent.prefill(logits=True)``: the last prompt token runs with the rest; ``dense`` is the
model's own forward over the whole prompt). Rows per (workload, agents,
mode): ``reuse_token_rate`` (prompt tokens read, not computed), ``reuse_call_rate`` (calls
that read a placeholder's content), ``ttft_s`` (median), ``prompt_speedup`` (dense's total
TTFT over the mode's, same calls), ``first_token_kl`` (median, against dense),
``prompt_speedup_agents_2_on`` (the same over the agents after the first, which alone can
read what others stored), ``top1_agreement``, ``identical_rate`` (greedy ``--answer-tokens``), ``task_score`` with its
95% interval (task), ``last_agent_speedup`` (copy: the last agent's median TTFT, dense over
the mode). Rows for fewer agents come from the same pipeline's first agents (an agent only
reads what the agents before it wrote).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from cachesvc_bench.common import finish, machine, model_server
from cachesvc_client import CacheClient, DType, Kind
from cachesvc_connectors.hf import Consumer, ConsumerOptions, Producer, ProducerOptions
from cachesvc_connectors.hf.agents import Agent, AgentPrompt, AgentReport, AgentTemplate
from cachesvc_connectors.reuse import Plan
from cachesvc_connectors.reuse.crosscontext import (CrossContextProfile, FidelityTarget, StrategyRow,
                                                    StrategySelector, is_exact, publish_profile)
from cachesvc_connectors.reuse.segments import AnchorOptions, mix

COPY_MODES = "dense,prefix_only,nearest,reuse_all,blend,kvcomm,planner"
TASK_MODES = "dense,prefix_only,nearest,reuse_all,blend,planner"
CALIBRATED = ("prefix_only", "nearest", "reuse_all", "blend", "kvcomm")


@dataclass
class Step:
    """One agent's call in a round: its prompt, what it publishes, the task's truth."""

    agent: int                      # 0-based
    prompt: AgentPrompt
    answer: list[int] = field(default_factory=list)   # published after the prompt (copy)
    truth: str = ""                 # the expected answer (task)


@dataclass
class Call:
    mode: str
    round: int
    agent: int
    prompt_tokens: int
    reused_tokens: int
    read_content: bool              # a placeholder's K/V were read, not computed
    ttft_s: float
    kl: float = 0.0
    top1: float = 1.0
    identical: float = 1.0
    score: float | None = None
    strategy: str = ""


# ---------------------------------------------------------------- workloads

class CopyWorkload:
    name = "copy"

    def __init__(self, args: argparse.Namespace, vocab: range) -> None:
        self.args, self.vocab = args, vocab
        rng = random.Random(args.seed)
        self.templates = []
        for k in range(args.agents):
            pieces: list[tuple[str, object]] = [("template", self._symbols(rng, args.prefix_tokens)),
                                                ("placeholder", "input")]
            for j in range(k):
                pieces += [("template", self._symbols(rng, 4)), ("placeholder", f"answer{j + 1}")]
            pieces.append(("template", self._symbols(rng, 16)))
            self.templates.append(AgentTemplate(f"agent{k + 1}", pieces))

    def _symbols(self, rng: random.Random, n: int) -> list[int]:
        return [rng.choice(self.vocab) for _ in range(n)]

    def round(self, index: int, tokenizer) -> list[Step]:
        rng = random.Random(self.args.seed * 1_000_003 + index)
        values: dict[str, list[int]] = {"input": self._symbols(rng, self.args.input_tokens)}
        steps = []
        for k, template in enumerate(self.templates):
            prompt = template.fill(tokenizer, {n: values[n] for n in template.placeholders})
            answer = self._symbols(rng, self.args.output_tokens)
            values[f"answer{k + 1}"] = answer
            steps.append(Step(k, prompt, answer))
        return steps


class TaskWorkload:
    name = "task"

    def __init__(self, args: argparse.Namespace, tokenizer) -> None:
        from cachesvc_lab import tasks
        self.args, self.tasks = args, tasks
        roles = ["a careful analyst", "a records clerk", "an auditor", "a help-desk agent", "a security officer",
                 "a team lead", "a reviewer", "an assistant"]
        self.templates = []
        for k in range(args.agents):
            system = f"You are {roles[k % len(roles)]}, agent {k + 1} of a team. {tasks.SYSTEM}"
            text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{{records}}\n\n{{question}}"
                    f"<|im_end|>\n<|im_start|>assistant\n")
            self.templates.append(AgentTemplate.from_text(f"agent{k + 1}", text))
        self.tokenizer = tokenizer

    def round(self, index: int, tokenizer) -> list[Step]:
        [example] = self.tasks.sized_dataset(tokenizer, "test", 1, self.args.context_tokens,
                                             seed=self.args.seed * 7919 + index)
        return [Step(k, t.fill(tokenizer, {"records": example.context, "question": example.question}),
                     truth=example.answer) for k, t in enumerate(self.templates)]


# ---------------------------------------------------------------- measuring

@torch.no_grad()
def _call(agent: Agent, step: Step, strategy: str, answer_tokens: int) -> tuple[AgentReport, torch.Tensor, list[int], float]:
    """(report, first-token log-probs, greedy answer, TTFT in seconds)."""
    model, stack = agent.consumer.model, agent.stack
    t0 = time.perf_counter()
    pre = agent.prefill(step.prompt, strategy, logits=True)   # the last token in the same pass
    assert pre.logits is not None
    logits = pre.logits.float()
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)   # the first token is out when its logits are
    ttft = time.perf_counter() - t0
    answer, cache, nxt = [], pre.cache, int(logits.argmax())
    for _ in range(answer_tokens):
        answer.append(nxt)
        if nxt == model.config.eos_token_id:
            break
        out = model(input_ids=stack.ids([nxt]), past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
    pre.finish()     # the anchor path's recording, after the answer (not in the TTFT)
    return pre.report, torch.log_softmax(logits, -1), answer, ttft


def _applies(mode: str, placeholders: set[str]) -> bool:
    """Whether a mode runs on a prompt with these placeholders (a per-placeholder mode
    only where its placeholders are)."""
    return "=" not in mode or {p for p, _ in mix(mode).by} <= placeholders


def _placeholder_read(report: AgentReport, prompt: AgentPrompt) -> bool:
    names = {p.name for p in prompt.parts if p.kind == "placeholder"}
    return any(p.name in names and p.reused_tokens > 0 for p in report.parts)


class Pipeline:
    """The agents of a workload on one node, and the dense reference of each call."""

    def __init__(self, agents: list[Agent], workload, tokenizer, args) -> None:
        self.agents, self.workload, self.tokenizer, self.args = agents, workload, tokenizer, args

    def run_round(self, index: int, modes: list[str], progress,
                  only: dict[int, set[str]] | None = None) -> list[Call]:
        """Every applicable mode on each call of round ``index`` (``dense`` first: the
        reference); with ``only``, agent i runs ``dense`` and ``only[i]`` alone."""
        calls = []
        for step in self.workload.round(index, self.tokenizer):
            agent = self.agents[step.agent]
            reference = None
            named = {p.name for p in step.prompt.parts if p.kind == "placeholder"}
            for mode in modes:
                if not _applies(mode, named):
                    continue           # a per-placeholder calibration mode of another template
                if only is not None and mode != "dense" and mode not in only.get(step.agent, ()):
                    continue           # another template's mix
                strategy = "auto" if mode == "planner" else mode
                report, logprobs, answer, ttft = _call(agent, step, strategy, self.args.answer_tokens)
                if reference is None:       # dense runs first
                    reference = (logprobs, answer)
                ref_lp, ref_answer = reference
                kl = float(torch.sum(ref_lp.exp() * (ref_lp - logprobs)))
                score = None
                if step.truth:
                    text = self.tokenizer.decode(answer, skip_special_tokens=True)
                    score = self.workload.tasks.score(text, step.truth).exact
                calls.append(Call(mode, index, step.agent, len(step.prompt.ids), report.reused_tokens,
                                  _placeholder_read(report, step.prompt), ttft, max(kl, 0.0),
                                  float(int(logprobs.argmax()) == int(ref_lp.argmax())),
                                  float(answer == ref_answer), score, report.strategy))
                progress.update(1)
            agent.publish(step.prompt, step.answer)
        return calls


def _profile(calls: list[Call], family_id: str) -> CrossContextProfile:
    """Each agent's strategies measured on the calibration calls, relative to dense."""
    profile = CrossContextProfile(family_id)
    for agent in sorted({c.agent for c in calls}):
        rows = _strategy_rows(calls, agent, whole=False)
        rows.append(StrategyRow("dense", sum(1 for c in calls if c.mode == "dense" and c.agent == agent),
                                0.0, 1.0, 0.0, 1.0))
        profile.templates[f"agent{agent + 1}"] = rows
    return profile


def _strategy_rows(calls: list[Call], agent: int, whole: bool) -> list[StrategyRow]:
    """The agent's modes as profile rows, relative to dense on the same calls. A mode
    ``records=nearest,*=prefix_only`` is nearest measured on that placeholder alone, unless
    ``whole``: then it is the mix measured whole (a template row named by the mix)."""
    dense = {(c.round, c.agent): c.ttft_s for c in calls if c.mode == "dense"}
    rows = []
    for mode in sorted({c.mode for c in calls if c.agent == agent} - {"dense"}):
        mine = [c for c in calls if c.mode == mode and c.agent == agent]
        if whole:
            placeholder, name = "", mix(mode).name
        else:
            [(placeholder, strategy)] = mix(mode).by if "=" in mode else [("", mix(mode).default)]
            name = strategy.name
        rows.append(StrategyRow(name, len(mine), statistics.median(c.kl for c in mine),
                                statistics.fmean(c.top1 for c in mine),
                                sum(c.reused_tokens for c in mine) / sum(c.prompt_tokens for c in mine),
                                statistics.median(c.ttft_s / dense[(c.round, c.agent)] for c in mine),
                                placeholder))
    return rows


def _mixes_to_verify(profile: CrossContextProfile, target: FidelityTarget, agents: int) -> dict[int, set[str]]:
    """Per agent, the per-placeholder mixes its selector would step through that reuse
    something (an all-exact mix needs no measuring)."""
    selector = StrategySelector(profile, target)
    out = {}
    for agent in range(agents):
        names = {s.name for s in selector.ladder(f"agent{agent + 1}")}
        out[agent] = {n for n in names if "=" in n and not is_exact(n)}
    return out


def _rows(workload: str, calls: list[Call], counts: list[int]) -> list[dict]:
    from cachesvc_lab.evaluate import mean_ci
    rows = []
    dense = {(c.round, c.agent): c for c in calls if c.mode == "dense"}
    for n in counts:
        for mode in dict.fromkeys(c.mode for c in calls):
            mine = [c for c in calls if c.mode == mode and c.agent < n]
            if not mine:
                continue
            last = [c.ttft_s for c in mine if c.agent == n - 1]
            last_dense = [dense[(c.round, c.agent)].ttft_s for c in mine if c.agent == n - 1]
            scores = [c.score for c in mine if c.score is not None]
            row = {
                "workload": workload, "agents": n, "mode": mode, "calls": len(mine),
                "reuse_token_rate": round(sum(c.reused_tokens for c in mine) / sum(c.prompt_tokens for c in mine), 4),
                "reuse_call_rate": round(statistics.fmean(c.read_content for c in mine), 4),
                "ttft_s": round(statistics.median(c.ttft_s for c in mine), 4),
                "prompt_speedup": round(sum(dense[(c.round, c.agent)].ttft_s for c in mine) /
                                        sum(c.ttft_s for c in mine), 3),
                # Agent 1 is the first to see a round's content: nothing to read for it.
                "prompt_speedup_agents_2_on": round(
                    sum(dense[(c.round, c.agent)].ttft_s for c in mine if c.agent) /
                    sum(c.ttft_s for c in mine if c.agent), 3) if n > 1 else None,
                "first_token_kl": round(statistics.median(c.kl for c in mine), 5),
                "top1_agreement": round(statistics.fmean(c.top1 for c in mine), 4),
                "identical_rate": round(statistics.fmean(c.identical for c in mine), 4),
                "task_score": round(statistics.fmean(scores), 4) if scores else None,
                "task_score_ci": [round(x, 4) for x in mean_ci(scores)] if scores else None,
                "per_agent": [{"agent": k + 1,
                               "ttft_s": round(statistics.median(c.ttft_s for c in mine if c.agent == k), 4),
                               "reuse_token_rate": round(
                                   sum(c.reused_tokens for c in mine if c.agent == k) /
                                   sum(c.prompt_tokens for c in mine if c.agent == k), 4)}
                              for k in range(n)],
            }
            if mode == "planner":
                row["strategies"] = {s: sum(1 for c in mine if c.strategy == s) for s in {c.strategy for c in mine}}
            if workload == "copy":
                row["last_agent_speedup"] = round(statistics.median(last_dense) / statistics.median(last), 3)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- setup

def _models(args: argparse.Namespace):
    """(base model, tokenizer, task consumer or None, symbol vocabulary)."""
    if args.model == "smollm2":
        from cachesvc_lab import finetune, smollm2
        base, tok = smollm2.load()
        tuned = None
        if args.workload == "task":
            tuned, _ = smollm2.load(finetune.ensure([args.task_consumer])[args.task_consumer])
        return base, tok, tuned, range(1000, 30000)
    from cachesvc_bench import synthetic
    if args.workload == "task":
        raise SystemExit("--workload task needs --model smollm2 (a task score needs real weights)")
    base, tok = synthetic.model(args.model, args.device)
    return base, tok, None, range(tok.vocab_size - 1)


def _agents(client: CacheClient, args, base, tok, tuned) -> list[Agent]:
    dtype = DType[args.slab_dtype.upper()] if args.slab_dtype else DType.FLOAT32
    kinds = (Kind.K, Kind.V, Kind.E) if tuned is not None else (Kind.K, Kind.V)
    anchors = AnchorOptions(gamma=args.anchor_gamma, temperature=args.anchor_temperature)
    agents, made = [], {}
    for k in range(args.agents):
        model, model_id = (tuned, args.task_consumer) if tuned is not None and k > 0 else (base, "base")
        if model_id not in made:
            plans = {"base": Plan.parse(args.agent_plan, base.config.num_hidden_layers)} if model_id != "base" else {}
            made[model_id] = (Consumer(client, model, tok, model_id,
                                       ConsumerOptions(dtype=dtype, plans=plans, use_profiles=False, metrics=False)),
                              Producer(client, model, tok, model_id, ProducerOptions(kinds=kinds, dtype=dtype)))
        consumer, producer = made[model_id]
        agents.append(Agent(f"agent{k + 1}", consumer, producer, anchors=anchors))
    return agents


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    base, tok, tuned, vocab = _models(args)
    counts = sorted({int(x) for x in (args.task_agents.split(",") if args.workload == "task" else [args.agents])})
    args.agents = max(counts)
    workload = CopyWorkload(args, vocab) if args.workload == "copy" else TaskWorkload(args, tok)
    modes = [m for m in (args.modes or (COPY_MODES if args.workload == "copy" else TASK_MODES)).split(",") if m]
    if "dense" in modes:
        modes.remove("dense")
    modes = ["dense", *modes]
    timed = [m for m in modes if m != "planner"]
    calibrate = ["dense", *(m for m in CALIBRATED if m in timed)] if "planner" in modes else []
    if calibrate and args.calibrate == "placeholder":
        names = sorted({n for t in workload.templates for n in t.placeholders})
        calibrate = ["dense", "prefix_only", *(f"{n}={m}" for n in names for m in calibrate[1:] if m != "prefix_only")]
    target = FidelityTarget(args.max_kl, args.min_top1)
    with model_server(args.device, args.node_memory, "--anchor-pool-bytes", args.anchor_pool_bytes) as srv, \
            CacheClient(srv.address) as client:
        agents = _agents(client, args, base, tok, tuned)
        pipeline = Pipeline(agents, workload, tok, args)
        per_round = sum(_applies(m, set(t.placeholders)) for t in workload.templates for m in calibrate or ["dense"])
        total = per_round * args.calibration_rounds + len(modes) * args.agent_rounds * args.agents
        with tqdm(total=total, desc=f"bench agents ({args.workload})", unit="call") as progress:
            # Rounds of other content first: the warm-up, and the planner's profile.
            cal = [c for r in range(args.calibration_rounds)
                   for c in pipeline.run_round(10_000 + r, calibrate or ["dense"], progress)]
            profile = _profile(cal, agents[0].family_id) if calibrate else None
            if profile is not None and args.calibrate == "placeholder":
                # Per-placeholder fidelity does not compose: measure each mix whole on
                # other rounds; the selector leaves out a mix that misses the target.
                verify = _mixes_to_verify(profile, target, args.agents)
                progress.total += args.calibration_rounds * sum(1 + len(v) for v in verify.values())
                progress.refresh()
                modes_whole = ["dense", *sorted(set().union(*verify.values()))]
                measured = [c for r in range(args.calibration_rounds)
                            for c in pipeline.run_round(20_000 + r, modes_whole, progress, only=verify)]
                for agent, names in verify.items():
                    if names:
                        profile.templates[f"agent{agent + 1}"] += _strategy_rows(measured, agent, whole=True)
            # Stored in the node as each agent model's own pair, and read back from there,
            # as a deployment's agents would (reuse.crosscontext).
            consumers = {a.consumer.model_id: a.consumer for a in agents}
            if profile is not None:
                for model_id, consumer in consumers.items():
                    publish_profile(client, model_id, consumer.registration.weights_digest, profile)
            for agent in agents:
                agent.selector = StrategySelector.from_service(client, agent.consumer.model_id, target)
            calls = [c for r in range(args.agent_rounds) for c in pipeline.run_round(r, modes, progress)]
        node = client.stats()["counters"]
    return {"benchmark": "agents", "machine": machine(), "workload": args.workload, "model": args.model,
            "task_consumer": args.task_consumer if tuned is not None else None,
            "agent_plan": args.agent_plan if tuned is not None else None,
            "settings": {k: getattr(args, k) for k in ("agents", "agent_rounds", "calibration_rounds", "input_tokens",
                                                       "prefix_tokens", "output_tokens", "context_tokens",
                                                       "answer_tokens", "anchor_gamma", "anchor_temperature",
                                                       "anchor_pool_bytes", "node_memory")},
            "target": {"max_kl": target.max_kl, "min_top1": target.min_top1},
            "profile": profile.to_json() if profile else None,
            "node": {k: node.get(k, 0) for k in ("segment_sources", "segment_hits", "anchors", "anchor_pool_bytes",
                                                   "anchors_admitted", "anchors_evicted")},
            "rows": _rows(args.workload, calls, counts)}


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = max(r["agents"] for r in doc["rows"])
    rows = [r for r in doc["rows"] if r["agents"] == n]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        left.plot([a["agent"] for a in row["per_agent"]], [a["ttft_s"] for a in row["per_agent"]], marker="o",
                  label=row["mode"])
    left.set(xlabel="agent", ylabel="median TTFT (s)", title=f"{doc['workload']}: TTFT per agent ({doc['model']})")
    left.legend(fontsize=8)
    x = range(len(rows))
    right.bar([i - 0.2 for i in x], [r["prompt_speedup"] for r in rows], 0.4, label="prompt speedup vs dense")
    right.bar([i + 0.2 for i in x], [r["reuse_token_rate"] * 10 for r in rows], 0.4, label="reuse token rate x10")
    for i, r in enumerate(rows):
        right.annotate(f"KL {r['first_token_kl']:.3f}", (i, r["prompt_speedup"]), fontsize=7, ha="center",
                       va="bottom")
    right.set_xticks(list(x), [r["mode"] for r in rows], rotation=30, fontsize=8)
    right.set(title=f"{n} agents")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    doc = run(args)
    header = ["workload", "agents", "mode", "reuse tokens", "reuse calls", "TTFT s", "speedup", "last agent",
              "KL (median)", "top-1", "identical", "task score"]
    rows = [[r["workload"], r["agents"], r["mode"], r["reuse_token_rate"], r["reuse_call_rate"], r["ttft_s"],
             r["prompt_speedup"], r.get("last_agent_speedup", ""), r["first_token_kl"], r["top1_agreement"],
             r["identical_rate"],
             "" if r["task_score"] is None else f"{r['task_score']} {r['task_score_ci']}"] for r in doc["rows"]]
    return finish(args.json, doc, plot, header, rows)
