"""formats: instruction tasks at three difficulties, each asked in three formats.

Task types (all answers are one short token: a digit, a letter, " even"/" odd"):

- ``count``: how many times a letter occurs in a list (length 4/6/8);
- ``max``: the largest digit in a list (length 3/5/7);
- ``add``: the sum of 2/3/4 digits (sum at most 9);
- ``parity``: whether a 2/3/4-digit number is even or odd;
- ``last``: the last letter of a list (length 3/5/7).

Formats: ``direct`` ("Count the a in: a b a c. Answer:"), ``polite`` ("Here is a list:
a b a c. Could you please count the a in it? Answer:" — input first, request after),
``fewshot`` (``shots`` solved direct examples of the
same task and difficulty, then the query in the direct format).

A unit is one task instance. Designs:

- ``experiment``: every unit in every format (3 rows per unit, ``group_id`` = ``unit_id``);
  all potential outcomes are observed, so the per-format effect is known.
- ``observational``: the same units (same seed and ``n``), one format each, assigned with
  probabilities softmax(s*z*(-1, 0, +1)) over (direct, polite, fewshot), where z is the
  mean of the standardised difficulty and input length, s = ``confounding``: harder and
  longer tasks get few-shot more often. ``propensity`` is the probability of the format
  received; ``ps_direct``/``ps_polite``/``ps_fewshot`` are all three.

Train rows: units from the training pool, one format each drawn with ``format_weights``
(unequal weights give the toy model a real format effect).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dolm.errors import InputError
from dolm.tasks.base import Family, Option, reserved, rng_for, simple_token_count, spans_json
from dolm.tasks.base import token_count as _token_count

TASK_TYPES = ("count", "max", "add", "parity", "last")
FORMATS = ("direct", "polite", "fewshot")
EVAL_FRACTION = 0.25
_LETTERS = "abcdefghjkmnpqrstuvwxyz"


def _instance(task: str, difficulty: int, rng: np.random.Generator) -> tuple[str, str, str, str]:
    """(instruction, polite request, input, answer) of one random instance."""
    d = difficulty
    if task == "count":
        length = 2 + 2 * d
        letters = rng.choice(list("abcd"), size=length)
        q = str(rng.choice(list("abcd")))
        return (f"count the {q} in", f"Here is a list: {{}}. Could you please count the {q} "
                "in it?", " ".join(letters), " " + str(int((letters == q).sum())))
    if task == "max":
        digits = rng.integers(0, 10, size=1 + 2 * d)
        return ("find the largest in", "Here is a list: {}. Could you please find the largest "
                "in it?", " ".join(map(str, digits)), " " + str(int(digits.max())))
    if task == "add":
        k = 1 + d
        while True:
            digits = rng.integers(0, 10, size=k)
            if digits.sum() <= 9:
                break
        return ("add", "Here are numbers: {}. Could you please add them?",
                " ".join(map(str, digits)), " " + str(int(digits.sum())))
    if task == "parity":
        num = int(rng.integers(10 ** d, 10 ** (d + 1)))
        return ("say if even or odd", "Here is a number: {}. Could you please say if it is "
                "even or odd?", str(num), " even" if num % 2 == 0 else " odd")
    if task == "last":
        letters = rng.choice(list(_LETTERS), size=1 + 2 * d)
        return ("give the last letter of", "Here is a list: {}. Could you please give the last "
                "letter of it?", " ".join(letters), " " + str(letters[-1]))
    raise ValueError(task)


def _direct(instr: str, inp: str) -> str:
    return f"{instr[0].upper()}{instr[1:]}: {inp}. Answer:"


def render(fmt: str, instr: str, inp: str, examples: list[tuple[str, str, str]],
           polite: str | None = None) -> tuple[str, dict]:
    """Prompt text and spans (``input``; ``examples`` for few-shot).

    ``polite`` is the polite request with ``{}`` where the input goes (the input comes
    first, then the request: a different layout from the direct command)."""
    if fmt == "direct":
        p = _direct(instr, inp)
        pre = ""
    elif fmt == "polite":
        if polite is None:
            polite = f"Could you please {instr}: {{}}?"
        p = polite.format(inp) + " Answer:"
        start = polite.index("{}")
        return p, {"input": [start, start + len(inp)]}
    elif fmt == "fewshot":
        # each example with its own instruction (count examples may ask another letter)
        pre = "".join(_direct(e_instr, ei) + ea + "\n" for e_instr, ei, ea in examples)
        p = pre + _direct(instr, inp)
    else:
        raise ValueError(fmt)
    start = p.rfind(": " + inp) + 2
    spans = {"input": [start, start + len(inp)]}
    if pre:
        spans["examples"] = [0, len(pre) - 1]
    return p, spans


def _draw(task, difficulty, rng, split):
    """An instance from the split's pool (eval: hash-reserved instances; train: the rest)."""
    for _ in range(10_000):
        instr, polite, inp, ans = _instance(task, difficulty, rng)
        is_eval = reserved(f"formats|{task}|{inp}", EVAL_FRACTION)
        if is_eval == (split == "eval"):
            return instr, polite, inp, ans
    raise RuntimeError(f"no {split} instance for {task}/{difficulty}")


