"""Join a prompts table with its collect-acts outcomes into a unit table (one row per prompt).

    python pipelines/join_units.py PROMPTS OUTCOMES -o UNITS.parquet

The unit table is what dolm-psm and dolm-mediate statistical read: the prompts' columns
(treatment, covariates) beside the outcomes (correct, exact_match, attn_to.* features);
boolean outcomes become 0/1, and a generation from which no answer
could be read counts as exact_match = 0.
"""

from __future__ import annotations

import sys

import pandas as pd


def units(prompts: str, outcomes: str, out: str) -> None:
    p = pd.read_parquet(prompts)
    o = pd.read_parquet(outcomes)
    keep = [c for c in o.columns if c not in p.columns or c == "prompt_id"]
    df = p.merge(o[keep], on="prompt_id", how="inner", validate="one_to_one")
    if len(df) != len(p):
        sys.exit(f"units: {len(p) - len(df)} prompts of {prompts} have no outcome in {outcomes}")
    for c in ("correct", "exact_match"):
        if c in df.columns:
            df[c] = df[c].astype(float)
    if "exact_match" in df.columns and df["exact_match"].isna().any():
        # no answer could be read from the generation: the model did not answer, wrong
        k = int(df["exact_match"].isna().sum())
        df["exact_match"] = df["exact_match"].fillna(0.0)
        print(f"units: {k} generation(s) without an answer counted as exact_match = 0",
              file=sys.stderr)
    drop = [c for c in ("choices", "spans", "cf_spans", "text") if c in df.columns]
    df.drop(columns=drop).to_parquet(out, index=False)
    print(f"units: {len(df)} rows -> {out}", file=sys.stderr)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="join_units.py")
    ap.add_argument("prompts")
    ap.add_argument("outcomes")
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args()
    units(a.prompts, a.outcomes, a.output)
