"""The training corpus: examples drawn from the task families' *train* split only.

Each family section of the config names its generator ``options`` (passed to
``dolm.tasks.FAMILIES[name].generate(split="train", ...)``) and a ``pool`` size; the
generator is called with successive seeds until the pool is full. Evaluation prompts
come from the families' eval split, which never shares an item with train (entities'
phrasings, sequences, problems and instances are reserved by the families).

Per family:

- bayes rows are whole draw sequences: the loss at every draw is the cross-entropy
  against the exact posterior predictive (``dolm.tasks.bayes_soft_targets``), a soft
  target over the two symbols — so the model learns the probability, not a sample;
- arith keeps a ``direct_share`` of direct-answer rows (the rest chain-of-thought);
- dilemma adds ``cross_scenario`` rows whose two options come from different scenarios
  (:func:`cross_scenario_dilemmas`), so that the model learns which action is the
  intended one rather than memorising the training pairs;
- every other row is prompt -> continuation (the row's ``text`` after its prompt), then
  an end-of-text token.
"""

from __future__ import annotations

import numpy as np

from .data import Example


def _continuation(row) -> str:
    text, prompt = row.text, row.prompt
    if isinstance(text, str) and text.startswith(prompt) and len(text) > len(prompt):
        return text[len(prompt):]
    return row.target


def _rows_plain(name: str, df) -> list[Example]:
    return [
        Example(prompt=r.prompt, continuation=_continuation(r), family=name)
        for r in df.itertuples(index=False)
    ]


def _rows_bayes(df) -> list[Example]:
    from dolm.tasks import bayes_soft_targets

    out = []
    for _, row in df.iterrows():
        sx, sy = row["choices"][0], row["choices"][1]
        soft = [(off, {sx: p, sy: 1.0 - p}) for off, p in bayes_soft_targets(row)]
        out.append(Example(prompt=row["text"], continuation="", soft=soft, family="bayes",
                           eos=False))
    return out


def _rows_arith(df, direct_share: float | None, rng: np.random.Generator) -> list[Example]:
    if direct_share is not None:
        cot = df[df["cot"]]
        direct = df[~df["cot"]]
        # keep all CoT rows, and direct rows so that they are `direct_share` of the total
        want = int(round(len(cot) * direct_share / max(1e-9, 1 - direct_share)))
        if want < len(direct):
            keep = np.sort(rng.choice(len(direct), size=want, replace=False))
            direct = direct.iloc[keep]
        import pandas as pd

        df = pd.concat([direct, cot]).sort_index()
    return _rows_plain("arith", df)


def cross_scenario_dilemmas(n: int, rng: np.random.Generator) -> list[Example]:
    """``n`` two-option rows whose options come from *different* scenarios (one ethical,
    one unethical action; the situation of either), in random order.

    They teach the valence of each action text rather than of a pair. No evaluation
    instance is among them: those pair two actions of the *same* scenario."""
    from dolm.tasks.dilemma import SCENARIOS, render

    out = []
    k = len(SCENARIOS)
    while len(out) < n:
        sg, sb = (int(x) for x in rng.choice(k, size=2, replace=False))
        good = SCENARIOS[sg][1][int(rng.integers(len(SCENARIOS[sg][1])))]
        bad = SCENARIOS[sb][2][int(rng.integers(len(SCENARIOS[sb][2])))]
        situation = SCENARIOS[sg if rng.random() < 0.5 else sb][0]
        first = bool(rng.random() < 0.5)
        prompt, _ = render(situation, *((good, bad) if first else (bad, good)))
        out.append(Example(prompt=prompt, continuation=" 1" if first else " 2",
                           family="dilemma"))
    return out


def build_pool(name: str, fcfg: dict, seed: int) -> list[Example]:
    """``fcfg['pool']`` training examples of family ``name`` (train split only)."""
    from dolm.tasks import FAMILIES

    fam = FAMILIES[name]
    options = dict(fcfg.get("options", {}))
    want = int(fcfg.get("pool", 1000))
    rng = np.random.default_rng(seed)
    out: list[Example] = []
    k = 0
    while len(out) < want:
        df = fam.generate(split="train", seed=seed + 7919 * k, **options)
        if len(df) and not (df["split"] == "train").all():  # pragma: no cover - guard
            raise ValueError(f"{name}: generator returned non-train rows")
        if name == "bayes":
            out.extend(_rows_bayes(df))
        elif name == "arith":
            out.extend(_rows_arith(df, fcfg.get("direct_share"), rng))
        else:
            out.extend(_rows_plain(name, df))
        k += 1
        if not len(df) or k > 10000:
            raise ValueError(f"{name}: the generator gives no training rows")
    if len(out) > want:
        idx = np.sort(rng.choice(len(out), size=want, replace=False))
        out = [out[i] for i in idx]
    if name == "dilemma" and int(fcfg.get("cross_scenario", 0)) > 0:
        out += cross_scenario_dilemmas(int(fcfg["cross_scenario"]), rng)
    return out


def required_tokens(names: list[str]) -> list[str]:
    """Single-word answers of the families (from their train split and answer lists):
    each should be one token of the toy tokenizer."""
    from dolm.tasks import FAMILIES

    req: set[str] = set()
    for name in names:
        if name == "factual":
            from dolm.tasks.factual import RELATIONS

            for spec in RELATIONS.values():
                req.update(spec["values"])
        elif name == "formats":
            df = FAMILIES[name].generate(split="train", seed=0)
            req.update(df["target"])
        elif name == "dilemma":
            req.update([" 1", " 2"])
    return sorted(req)
