"""arith: multi-step addition word problems, with and without chain-of-thought.

A problem is a start value and ``steps`` additions::

    Ann has 5 pens. First she gets 3 more. Second she gets 7 more. How many pens? A:
    Ann has 5 pens. First she gets 3 more. Second she gets 7 more. How many pens? Steps:

The direct prompt (first) is answered at once (``target`` " 15"); the CoT prompt is
continued with the partial sums and then the answer, as in the training text::

    ... How many pens? Steps: First 5+3=8. Second 8+7=15. A: 15

Each step is named by an ordinal that the question also uses, so a small model finds the
step's operand by matching the ordinal (one induction-style lookup).

``target`` is the final answer (with its leading space) in both; ``answer`` is the number;
``chain`` is the CoT continuation (null for direct). ``extract_answer(generation)`` reads
the answer from a greedy generation. ``spans``: ``numbers`` (from the first number to the
last one in the question) and ``n0``, ``n1``, ... for each number; ``question``.
Both versions of a problem share ``group_id`` (the problem).

The starting number is two-digit by default (10-49) and the numbers added are 1-9: each
chain-of-thought step is then a small addition, while the direct answer needs the whole
sum at once (with small starts a small model learns the direct sum as well, and CoT loses
its edge).

Eval problems are reserved by a seed-independent hash of their numbers; train never
uses them. Numbers are written in digits (the toy tokenizer splits them digit by digit).
"""

from __future__ import annotations

import re

import pandas as pd

from dolm.errors import InputError
from dolm.tasks.base import Family, Option, reserved, rng_for, spans_json

NAMES = [("Ann", "She"), ("Bob", "He"), ("Cat", "She"), ("Dan", "He"), ("Eve", "She"),
         ("Tom", "He"), ("Amy", "She"), ("Sam", "He")]
ITEMS = ["pens", "apples", "coins", "cards", "books", "shells", "stamps", "eggs"]
EVAL_FRACTION = 0.2

_INT = re.compile(r"-?\d+")


def extract_answer(generation: str | None) -> int | None:
    """The final answer in a generation: the first integer after the first "A:", else the
    first integer (a direct answer). None when there is none."""
    if not generation:
        return None
    i = generation.find("A:")
    tail = generation[i + 2:] if i >= 0 else generation
    m = _INT.search(tail)
    return int(m.group()) if m else None


ORDINALS = ["First", "Second", "Third", "Fourth", "Fifth", "Sixth", "Seventh", "Eighth",
            "Ninth", "Tenth", "Eleventh", "Twelfth"]


def chain_text(numbers: list[int]) -> str:
    """The chain-of-thought continuation: one partial sum per step, named by the step's
    ordinal (so the operand is found by matching the ordinal in the question), then the
    answer."""
    total = numbers[0]
    parts = []
    for j, x in enumerate(numbers[1:]):
        parts.append(f"{ORDINALS[j]} {total}+{x}={total + x}.")
        total += x
    return " " + " ".join(parts) + f" A: {total}"


def render(numbers: list[int], name: str, pron: str, item: str, cot: bool) -> tuple[str, dict]:
    text = f"{name} has {numbers[0]} {item}."
    spans = {"n0": [len(name) + 5, len(name) + 5 + len(str(numbers[0]))]}
    for j, x in enumerate(numbers[1:], start=1):
        lead = f" {ORDINALS[j - 1]} {pron.lower()} gets "
        start = len(text) + len(lead)
        text += f"{lead}{x} more."
        spans[f"n{j}"] = [start, start + len(str(x))]
    spans["numbers"] = [spans["n0"][0], spans[f"n{len(numbers) - 1}"][1]]
    q0 = len(text) + 1
    text += f" How many {item}?"
    spans["question"] = [q0, len(text)]
    text += " Steps:" if cot else " A:"
    return text, spans


def _generate(split, seed, tokenizer, n, steps, cot, min_operand, max_operand, start_min,
              start_max):
    if any(s < 1 or s > len(ORDINALS) for s in steps):
        raise InputError(f"--steps: expected values in 1..{len(ORDINALS)}, found {steps}")
    if not 0 <= min_operand <= max_operand:
        raise InputError(f"--max-operand: expected >= --min-operand >= 0, found "
                         f"{min_operand}..{max_operand}")
    if not 0 <= start_min <= start_max:
        raise InputError(f"--start-max: expected >= --start-min >= 0, found "
                         f"{start_min}..{start_max}")
    n = (200 if split == "eval" else 5000) if n is None else n
    if n < 0:
        raise InputError(f"--n: expected >= 0, found {n}")
    rng = rng_for(seed, "arith", split)
    versions = {"both": [False, True], "yes": [True], "no": [False]}[cot]
    rows = []
    for i in range(n):
        k = steps[i % len(steps)]
        for _ in range(10_000):
            numbers = [int(rng.integers(start_min, start_max + 1))] + [
                int(x) for x in rng.integers(min_operand, max_operand + 1, size=k)]
            key = "arith|" + ",".join(map(str, numbers))
            if reserved(key, EVAL_FRACTION) == (split == "eval"):
                break
        else:
            raise InputError(f"--steps {k}: too few distinct problems for the {split} split; "
                             "widen --min-operand/--max-operand")
        name, pron = NAMES[int(rng.integers(len(NAMES)))]
        item = ITEMS[int(rng.integers(len(ITEMS)))]
        answer = sum(numbers)
        pid = f"arith-{split}-{i:05d}"
        for c in versions:
            prompt, spans = render(numbers, name, pron, item, c)
            chain = chain_text(numbers) if c else None
            rows.append({
                "prompt_id": f"{pid}-{'cot' if c else 'direct'}",
                "family": "arith",
                "prompt": prompt,
                "target": f" {answer}",
                "foil": None,
                "choices": None,
                "spans": spans_json(spans),
                "group_id": pid,
                "split": split,
                "text": prompt + (chain if c else f" {answer}"),
                "cot": bool(c),
                "steps": int(k),
                "answer": int(answer),
                "operands": numbers,
                "max_operand": int(max(numbers)),
                "operand_digits": int(max(len(str(x)) for x in numbers)),
                "chain": chain,
            })
    return pd.DataFrame(rows)


FAMILY = Family(
    name="arith",
    help="Multi-step addition word problems, direct and with chain-of-thought.",
    options=[
        Option("n", "int", None, "problems (each gives a direct and/or a CoT row); "
               "default 200 eval, 5000 train"),
        Option("steps", "int_list", [1, 2, 3], "additions per problem (cycled over problems)"),
        Option("cot", "choice", "both", "chain-of-thought rows: both, yes (only CoT), "
               "no (only direct)", choices=("both", "yes", "no")),
        Option("min_operand", "int", 1, "smallest number added at a step"),
        Option("max_operand", "int", 9, "largest number added at a step"),
        Option("start_min", "int", 10, "smallest starting number"),
        Option("start_max", "int", 49, "largest starting number"),
    ],
    fn=_generate,
    columns={
        "cot": "chain-of-thought prompt", "steps": "additions", "answer": "the final number",
        "operands": "the numbers, in order", "max_operand": "largest number",
        "operand_digits": "digits of the longest number",
        "chain": "the CoT continuation (partial sums and answer), null for direct",
    },
)