def _generate(split, seed, tokenizer, n, design, confounding, task_types, difficulties, shots,
              format_weights):
    if any(d not in (1, 2, 3) for d in difficulties):
        raise InputError(f"--difficulties: expected values in 1,2,3, found {difficulties}")
    if shots < 1:
        raise InputError(f"--shots: expected >= 1, found {shots}")
    if len(format_weights) != 3 or min(format_weights) < 0 or sum(format_weights) <= 0:
        raise InputError("--format-weights: expected three non-negative weights for "
                         f"direct,polite,fewshot, found {format_weights}")
    n = (150 if split == "eval" else 3000) if n is None else n
    if n < 1:
        raise InputError(f"--n: expected >= 1, found {n}")
    rng = rng_for(seed, "formats", split, "units")
    cells = [(t, d) for t in task_types for d in difficulties]
    order = rng.permutation(n) % len(cells)  # balanced cells, random order
    units = []
    for i in range(n):
        task, diff = cells[order[i]]
        instr, polite, inp, ans = _draw(task, diff, rng, split)
        # few-shot examples always come from the training pool (solved examples)
        examples = []
        for _ in range(shots):
            e_instr, _, ei, ea = _draw(task, diff, rng, "train")
            examples.append((e_instr, ei, ea))
        units.append(dict(unit_id=f"formats-{split}-u{i:05d}", task_type=task, difficulty=diff,
                          instruction=instr, polite=polite, input=inp, answer=ans,
                          examples=examples, input_length=simple_token_count(inp)))

    # assignment (observational / train) uses its own stream, so units do not depend on it
    arng = rng_for(seed, "formats", split, "assign", design)
    diff_arr = np.array([u["difficulty"] for u in units], dtype=float)
    len_arr = np.array([u["input_length"] for u in units], dtype=float)

    def _z(a):
        sd = a.std()
        return (a - a.mean()) / sd if sd > 0 else a * 0.0

    z = (_z(diff_arr) + _z(len_arr)) / 2
    logits = confounding * np.outer(z, [-1.0, 0.0, 1.0])
    ps = np.exp(logits - logits.max(axis=1, keepdims=True))
    ps /= ps.sum(axis=1, keepdims=True)
    if split == "train":
        w = np.asarray(format_weights, dtype=float)
        ps = np.tile(w / w.sum(), (n, 1))

    rows = []
    for i, u in enumerate(units):
        if split == "eval" and design == "experiment":
            fmts = list(FORMATS)
        else:
            fmts = [FORMATS[int(arng.choice(3, p=ps[i]))]]
        for fmt in fmts:
            prompt, spans = render(fmt, u["instruction"], u["input"], u["examples"],
                                   u["polite"])
            row = {
                "prompt_id": f"{u['unit_id']}-{fmt}",
                "family": "formats",
                "prompt": prompt,
                "target": u["answer"],
                "foil": None,
                "choices": None,
                "spans": spans_json(spans),
                "group_id": u["unit_id"],
                "split": split,
                "text": prompt + u["answer"],
                "unit_id": u["unit_id"],
                "task_type": u["task_type"],
                "difficulty": int(u["difficulty"]),
                "format": fmt,
                "design": design if split == "eval" else "train",
                "input_length": int(u["input_length"]),
                "prompt_length": (_token_count(tokenizer, prompt) if tokenizer is not None
                                  else simple_token_count(prompt)),
                "propensity": float(ps[i, FORMATS.index(fmt)]),
                "ps_direct": float(ps[i, 0]),
                "ps_polite": float(ps[i, 1]),
                "ps_fewshot": float(ps[i, 2]),
            }
            rows.append(row)
    return pd.DataFrame(rows)


FAMILY = Family(
    name="formats",
    help="Instruction tasks at three difficulties in three formats (direct, polite, few-shot).",
    options=[
        Option("n", "int", None, "units (task instances); default 150 eval, 3000 train"),
        Option("design", "choice", "experiment", "experiment: every unit in every format; "
               "observational: one format per unit, confounded", choices=("experiment",
                                                                          "observational")),
        Option("confounding", "float", 1.5, "strength of confounding by difficulty and length "
               "(observational design; 0 = randomised)"),
        Option("task_types", "str_list", list(TASK_TYPES), "task types", choices=TASK_TYPES),
        Option("difficulties", "int_list", [1, 2, 3], "difficulty levels (1-3)"),
        Option("shots", "int", 2, "solved examples in the few-shot format"),
        Option("format_weights", "float_list", [0.6, 0.1, 0.3],
               "train split: share of direct,polite,fewshot rows"),
    ],
    fn=_generate,
    columns={
        "unit_id": "the task instance (shared by its formats)", "task_type": "task type",
        "difficulty": "1-3", "format": "direct/polite/fewshot",
        "design": "experiment/observational (train rows: train)",
        "input_length": "length of the task input (simple tokens)",
        "prompt_length": "prompt length in tokens (the tokenizer's when given, else simple)",
        "propensity": "probability of the format received",
        "ps_direct": "P(direct)", "ps_polite": "P(polite)", "ps_fewshot": "P(fewshot)",
    },
)
