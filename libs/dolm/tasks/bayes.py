"""bayes: draws from one of two generators; the exact posterior predictive is the truth.

Generative story: a bag is picked, A with probability ``prior`` (P(X)=``p_a``) or B
(P(X)=``p_b``); then draws " X"/" Y" are made from it. The prompt is a header and the
draws, and the next token is the next draw::

    Draws from one bag: X Y X X Y X X X Y X

``target`` is always " X" (``foil`` " Y", ``choices`` [" X", " Y"]); ``posterior_x`` is
the exact posterior predictive P(next = X | draws). Templates (the header):

- ``base`` — "Draws from one bag:"; Bayes as above.
- ``independent`` — "Draws, new bag each time:"; each draw comes from a freshly picked
  bag, so the draws carry no information: P(X) = prior*p_a + (1-prior)*p_b throughout.
- ``order_irrelevant`` — "Draws from one bag, order irrelevant:"; same truth as base.

``distractors`` puts the sentence "The sky is blue." k times before the header; the truth
does not change. ``symbol_swap`` adds the same prompts written with A/B instead of X/Y
(then ``target`` is " A", and ``posterior_x`` is P(next = A)).

The counterfactual is the mirrored evidence (X and Y exchanged) in the same template;
``cf_posterior_x`` is its truth.

Evaluation sequences are reserved by a seed-independent hash of the draw sequence (and
closed under mirroring), per length ``n_draws``; eval rows only use reserved sequences,
and training sequences never start with a reserved sequence of that length. Train rows
are sequences of ``train_draws`` draws whose prompt is the header alone (so the draws
are all continuation; ``sequence`` holds them, ``posterior_x`` is the prior predictive of
the first draw), sampled from the generative story
(``sampling=generative``) or with a uniform number of X (``sampling=uniform``: use the
exact soft targets from ``soft_targets`` then, since the hard next tokens are not drawn
from the Bayes predictive).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

from dolm.errors import InputError
from dolm.tasks.base import Family, Option, rng_for, spans_json, stable_hash

TEMPLATES = {
    "base": "Draws from one bag:",
    "independent": "Draws, new bag each time:",
    "order_irrelevant": "Draws from one bag, order irrelevant:",
}
DISTRACTOR = "The sky is blue."
SYMBOLS = {"XY": ("X", "Y"), "AB": ("A", "B")}

RESERVE_MIN = 20  # multisets with at most this many orderings are wholly eval
RESERVE_FRACTION = 1 / 8
_ENUMERATE_MAX = 5000


# ------------------------------------------------------------------ exact probabilities


def _as_bits(tokens: Iterable) -> list[int]:
    if isinstance(tokens, str):
        tokens = [c for c in tokens if not c.isspace()]
    bits = []
    for t in tokens:
        if isinstance(t, (bool, np.bool_)) or isinstance(t, (int, np.integer)):
            bits.append(int(bool(t)))
            continue
        s = str(t).strip()
        if s in ("X", "A"):
            bits.append(1)
        elif s in ("Y", "B"):
            bits.append(0)
        else:
            raise ValueError(f"draw {t!r}: expected X/Y, A/B, 1/0")
    return bits


def posterior_predictive(tokens, pA: float = 0.5, pB: float = 0.75, prior: float = 0.5,
                         template: str = "base") -> np.ndarray:
    """P(draw i+1 = X | first i draws) for i = 0..n (length n+1), exactly.

    ``tokens``: the draws ("XYXX", [" X", " Y"], or 1/0); A counts as X, B as Y.
    ``prior`` is P(generator A). For ``template="independent"`` every value is the
    prior predictive prior*pA + (1-prior)*pB.
    """
    bits = _as_bits(tokens)
    n = len(bits)
    if template == "independent":
        return np.full(n + 1, prior * pA + (1 - prior) * pB)
    k = np.concatenate([[0], np.cumsum(bits)]).astype(float)
    i = np.arange(n + 1, dtype=float)
    with np.errstate(divide="ignore"):
        la = np.log(prior) + k * np.log(pA) + (i - k) * np.log1p(-pA)
        lb = np.log1p(-prior) + k * np.log(pB) + (i - k) * np.log1p(-pB)
    wa = 1.0 / (1.0 + np.exp(lb - la))
    return wa * pA + (1 - wa) * pB


def posterior_b(n_x: int, n: int, pA=0.5, pB=0.75, prior=0.5) -> float:
    """P(generator B | n_x X in n draws)."""
    la = math.log(prior) + n_x * math.log(pA) + (n - n_x) * math.log1p(-pA)
    lb = math.log1p(-prior) + n_x * math.log(pB) + (n - n_x) * math.log1p(-pB)
    return 1.0 / (1.0 + math.exp(la - lb))


# ------------------------------------------------------------------ eval reservation


def _base_reserved(seq: str) -> bool:
    n, k = len(seq), seq.count("X")
    c = math.comb(n, k)
    if c <= RESERVE_MIN:
        return True
    frac = max(RESERVE_FRACTION, 1.5 * RESERVE_MIN / c)
    return (stable_hash("bayes|" + seq) % 1_000_003) < frac * 1_000_003


def mirror(seq: str) -> str:
    return seq.translate(str.maketrans("XY", "YX"))


def is_eval_sequence(seq: str) -> bool:
    """True if the X/Y draw sequence is reserved for evaluation (closed under mirroring)."""
    return _base_reserved(seq) or _base_reserved(mirror(seq))


def _reserved_orderings(n: int, k: int, rng: np.random.Generator, want: int) -> list[str]:
    """Up to ``want`` distinct reserved orderings of k X in n draws, in random order."""
    c = math.comb(n, k)
    if c <= _ENUMERATE_MAX:
        pool = []
        for pos in itertools.combinations(range(n), k):
            s = ["Y"] * n
            for p in pos:
                s[p] = "X"
            seq = "".join(s)
            if is_eval_sequence(seq):
                pool.append(seq)
        order = rng.permutation(len(pool))
        return [pool[i] for i in order[:want]]
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < want and tries < want * 200:
        tries += 1
        s = np.array(["Y"] * n)
        s[rng.choice(n, size=k, replace=False)] = "X"
        seq = "".join(s)
        if seq not in seen and is_eval_sequence(seq):
            seen.add(seq)
            out.append(seq)
    return out


# ------------------------------------------------------------------ rendering


def render(seq: str, template: str, k_distract: int, symbols: str) -> tuple[str, dict]:
    """Prompt text for the draws ``seq`` (X/Y letters) and its spans."""
    sx, sy = SYMBOLS[symbols]
    parts = []
    spans: dict[str, list[int]] = {}
    pre = " ".join([DISTRACTOR] * k_distract)
    if pre:
        spans["distractors"] = [0, len(pre)]
        pre += " "
    header = TEMPLATES[template]
    spans["header"] = [len(pre), len(pre) + len(header)]
    text = pre + header
    starts = []
    for ch in seq:
        starts.append(len(text) + 1)
        parts.append(" " + (sx if ch == "X" else sy))
        text += parts[-1]
    if seq:
        spans["draws"] = [starts[0], starts[-1] + 1]
        spans["last_draw"] = [starts[-1], starts[-1] + 1]
    return text, spans


def soft_targets(row) -> list[tuple[int, float]]:
    """For a bayes row's ``text``: [(char offset of each draw token " X"/" Y" (its space),
    P(that draw = first symbol | earlier draws))] from the exact posterior predictive.

    The toy trainer maps the offsets to token positions and uses the probabilities as
    soft next-token targets over the two symbols.
    """
    get = row.get if hasattr(row, "get") else (lambda k, d=None: getattr(row, k, d))
    seq = get("sequence")
    text = get("text")
    pred = posterior_predictive(seq, float(get("p_a")), float(get("p_b")), float(get("prior")),
                                template=get("template"))
    k = int(get("distractors") or 0)
    _, spans = render(seq, get("template"), k, get("symbols"))
    first = spans["draws"][0] if seq else None
    out = []
    for i in range(len(seq)):
        off = first + 2 * i - 1  # the space before symbol i
        assert text[off + 1] in "XYAB"
        out.append((off, float(pred[i])))
    return out


# ------------------------------------------------------------------ generation


def _sample_generative(rng, n, template, p_a, p_b, prior) -> str:
    if template == "independent":
        p = np.full(n, prior * p_a + (1 - prior) * p_b)
    else:
        p = np.full(n, p_a if rng.random() < prior else p_b)
    return "".join(np.where(rng.random(n) < p, "X", "Y"))


def _sample_uniform(rng, n) -> str:
    k = int(rng.integers(n + 1))
    s = np.array(["Y"] * n)
    s[rng.choice(n, size=k, replace=False)] = "X"
    return "".join(s)


def _generate(split, seed, tokenizer, n, n_draws, sweep, permutations, templates,
              distractors, symbol_swap, p_a, p_b, prior, train_draws, sampling):
    for name, v in (("p_a", p_a), ("p_b", p_b), ("prior", prior)):
        if not 0.0 < v < 1.0:
            raise InputError(f"--{name.replace('_', '-')}: expected a probability in (0, 1), "
                             f"found {v}")
    if n_draws < 0:
        raise InputError(f"--n-draws: expected >= 0, found {n_draws}")
    if any(k < 0 for k in distractors):
        raise InputError(f"--distractors: expected counts >= 0, found {distractors}")
    if permutations < 1:
        raise InputError(f"--permutations: expected >= 1, found {permutations}")
    if n is not None and n < 0:
        raise InputError(f"--n: expected >= 0, found {n}")
    rng = rng_for(seed, "bayes", split)
    symbol_sets = ["XY", "AB"] if symbol_swap else ["XY"]

    # the draw sequences (X/Y letters) and, for train, the full training sequence
    # (prompt seq, full seq, permutation index, templates to render it in)
    seqs: list[tuple[str, str, int, list[str]]] = []
    if split == "eval":
        if sweep:
            for k in range(n_draws + 1):
                for pi, s in enumerate(_reserved_orderings(n_draws, k, rng, permutations)):
                    seqs.append((s, s, pi, templates))
        else:
            want = 200 if n is None else n
            tries = 0
            while len(seqs) < want:
                tries += 1
                if tries > want * 1000 + 1000:
                    raise InputError(f"--n-draws {n_draws}: too few eval sequences for --n {want}")
                s = _sample_generative(rng, n_draws, templates[0], p_a, p_b, prior)
                if is_eval_sequence(s):
                    seqs.append((s, s, -1, templates))
    else:
        if sweep:
            raise InputError("--sweep: only for --split eval (train rows are sampled sequences)")
        if train_draws < 1:
            raise InputError(f"--train-draws: expected >= 1, found {train_draws}")
        want = 2000 if n is None else n
        # each training sequence is sampled from its own template's story
        for template in templates:
            got = 0
            while got < want:
                if sampling == "uniform":
                    full = _sample_uniform(rng, train_draws)
                else:
                    full = _sample_generative(rng, train_draws, template, p_a, p_b, prior)
                if n_draws >= 1 and train_draws >= n_draws and is_eval_sequence(full[:n_draws]):
                    # truncate instead of rejecting: the draws before the cut keep their
                    # unbiased conditional distributions (rejection would skew them)
                    full = full[: n_draws - 1]
                # the prompt is the header alone, so the whole sequence is continuation
                seqs.append(("", full, -1, [template]))
                got += 1

    rows = []
    for si, (s, full, pi, seq_templates) in enumerate(seqs):
        nx = s.count("X")
        for template in seq_templates:
            post = posterior_predictive(s, p_a, p_b, prior, template)[-1]
            cf_post = posterior_predictive(mirror(s), p_a, p_b, prior, template)[-1]
            for k in distractors:
                for sym in symbol_sets:
                    sx, sy = SYMBOLS[sym]
                    prompt, spans = render(s, template, k, sym)
                    cf_prompt, cf_spans = render(mirror(s), template, k, sym)
                    text, _ = render(full, template, k, sym)
                    rows.append({
                        "family": "bayes",
                        "prompt": prompt,
                        "target": " " + sx,
                        "foil": " " + sy,
                        "choices": [" " + sx, " " + sy],
                        "cf_prompt": cf_prompt,
                        "cf_target": " " + sx,
                        "cf_foil": " " + sy,
                        "spans": spans_json(spans),
                        "cf_spans": spans_json(cf_spans),
                        "group_id": f"bayes|{template}|k{k}|{sym}|n{len(s)}x{nx}",
                        "split": split,
                        "text": text,
                        "n_draws": len(s),
                        "n_x": nx,
                        "n_y": len(s) - nx,
                        "sequence": s if split == "eval" else full,
                        "sequence_id": si,
                        "multiset": f"n{len(s)}x{nx}",
                        "truncated": bool(split == "train" and len(full) < train_draws),
                        "permutation": pi,
                        "posterior_x": float(post),
                        "posterior_b": (float(posterior_b(nx, len(s), p_a, p_b, prior))
                                        if template != "independent" else float(1 - prior)),
                        "cf_posterior_x": float(cf_post),
                        "template": template,
                        "distractors": int(k),
                        "symbols": sym,
                        "p_a": float(p_a),
                        "p_b": float(p_b),
                        "prior": float(prior),
                    })
    df = pd.DataFrame(rows)
    if split == "eval" and not sweep and n is not None:
        df = df.iloc[: n * len(templates) * len(distractors) * len(symbol_sets)]
    df.insert(0, "prompt_id", [f"bayes-{split}-{i:06d}" for i in range(len(df))])
    return df


FAMILY = Family(
    name="bayes",
    help="Two-generator Bayesian sequences with the exact posterior predictive P(next = X).",
    options=[
        Option("n", "int", None, "sequences (random mode, default 200 eval; train: per "
               "template, default 2000); each eval sequence is written in every template x "
               "distractor x symbol condition"),
        Option("n_draws", "int", 10, "draws in each eval prompt (train: the reserved length)"),
        Option("sweep", "bool", False, "evidence sweep: n_X = 0..n_draws, --permutations "
               "orderings of each multiset (eval only)"),
        Option("permutations", "int", 20, "orderings per multiset in the sweep (at most the "
               "reserved ones)"),
        Option("templates", "str_list", ["base"], "header templates",
               choices=tuple(TEMPLATES)),
        Option("distractors", "int_list", [0], "repeat the distractor sentence k times, "
               "for each k given"),
        Option("symbol_swap", "bool", False, "also write every prompt with A/B for X/Y"),
        Option("p_a", "float", 0.5, "P(X) under generator A"),
        Option("p_b", "float", 0.75, "P(X) under generator B"),
        Option("prior", "float", 0.5, "prior probability of generator A"),
        Option("train_draws", "int", 16, "draws in each training sequence (train split)"),
        Option("sampling", "choice", "generative", "train sequences: generative story or "
               "uniform number of X (then train on soft_targets)",
               choices=("generative", "uniform")),
    ],
    fn=_generate,
    columns={
        "n_draws": "draws in the prompt", "n_x": "X draws in the prompt", "n_y": "Y draws",
        "sequence": "X/Y letters of the draws (train: the whole training sequence)",
        "sequence_id": "index of the sequence (shared by its conditions)",
        "multiset": "nNxK",
        "truncated": "train: cut before a reserved eval prefix",
        "permutation": "ordering index in the sweep (-1: sampled)",
        "posterior_x": "exact P(next = first symbol | prompt draws)",
        "posterior_b": "P(generator B | draws)",
        "cf_posterior_x": "the same for the mirrored counterfactual",
        "template": "base/independent/order_irrelevant", "distractors": "k",
        "symbols": "XY or AB", "p_a": "P(X|A)", "p_b": "P(X|B)", "prior": "P(A)",
    },
)
