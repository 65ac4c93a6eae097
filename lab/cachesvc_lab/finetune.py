"""The fine-tuned consumers of SmolLM2: LoRA adapters on the access-code task.

The repository ships each consumer's adapter (``cachesvc_lab/adapters/NAME.safetensors``,
bf16, with ``NAME.json`` stating its recipe, the adapter file's sha256 and the merged
weights' digest). :func:`ensure` merges a shipped adapter into SmolLM2 once and caches the
merged model beside SmolLM2's conversion, so a fresh machine needs no training.
``python -m cachesvc_lab.finetune [NAME ...]`` (``make finetune``) retrains adapters from
their recipes and writes them into the package.

**Why the digest is the same on every machine.** The merge runs in float64: each product
of two bf16 values is exact in float64 (8 + 8 significant bits), and so is a sum of
``rank`` of them, whatever order a BLAS kernel adds them in; adding that to the fp32 base
weight and rounding once to fp32 is one IEEE operation per element. The base weights are
the GGUF's dequantization (elementwise, exact). So the merged weights, and their digest,
are bit-identical across CPUs, and a profile measured on one machine stays valid on another.
Training itself is deterministic only on one machine (fixed seeds and thread count).

LoRA is written out here (a few lines) rather than taken from peft: the adapters are
merged into plain ``LlamaForCausalLM`` weights, so consumers load like any other model and
the connector's family check sees the base's family.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AttentionInterface

from cachesvc_connectors.hf.family import weights_digest
from cachesvc_lab import smollm2, tasks

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = Path(__file__).parent / "adapters"       # shipped with the package
ADAPTER_DTYPE = torch.bfloat16                        # exact products in float64 (see above)


@dataclass(frozen=True)
class Recipe:
    name: str
    layers: tuple[int, int]          # decoder layers [start, stop) that get adapters
    rank: int = 16
    alpha: float = 32.0
    projections: tuple[str, ...] = PROJECTIONS
    steps: int = 240
    questions: int = 8               # questions per training context (one prefill, a batch of answers)
    lr: float = 1e-3
    # Records per training context, log-uniform: 24..190 records is ~530..4100 tokens, the
    # lengths the benchmarks use (contexts of 8..30 records taught a consumer that fails at 2048).
    min_records: int = 24
    max_records: int = 190
    # Contexts drawn once and cycled through (shuffled per epoch), the hidden state entering
    # the first adapted layer computed once per context: layers below the adapters are
    # frozen, so it never changes, and an upper-third recipe then costs a third of a step.
    # 0 draws a fresh context every step.
    pool: int = 0
    seed: int = 0
    threads: int = 2


RECIPES = {
    # The common case: a LoRA over every layer.
    "codes-all": Recipe("codes-all", (0, 30), steps=100),
    # Adapted on the upper third only: its critical layers are known to be 20..29.
    # Adapters on a third of the layers learn the task more slowly: SmolLM2 itself cannot
    # find a code in its context (2 of 18 at 830 tokens, even prompted with "The access code
    # of NAME is"), so layers 20-29 must learn the whole lookup. 200 steps of fresh
    # contexts (8 questions each) reached 0.44 exact at 2048 tokens; a pool of 90 contexts
    # whose layers 0-19 run once (a step a third as dear) with 16 questions each reached
    # 0.73 at 2048 and 0.40 at 4096 at a training loss of 0.07: it learnt its 1440 answers
    # rather than the lookup. Questions are cheap beside their context (~25 tokens against
    # 500-4000), so each context asks 48: over 120 contexts of 32-200 records that reached
    # 0.93 at 2048 but 0.73 at 4096. A pool of 200 contexts of 48-200 records (~1050-4300
    # tokens; each seen 1.8 times in 360 steps) reached 0.93 at 2048 and 0.83 at 4096 at a
    # training loss of 0.13: fewer repeats, less memorised, more lookup (docs/results.md).
    "codes-upper": Recipe("codes-upper", (20, 30), steps=360, questions=48, pool=200, lr=2e-3,
                          min_records=48, max_records=200),
}


class LoRALinear(torch.nn.Module):
    """``base(x) + scale · B(A(x))`` with A ~ Kaiming, B = 0 (starts as the base)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(torch.empty(rank, base.in_features))
        self.b = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        torch.nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale


def _targets(model, recipe: Recipe):
    """(adapter name, parent module, attribute) of every adapted projection, in order."""
    for index in range(*recipe.layers):
        layer = model.model.layers[index]
        for block_name, block in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for proj in recipe.projections:
                if hasattr(block, proj):
                    yield f"layers.{index}.{block_name}.{proj}", block, proj


def _adapt(model, recipe: Recipe) -> dict[str, LoRALinear]:
    adapters = {}
    for name, block, proj in _targets(model, recipe):
        lora = LoRALinear(getattr(block, proj), recipe.rank, recipe.alpha)
        setattr(block, proj, lora)
        adapters[name] = lora
    return adapters


