"""The card's evaluation: held-out prompt sets, outcomes, and metrics.

``EVAL_SETS`` names each prompt set by its ``dolm-gen-prompts`` family and options
(always ``--split eval``). Outcomes come either from ``dolm-collect-acts`` (the card,
:mod:`dolm_tools.toy.card`) or from :func:`quick_outcomes`, an in-process scorer with
the same definitions (for evaluation during training). :func:`compute_metrics` turns
prompts + outcomes into the card's numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

# name -> (family, gen-prompts options, collect-acts --generate N)
EVAL_SETS: dict[str, tuple[str, dict[str, Any], int]] = {
    "factual": ("factual", {}, 0),
    "bayes": ("bayes", {"n_draws": 10, "sweep": True, "permutations": 20}, 0),
    "bayes_controls": (
        "bayes",
        {"n_draws": 10, "sweep": True, "permutations": 4,
         "templates": ["base", "independent", "order_irrelevant"], "distractors": [0, 2],
         "symbol_swap": True},
        0,
    ),
    "formats": ("formats", {"design": "experiment"}, 0),
    "arith": ("arith", {"steps": [3]}, 48),
    "dilemma": ("dilemma", {}, 0),
}
EVAL_SEED = 0

TARGETS = {
    "factual.top1": (">=", 0.95),
    "bayes.mean_abs_error": ("<=", 0.05),
    "arith.cot_minus_direct": (">=", 0.10),
    "dilemma.base_intended": (">=", 0.90),
    "dilemma.switch_rate": (">=", 0.90),
}


def swapped(df: pd.DataFrame) -> pd.DataFrame:
    """The counterfactual prompts of a table as a prompts table of their own
    (``prompt``/``target``/... replaced by their ``cf_`` columns)."""
    cf = df.copy()
    for col in ("prompt", "target", "foil", "spans"):
        cf[col] = df[f"cf_{col}"]
        cf[f"cf_{col}"] = df[col]
    if "intended_option" in df.columns:
        cf["intended_option"] = df["cf_intended_option"]
        cf["cf_intended_option"] = df["intended_option"]
    cf["prompt_id"] = df["prompt_id"] + "-cf"
    return cf


def eval_tables(sets: list[str] | None = None, n_max: int | None = None,
                seed: int = EVAL_SEED) -> dict[str, pd.DataFrame]:
    """The held-out prompt tables (``dolm.tasks``, split eval), by set name.

    ``n_max`` takes an evenly spaced subsample of each (for quick checks)."""
    from dolm.tasks import FAMILIES

    out = {}
    for name in sets or list(EVAL_SETS):
        fam, opts, _ = EVAL_SETS[name]
        df = FAMILIES[fam].generate(split="eval", seed=seed, **opts)
        if name == "dilemma":
            df = pd.concat([df, swapped(df)], ignore_index=True)
        if n_max is not None and len(df) > n_max:
            if name == "dilemma":
                half = len(df) // 2
                idx = np.linspace(0, half - 1, n_max // 2).round().astype(int)
                idx = np.concatenate([idx, idx + half])
            elif name == "formats":
                units = df["unit_id"].unique()
                keep = units[np.linspace(0, len(units) - 1, max(1, n_max // 3)).round()
                             .astype(int)]
                idx = np.flatnonzero(df["unit_id"].isin(keep))
            else:
                idx = np.linspace(0, len(df) - 1, n_max).round().astype(int)
            df = df.iloc[np.unique(idx)].reset_index(drop=True)
        out[name] = df
    return out


# ---------------------------------------------------------------- in-process scoring


def quick_outcomes(model, tokenizer, df: pd.DataFrame, device="cpu", generate: int = 0,
                   batch_size: int = 64) -> pd.DataFrame:
    """Outcomes with collect-acts' definitions: target_logprob (teacher-forced sum),
    target_rank (first token), correct (greedy reproduces the target), choice_probs
    (renormalised over the choices), choice_pred; with ``generate``: generation, answer,
    exact_match (``dolm.tasks.extract_answer`` for arith)."""
    import torch
    from dolm.models import pad_right

    pad = tokenizer.pad_token_id
    rows = []
    prompts = df["prompt"].tolist()
    targets = df["target"].tolist()
    choices = df["choices"].tolist() if "choices" in df.columns else [None] * len(df)
    p_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    t_ids = [tokenizer.encode(t, add_special_tokens=False) if isinstance(t, str) else []
             for t in targets]
    ch_cache: dict = {}
    for lo in range(0, len(df), batch_size):
        idx = range(lo, min(len(df), lo + batch_size))
        ids, mask = pad_right([p_ids[i] + t_ids[i] for i in idx], pad, device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        logits = logits.float().cpu()
        for b, i in enumerate(idx):
            n, tt = len(p_ids[i]), t_ids[i]
            row: dict[str, Any] = {"prompt_id": df["prompt_id"].iat[i], "n_tokens": n}
            last = logits[b, n - 1]
            if tt:
                lg = logits[b, n - 1 : n - 1 + len(tt)]
                lp = torch.log_softmax(lg, -1)
                tg = torch.tensor(tt)
                row["target_logprob"] = float(lp[torch.arange(len(tt)), tg].sum())
                row["target_rank"] = int((last > last[tt[0]]).sum())
                row["correct"] = bool((lg.argmax(-1) == tg).all())
            ch = choices[i]
            if ch is not None and not (isinstance(ch, float) and math.isnan(ch)):
                key = tuple(ch)
                if key not in ch_cache:
                    ch_cache[key] = [tokenizer.encode(c, add_special_tokens=False)[0] for c in key]
                cid = torch.tensor(ch_cache[key])
                probs = torch.softmax(last[cid], -1)
                row["choice_probs"] = [float(x) for x in probs]
                row["choice_pred"] = int(probs.argmax())
            rows.append(row)
    out = pd.DataFrame(rows)
    if generate:
        out = out.merge(_quick_generate(model, tokenizer, df, device, generate, batch_size),
                        on="prompt_id")
    return out


def _quick_generate(model, tokenizer, df, device, n_new, batch_size) -> pd.DataFrame:
    import torch
    from dolm.tasks import extract_answer

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for lo in range(0, len(df), batch_size):
        sub = df.iloc[lo : lo + batch_size]
        encs = [tokenizer.encode(p, add_special_tokens=False) for p in sub["prompt"]]
        L = max(len(e) for e in encs)
        ids = torch.full((len(encs), L), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, e in enumerate(encs):  # left padding
            ids[b, L - len(e):] = torch.tensor(e)
            mask[b, L - len(e):] = 1
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=n_new, do_sample=False, num_beams=1,
                                 pad_token_id=pad, eos_token_id=eos)
        for b, toks in enumerate(out[:, L:].cpu().tolist()):
            if eos in toks:
                toks = toks[: toks.index(eos)]
            text = tokenizer.decode(toks, skip_special_tokens=True)
            ans = extract_answer(text)
            tgt = sub["target"].iat[b]
            rows.append({"prompt_id": sub["prompt_id"].iat[b], "generation": text,
                         "answer": None if ans is None else str(ans),
                         "exact_match": None if ans is None else str(ans) == tgt.strip()})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- metrics


def _r(x: float, nd: int = 4) -> float:
    return float(round(float(x), nd))


def metrics_for(name: str, prompts: pd.DataFrame, outcomes: pd.DataFrame) -> dict[str, Any]:
    """The card's numbers for one prompt set."""
    df = prompts.merge(outcomes, on="prompt_id", how="inner", suffixes=("", "_out"))
    if len(df) != len(prompts):
        raise ValueError(f"{name}: {len(prompts) - len(df)} prompts have no outcome")
    if name == "factual":
        return {"n": len(df), "top1": _r((df["target_rank"] == 0).mean()),
                "greedy": _r(df["correct"].astype(float).mean()),
                "by_relation": {k: _r((g["target_rank"] == 0).mean())
                                for k, g in df.groupby("relation")}}
    if name in ("bayes", "bayes_controls"):
        df = df.assign(p_model=[cp[0] for cp in df["choice_probs"]])
        df["abs_err"] = (df["p_model"] - df["posterior_x"]).abs()
        conds = ["template", "distractors", "symbols"]

        def summary(g):
            by_n = g.groupby("n_x")
            per_n = by_n["abs_err"].mean()
            drift = by_n["p_model"].agg(lambda s: s.max() - s.min())
            return per_n, drift

        if name == "bayes":
            per_n, drift = summary(df)
            return {
                "n": len(df),
                "mean_abs_error": _r(per_n.mean()),
                "max_abs_error": _r(df["abs_err"].max()),
                "order_drift_mean": _r(drift.mean()),
                "order_drift_max": _r(drift.max()),
                "by_n_x": {int(k): {"p_bayes": _r(df.loc[df["n_x"] == k, "posterior_x"]
                                                   .iloc[0]),
                                    "p_model_mean": _r(df.loc[df["n_x"] == k, "p_model"].mean()),
                                    "mean_abs_error": _r(v),
                                    "order_drift": _r(drift[k]),
                                    "permutations": int((df["n_x"] == k).sum())}
                           for k, v in per_n.items()},
            }
        out = {"n": len(df), "conditions": {}}
        for key, g in df.groupby(conds):
            per_n, drift = summary(g)
            out["conditions"]["|".join(map(str, key))] = {
                "mean_abs_error": _r(per_n.mean()), "order_drift_mean": _r(drift.mean())}
        return out
    if name == "formats":
        df["correct_f"] = df["correct"].astype(float)
        acc = df.pivot_table(index="task_type", columns="format", values="correct_f",
                             aggfunc="mean")
        by_fmt = df.groupby("format")["correct_f"].mean()
        wide = df.pivot_table(index="unit_id", columns="format", values="correct_f")
        effects = {f"{f}_minus_direct": _r((wide[f] - wide["direct"]).mean())
                   for f in ("polite", "fewshot")}
        by_diff = df.pivot_table(index="difficulty", columns="format", values="correct_f",
                                 aggfunc="mean")
        return {
            "n": len(df), "units": int(df["unit_id"].nunique()),
            "accuracy": _r(df["correct_f"].mean()),
            "by_format": {k: _r(v) for k, v in by_fmt.items()},
            "by_task_format": {t: {f: _r(acc.loc[t, f]) for f in acc.columns}
                               for t in acc.index},
            "by_difficulty_format": {int(d): {f: _r(by_diff.loc[d, f]) for f in by_diff.columns}
                                     for d in by_diff.index},
            "effects": effects,
            "formats_differ": bool(by_fmt.nunique() > 1),
        }
    if name == "arith":
        em = df["exact_match"].fillna(False).astype(float)
        cot = em[df["cot"]].mean()
        direct = em[~df["cot"]].mean()
        return {"n": len(df), "steps": sorted(int(s) for s in df["steps"].unique()),
                "cot_exact_match": _r(cot), "direct_exact_match": _r(direct),
                "cot_minus_direct": _r(cot - direct),
                "direct_teacher_forced": _r(df.loc[~df["cot"], "correct"].astype(float).mean())}
    if name == "dilemma":
        is_cf = df["prompt_id"].str.endswith("-cf")
        base = df[~is_cf].set_index("prompt_id")
        cf = df[is_cf].copy()
        cf.index = cf["prompt_id"].str[:-3]
        cf = cf.loc[base.index]
        base_ok = (base["choice_pred"] + 1 == base["intended_option"])
        cf_ok = (cf["choice_pred"] + 1 == cf["intended_option"])
        switch = (base["choice_pred"].to_numpy() != cf["choice_pred"].to_numpy())
        return {"n": int(len(base)), "base_intended": _r(base_ok.mean()),
                "cf_intended": _r(cf_ok.mean()), "switch_rate": _r(switch.mean()),
                "both_intended": _r((base_ok.to_numpy() & cf_ok.to_numpy()).mean())}
    raise KeyError(name)


