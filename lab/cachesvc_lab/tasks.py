"""The repository's own task data: generated, deterministic, nothing downloaded.

**Access-code lookup.** A long shared context lists staff records (name, department,
access code); the question names one person and the answer is their code, alone on the
line, e.g. ``K7Q2``. The context is what a producer prefills once and consumers
reuse; the question is the uncached suffix. The base model reads the records but answers
in prose (or with the wrong code); the fine-tunes learn the terse format and precise
copying, so the task separates a fine-tune from its base and a good reuse plan from a
bad one (a plan that corrupts the context's keys/values makes the copy fail).

Score: exact match of the first answer line with the code (1/0); also reported: whether
the code appears anywhere in the answer (``contains``) and edit similarity.
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

FIRST = ("Ada Alan Alice Amir Ana Ben Bo Carla Chen Dana Dev Eli Emma Eva Femi Gil Hana Ivan Iris "
         "Jon Juno Kai Kim Lars Lea Lin Luca Maya Milo Nia Noor Omar Otto Pia Raj Rosa Sam Sara "
         "Tao Uma Vera Wes Yara Yuki Zane Zoe").split()
LAST = ("Abbott Baker Castro Diaz Evans Fischer Garcia Haddad Ito Jensen Kowalski Lopez Moreau "
        "Nakamura Okafor Petrov Quinn Rossi Silva Tanaka Ueda Varga Weber Xu Young Zhang Berg "
        "Costa Duarte Ekström Farouk Greco Holm Ivanova Jovanovic Kaur Lund Mendes Novak Ortiz").split()
DEPTS = ("Sales", "Finance", "Research", "Legal", "Support", "Logistics", "Design", "Security",
         "Marketing", "Operations")
CODE_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
# Seed offsets: "train", "test" and "profile" never share a seed stream.
SPLITS = {"train": 0, "test": 1_000_003, "profile": 2_000_029}
SYSTEM = "You answer questions about the records you are given."


@dataclass(frozen=True, slots=True)
class Example:
    context: str        # the shared part (records), first in the prompt
    question: str       # the uncached suffix
    answer: str         # the code


def make_code(rng: random.Random) -> str:
    return "".join(rng.choice(CODE_CHARS) for _ in range(4))


def _records(rng: random.Random, num_records: int) -> list[tuple[str, str, str, str]]:
    """(first, last, department, code) of ``num_records`` distinct people, in context order."""
    names: set[tuple[str, str]] = set()
    while len(names) < num_records:
        names.add((rng.choice(FIRST), rng.choice(LAST)))
    # sorted() first: a set of str iterates in an order that changes with PYTHONHASHSEED
    # (every process), which made "seeded" datasets differ from run to run.
    shuffled = sorted(sorted(names), key=lambda _: rng.random())
    return [(first, last, rng.choice(DEPTS), make_code(rng)) for first, last in shuffled]


def _context(records: list[tuple[str, str, str, str]]) -> str:
    return "Staff records:\n" + "\n".join(
        f"Record {i + 1}: {f} {l_}, {d} department, access code {c}." for i, (f, l_, d, c) in enumerate(records))


def _ask(context: str, record: tuple[str, str, str, str]) -> Example:
    first, last, _, code = record
    return Example(context, f"Access code of {first} {last}?", code)


def make_example(rng: random.Random, num_records: int) -> Example:
    records = _records(rng, num_records)
    return _ask(_context(records), rng.choice(records))


def make_questions(rng: random.Random, num_records: int, questions: int) -> list[Example]:
    """``questions`` examples over one shared context, each about a different person
    (``questions`` ≤ ``num_records``): what a producer prefills once and several
    consumers' requests reuse."""
    records = _records(rng, num_records)
    context = _context(records)
    return [_ask(context, record) for record in rng.sample(records, questions)]


def dataset(split: str, count: int, num_records: int, seed: int = 0) -> list[Example]:
    """``count`` examples, each with its own context."""
    rng = random.Random(seed * 7919 + SPLITS[split])
    return [make_example(rng, num_records) for _ in range(count)]


