"""Make the fine-tuned consumers of SmolLM2: LoRA on the access-code task, merged, cached.

``python -m cachesvc_connectors.models.finetune [NAME ...]`` trains what is not cached yet.
Each consumer is a recipe (below): LoRA rank, target projections, which decoder layers,
steps, learning rate, data seed. Training is deterministic for a recipe on one machine
(fixed seeds, fixed thread count), and the recipe is saved beside the merged weights
(``recipe.json``, with the weights digest), so each model is stated exactly.

LoRA is written out here (a few lines) rather than taken from peft: the adapters are
merged into plain ``LlamaForCausalLM`` weights at the end, so consumers load like any
other model, and the connector's family check sees the same family as the base.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cachesvc_connectors.hf.family import weights_digest
from cachesvc_connectors.models import smollm2, tasks

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Recipe:
    name: str
    layers: tuple[int, int]          # decoder layers [start, stop) that get adapters
    rank: int = 16
    alpha: float = 32.0
    projections: tuple[str, ...] = PROJECTIONS
    steps: int = 240
    batch: int = 1
    lr: float = 1e-3
    min_records: int = 8             # records per training context, drawn uniformly
    max_records: int = 30
    seed: int = 0
    threads: int = 2


RECIPES = {
    # The common case: a LoRA over every layer.
    "codes-all": Recipe("codes-all", (0, 30)),
    # Adapted on the upper third only: its critical layers are known to be 20..29.
    # Adapters on a third of the layers learn the task more slowly: 240 steps reached 0.30
    # exact match against 0.90 for codes-all, too coarse to tell plans apart.
    "codes-upper": Recipe("codes-upper", (20, 30), steps=600),
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

    def merged(self) -> torch.nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.b @ self.a) * self.scale
        return self.base


def _adapt(model, recipe: Recipe) -> list[LoRALinear]:
    adapters = []
    for layer in model.model.layers[recipe.layers[0]:recipe.layers[1]]:
        for block in (layer.self_attn, layer.mlp):
            for name in recipe.projections:
                if hasattr(block, name):
                    lora = LoRALinear(getattr(block, name), recipe.rank, recipe.alpha)
                    setattr(block, name, lora)
                    adapters.append(lora)
    return adapters


def _merge(model, recipe: Recipe) -> None:
    for layer in model.model.layers[recipe.layers[0]:recipe.layers[1]]:
        for block in (layer.self_attn, layer.mlp):
            for name in recipe.projections:
                if isinstance(getattr(block, name, None), LoRALinear):
                    setattr(block, name, getattr(block, name).merged())


def _example_tensors(tokenizer, example: tasks.Example) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and labels (-100 except on the answer and its end-of-turn token)."""
    prompt = tasks.prompt_ids(tokenizer, example)
    answer = tokenizer.encode(example.answer + "<|im_end|>", add_special_tokens=False)
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    return ids, labels


def _trained_with(path: Path, recipe: Recipe) -> bool:
    try:
        saved = json.loads((path / "recipe.json").read_text())
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in asdict(recipe).items())


def path_of(name: str) -> Path:
    return smollm2.model_dir() / name


def train(recipe: Recipe) -> Path:
    """Train, merge and save ``recipe``'s consumer (skipped when already cached)."""
    out = path_of(recipe.name)
    if _trained_with(out, recipe):
        return out
    if out.exists():   # made by another recipe: replace it
        shutil.rmtree(out)
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    model, tokenizer = smollm2.load()
    for param in model.parameters():
        param.requires_grad_(False)
    adapters = _adapt(model, recipe)
    params = [p for a in adapters for p in (a.a, a.b)]
    optim = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    rng = random.Random(recipe.seed)
    model.train()
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(recipe.steps), desc=f"fine-tune {recipe.name}", unit="step")
    for step in bar:
        lr = recipe.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        for group in optim.param_groups:
            group["lr"] = lr
        optim.zero_grad()
        for _ in range(recipe.batch):
            example = tasks.make_example(rng, rng.randint(recipe.min_records, recipe.max_records))
            ids, labels = _example_tensors(tokenizer, example)
            loss = model(input_ids=ids, labels=labels).loss / recipe.batch
            loss.backward()
            losses.append(loss.item() * recipe.batch)
        optim.step()
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    _merge(model, recipe)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "recipe.json").write_text(json.dumps(
        {**asdict(recipe), "base": smollm2.NAME, "weights_digest": weights_digest(model),
         "train_s": round(time.perf_counter() - t0, 1), "final_loss": round(sum(losses[-20:]) / 20, 4)},
        indent=2))
    tmp.rename(out)
    return out


def ensure(names: list[str] | None = None) -> dict[str, Path]:
    """The consumers' directories, training the missing ones."""
    return {name: train(RECIPES[name]) for name in (names or list(RECIPES))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"recipes: {', '.join(RECIPES)} (default: all)")
    args = parser.parse_args(argv)
    unknown = set(args.names) - set(RECIPES)
    if unknown:
        parser.error(f"unknown recipes: {', '.join(sorted(unknown))}")
    for name, path in ensure(args.names).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