def merge(model, recipe: Recipe, tensors: dict[str, torch.Tensor]) -> None:
    """Add ``scale · B @ A`` of every adapter in ``tensors`` (``NAME.a`` / ``NAME.b``, bf16)
    to ``model``'s fp32 weights, in float64 (bit-identical on every CPU: module docstring)."""
    scale = recipe.alpha / recipe.rank
    with torch.no_grad():
        for name, block, proj in _targets(model, recipe):
            linear = getattr(block, proj)
            delta = tensors[f"{name}.b"].double() @ tensors[f"{name}.a"].double()
            linear.weight.copy_((linear.weight.double() + delta * scale).to(linear.weight.dtype))


@dataclass(frozen=True)
class Packed:
    """Several questions over one context as one sequence: the context's tokens, then per
    question the prompt's remainder, the answer and its end-of-turn token. Each question
    block sits at the positions right after the context and attends to the context and
    (causally) to itself only, so it is exactly that question's own prompt; the context is
    computed once for all of them. All tensors are 1 × tokens (the mask 1 × 1 × t × t)."""
    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor                # bool, True where a query may attend to a key
    labels: torch.Tensor              # -100 except on answer tokens, aligned to ids
    context: int = 0                  # the shared context's tokens, first in ``ids``


def pack(tokenizer, examples: list[tasks.Example]) -> Packed:
    """``examples`` must share their context (``tasks.make_questions``)."""
    context = tasks.context_ids(tokenizer, examples[0])
    n = len(context)
    ids, positions, labels, block = list(context), list(range(n)), [-100] * n, [0] * n
    for number, example in enumerate(examples, 1):
        prompt = tasks.prompt_ids(tokenizer, example)
        if prompt[:n] != context:
            raise ValueError("the question's prompt does not extend the shared context's tokens")
        answer = tokenizer.encode(example.answer + "<|im_end|>", add_special_tokens=False)
        rest = prompt[n:] + answer
        ids += rest
        positions += range(n, n + len(rest))
        labels += [-100] * (len(prompt) - n) + answer
        block += [number] * len(rest)
    blocks = torch.tensor(block)
    order = torch.arange(len(ids))
    mask = (order[None, :] <= order[:, None]) & ((blocks[None, :] == 0) | (blocks[None, :] == blocks[:, None]))
    return Packed(torch.tensor([ids]), torch.tensor([positions]), mask[None, None], torch.tensor(labels), n)


PACKED_ATTENTION = "cachesvc_packed"


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     context: int = 0, **_):
    """Attention over a :class:`Packed` sequence, split where the block mask has structure.

    The context's rows attend causally to the context alone: SDPA's ``is_causal`` kernel,
    with no mask. Only the question rows (a few hundred against thousands of context
    tokens) go through the block mask. The result equals one masked SDPA over the whole
    sequence; with one, a 4K-token context put every step on SDPA's math path over a t × t
    mask, most of a step's time. Registered as an ``AttentionInterface``, so a model runs
    it after ``model.set_attn_implementation(PACKED_ATTENTION)``; shapes are HF's
    (batch, heads, tokens, head_dim) in and (batch, tokens, heads, head_dim) out."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    parts = [sdpa(query[:, :, :context], key[:, :, :context], value[:, :, :context],
                  is_causal=True, scale=scaling)] if context else []
    if query.shape[2] > context:
        parts.append(sdpa(query[:, :, context:], key, value, attn_mask=attention_mask[..., context:, :],
                          scale=scaling))
    return torch.cat(parts, 2).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, packed_attention)


def _run_layers(model, hidden: torch.Tensor, packed: Packed, start: int, stop: int) -> torch.Tensor:
    """Decoder layers [start, stop) over a packed sequence (its positions and block mask)."""
    inner = model.model
    rotary = inner.rotary_emb(hidden, packed.positions)
    for layer in inner.layers[start:stop]:
        hidden = layer(hidden, attention_mask=packed.mask, position_embeddings=rotary,
                       position_ids=packed.positions, context=packed.context)
    return hidden


def entering(model, packed: Packed, layer: int) -> torch.Tensor:
    """The hidden state entering decoder ``layer`` (no gradients: the layers below it are frozen)."""
    with torch.no_grad():
        return _run_layers(model, model.model.embed_tokens(packed.ids), packed, 0, layer)


def _loss(model, packed: Packed, start: int = 0, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens, running layers ``start`` and up from
    ``hidden`` (:func:`entering`; the embeddings when ``start`` is 0). A label's
    predecessor is always in its own block (every block starts with prompt tokens), so
    the plain one-token shift is right."""
    if hidden is None:
        hidden = model.model.embed_tokens(packed.ids)
    hidden = model.model.norm(_run_layers(model, hidden, packed, start, len(model.model.layers)))[0]
    scored = packed.labels[1:] != -100
    logits = model.lm_head(hidden[:-1][scored])      # only the scored rows: the vocabulary is 49k wide
    return torch.nn.functional.cross_entropy(logits, packed.labels[1:][scored])