def messages(example: Example) -> list[dict]:
    """Chat messages with the context first, so every prompt over it shares a prefix."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{example.context}\n\n{example.question}"}]


def prompt_ids(tokenizer, example: Example) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        # A base model (Gemma 3 270M's GGUF has no template): the same messages as plain text.
        return list(tokenizer.encode("\n\n".join(m["content"] for m in messages(example)) + "\nAnswer:"))
    ids = tokenizer.apply_chat_template(messages(example), add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):   # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def context_ids(tokenizer, example: Example) -> list[int]:
    """The prompt's tokens up to the end of the context: what a producer stores. Cut at a
    line end (a context ending mid-token makes models emit junk)."""
    full = prompt_ids(tokenizer, example)
    marker = tokenizer.encode("\n\n" + example.question, add_special_tokens=False)
    for cut in range(len(full) - len(marker), 0, -1):
        if full[cut:cut + 2] == marker[:2]:
            return full[:cut]
    return full


@dataclass(frozen=True, slots=True)
class Score:
    exact: float
    contains: float
    edit_similarity: float


def score(answer: str, expected: str) -> Score:
    first = answer.strip().splitlines()[0].strip() if answer.strip() else ""
    return Score(float(first == expected), float(expected in answer),
                 difflib.SequenceMatcher(None, first, expected).ratio())


TOKENS_PER_RECORD = 21.5   # SmolLM2's tokenizer on these records (measured; only a first guess)


def _records_for(tokenizer, split: str, context_tokens: int, seed: int) -> int:
    """Records per context for contexts about ``context_tokens`` long (within one record),
    calibrated on one example."""
    records = max(2, round((context_tokens - 20) / TOKENS_PER_RECORD))
    probe = dataset(split, 1, records, seed)[0]
    measured = len(context_ids(tokenizer, probe))
    return max(2, round(records * context_tokens / measured))


def sized_dataset(tokenizer, split: str, count: int, context_tokens: int, seed: int = 0) -> list[Example]:
    """``count`` examples whose contexts are about ``context_tokens`` long, each its own."""
    return dataset(split, count, _records_for(tokenizer, split, context_tokens, seed), seed + context_tokens)


def sized_questions(tokenizer, split: str, prompts: int, questions: int, context_tokens: int,
                    seed: int = 0) -> list[Example]:
    """``prompts`` examples (rounded up to whole contexts), ``questions`` consecutive ones
    per context (each about a different person), contexts about ``context_tokens`` long:
    the shape of real traffic (one shared context, several requests over it), and
    ``questions`` times fewer prefills to measure."""
    records = _records_for(tokenizer, split, context_tokens, seed)
    # Its own stream (+ 17): not the same contexts as sized_dataset's examples.
    rng = random.Random((seed + context_tokens) * 7919 + SPLITS[split] + 17)
    return [e for _ in range(-(-prompts // questions)) for e in make_questions(rng, records, questions)]


def write_jsonl(path: str | Path, examples: list[Example]) -> None:
    Path(path).write_text("".join(json.dumps(asdict(e)) + "\n" for e in examples))


def read_jsonl(path: str | Path) -> list[Example]:
    """Examples from a JSONL file of {"context", "question", "answer"} objects (the answer
    may be empty where only fidelity to the consumer is scored)."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                doc = json.loads(line)
                out.append(Example(doc["context"], doc["question"], doc.get("answer", "")))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: not a {{context, question, answer}} object: {exc}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write access-code examples as JSONL (profiling data)")
    parser.add_argument("--split", default="profile", choices=["train", "test", "profile"])
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--records", type=int, default=25, help="records per context (~21.5 tokens each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("out", help="JSONL file to write ('-' for stdout)")
    args = parser.parse_args(argv)
    examples = dataset(args.split, args.count, args.records, args.seed)
    if args.out == "-":
        sys.stdout.writelines(json.dumps(asdict(e)) + "\n" for e in examples)
    else:
        write_jsonl(args.out, examples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