def compute_metrics(tables: dict[str, pd.DataFrame], outcomes: dict[str, pd.DataFrame]):
    return {name: metrics_for(name, tables[name], outcomes[name]) for name in tables}


def check_targets(metrics: dict) -> dict[str, bool]:
    out = {}
    for key, (op, thr) in TARGETS.items():
        sec, k = key.split(".")
        if sec in metrics:
            v = metrics[sec][k]
            out[key] = v >= thr if op == ">=" else v <= thr
    if "formats" in metrics:
        out["formats.formats_differ"] = bool(metrics["formats"]["formats_differ"])
    return out


def headline(metrics: dict) -> dict[str, float]:
    """The few numbers printed during training."""
    h = {}
    for key in TARGETS:
        sec, k = key.split(".")
        if sec in metrics:
            h[key] = metrics[sec][k]
    if "formats" in metrics:
        h.update({f"formats.{k}": v for k, v in metrics["formats"]["by_format"].items()})
    if "arith" in metrics:
        h["arith.cot"] = metrics["arith"]["cot_exact_match"]
        h["arith.direct"] = metrics["arith"]["direct_exact_match"]
    return h


def quick_eval_fn(cfg: dict, n_max: int = 200, sets: list[str] | None = None):
    """A callback for the trainer: headline metrics on a subsample of each eval set."""
    cache: dict[str, pd.DataFrame] = {}

    def fn(model, tokenizer, device):
        if not cache:
            cache.update(eval_tables(sets or ["factual", "bayes", "formats", "arith", "dilemma"],
                                     n_max=n_max))
        outs = {name: quick_outcomes(model, tokenizer, df, device=device,
                                     generate=EVAL_SETS[name][2])
                for name, df in cache.items()}
        return headline(compute_metrics(cache, outs))

    return fn