def _draw(rng: random.Random, tokenizer, recipe: Recipe) -> Packed:
    records = round(math.exp(rng.uniform(math.log(recipe.min_records), math.log(recipe.max_records))))
    # A short context has fewer people than a long recipe asks about: ask each of them once.
    return pack(tokenizer, tasks.make_questions(rng, records, min(recipe.questions, records)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(recipe: Recipe, out_dir: Path = ADAPTERS) -> Path:
    """Train ``recipe``'s adapter and write ``NAME.safetensors`` + ``NAME.json`` into
    ``out_dir``; returns the adapter's path."""
    from safetensors.torch import save_file
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    model, tokenizer = smollm2.load()
    model.set_attn_implementation(PACKED_ATTENTION)
    for param in model.parameters():
        param.requires_grad_(False)
    adapters = _adapt(model, recipe)
    params = [p for a in adapters.values() for p in (a.a, a.b)]
    optim = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    rng = random.Random(recipe.seed)
    model.train()
    t0, losses = time.perf_counter(), []
    start = recipe.layers[0]
    pool: list[tuple[Packed, torch.Tensor | None]] = []
    for _ in tqdm(range(recipe.pool), desc=f"contexts, layers 0-{start - 1}", unit="context"):
        packed = _draw(rng, tokenizer, recipe)
        pool.append((packed, entering(model, packed, start) if start else None))
    order: list[int] = []
    bar = tqdm(range(recipe.steps), desc=f"fine-tune {recipe.name}", unit="step")
    for step in bar:
        lr = recipe.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for group in optim.param_groups:
            group["lr"] = lr
        optim.zero_grad()
        if pool:
            if not order:
                order = rng.sample(range(len(pool)), len(pool))
            packed, hidden = pool[order.pop()]
            loss = _loss(model, packed, start if hidden is not None else 0, hidden)
        else:
            loss = _loss(model, _draw(rng, tokenizer, recipe))
        loss.backward()
        losses.append(loss.item())
        optim.step()
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    tensors = {f"{name}.{part}": getattr(lora, part).detach().to(ADAPTER_DTYPE).contiguous()
               for name, lora in adapters.items() for part in ("a", "b")}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{recipe.name}.safetensors"
    save_file(tensors, str(path))
    base, _ = smollm2.load()
    merge(base, recipe, tensors)
    (out_dir / f"{recipe.name}.json").write_text(json.dumps(
        {**asdict(recipe), "base": smollm2.NAME, "adapter_sha256": _sha256(path),
         "weights_digest": weights_digest(base), "train_s": round(time.perf_counter() - t0, 1),
         "final_loss": round(sum(losses[-20:]) / 20, 4)}, indent=2) + "\n")
    return path


def shipped(name: str, adapters: Path = ADAPTERS) -> tuple[Recipe, dict]:
    """The recipe and metadata of a shipped adapter; raises FileNotFoundError if absent and
    ValueError if its file does not match the recorded sha256 or the recipe changed."""
    meta = json.loads((adapters / f"{name}.json").read_text())
    recipe = RECIPES[name]
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items() if k in asdict(recipe)}
    if saved != asdict(recipe):
        raise ValueError(f"adapter {name}: trained with another recipe than RECIPES[{name!r}]: "
                         f"run `make finetune`")
    if _sha256(adapters / f"{name}.safetensors") != meta["adapter_sha256"]:
        raise ValueError(f"adapter {name}: file does not match its recorded sha256")
    return recipe, meta


def path_of(name: str) -> Path:
    return smollm2.model_dir() / name


def ensure(names: list[str] | None = None, adapters: Path = ADAPTERS) -> dict[str, Path]:
    """The merged consumers' directories, merging a shipped adapter into SmolLM2 where the
    cache does not hold it yet (a few seconds each). The cached copy is keyed by the
    adapter's sha256; the merged weights must reproduce the shipped digest."""
    from safetensors.torch import load_file
    out = {}
    for name in names or list(RECIPES):
        recipe, meta = shipped(name, adapters)
        path = path_of(name)
        try:
            if json.loads((path / "adapter.json").read_text())["adapter_sha256"] == meta["adapter_sha256"]:
                out[name] = path
                continue
        except (OSError, ValueError, KeyError):
            pass
        model, tokenizer = smollm2.load()
        merge(model, recipe, load_file(str(adapters / f"{name}.safetensors")))
        digest = weights_digest(model)
        if digest != meta["weights_digest"]:
            raise RuntimeError(f"{name}: merged weights digest {digest[:16]} differs from the shipped "
                               f"{meta['weights_digest'][:16]} (a different SmolLM2 conversion?)")
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "adapter.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        out[name] = path
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="retrain the fine-tunes' adapters from their recipes")
    parser.add_argument("names", nargs="*", help=f"recipes: {', '.join(RECIPES)} (default: all)")
    parser.add_argument("--out", type=Path, default=ADAPTERS, help="adapter folder (default: the package's)")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(RECIPES)
    if unknown:
        parser.error(f"unknown recipes: {', '.join(sorted(unknown))}")
    for name in args.names or list(RECIPES):
        print(f"{name}: {train(RECIPES[name], args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
