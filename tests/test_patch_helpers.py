"""Helpers shared by the dolm-patch tests (no tests here)."""

from __future__ import annotations

import json

import pandas as pd

PAIRS = [
    # prompt, cf_prompt, subject span in prompt
    ("the capital of France is", "the capital of Italy is", "France"),
    ("a red cat and a blue dog is", "a red bird and a blue dog is", "cat"),
    ("the king of the city is", "the queen of the city is", "king"),
]


def prompts_df(pairs=PAIRS, target=" Paris", foil=" Rome", **extra) -> pd.DataFrame:
    """A prompts table with every required column (plain, no dolm metadata)."""
    rows = []
    for i, (p, cf, subj) in enumerate(pairs):
        s0 = p.index(subj) if subj else 0
        c0 = cf.index(subj) if subj and subj in cf else s0
        rows.append({
            "prompt_id": f"p{i}",
            "family": "test",
            "prompt": p,
            "target": target,
            "foil": foil,
            "choices": None,
            "cf_prompt": cf,
            "cf_target": foil,
            "cf_foil": target,
            "spans": json.dumps({"subject": [s0, s0 + len(subj)]}) if subj else None,
            "cf_spans": json.dumps({"subject": [c0, c0 + len(subj)]}) if subj else None,
            "group_id": None,
            "split": "eval",
        })
    df = pd.DataFrame(rows)
    for k, v in extra.items():
        df[k] = v
    return df


def patch_rows(lm, df, **opts):
    """Run the patcher in-process: (effects rows, summary rows, Patcher)."""
    from dolm_tools.patch.prepare import choose_metric, read_prompts
    from dolm_tools.patch.run import Options, Patcher

    metric = opts.pop("metric", "auto")
    mode = opts.get("mode", "counterfactual")
    plist = read_prompts(df, lm, mode=mode, metric=metric, path="prompts.parquet")
    metric = choose_metric(plist, metric)
    pt = Patcher(lm, plist, Options(metric=metric, **opts))
    rows, summ = pt.run()
    return rows, summ, pt


def values(rows, metric="logit_diff"):
    return {(r["prompt_id"], r["site"], r["position"]): r["value"] for r in rows
            if r["metric"] == metric}
