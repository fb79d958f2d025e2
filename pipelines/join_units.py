"""Join a prompts table with its collect-acts outcomes into a unit table (one row per prompt).

    python pipelines/join_units.py PROMPTS OUTCOMES -o UNITS.parquet [--allow-other-prompts]

The unit table is what dolm-psm and dolm-mediate statistical read: the prompts' columns
(treatment, covariates) beside the outcomes (correct, exact_match, attn_to.* features);
boolean outcomes become 0/1, and a generation from which no answer
could be read counts as exact_match = 0. Written with the ``units`` schema and the
provenance of both inputs (so the model that produced the outcomes stays on record).
Outcomes recorded from another prompts table (their ``prompts_sha256`` differs, e.g.
prompts regenerated with another seed: same ids, other rows) are refused unless
``--allow-other-prompts``.
"""

from __future__ import annotations

import sys

from dolm.errors import InputError
from dolm.formats import Run, read_table, write_table


def units(prompts: str, outcomes: str, out: str, allow_other_prompts: bool = False) -> None:
    """Write the unit table of ``prompts`` x ``outcomes`` to ``out`` (schema ``units``)."""
    from dolm.cli import check_same_prompts, input_sha256

    run = Run("pipelines/join_units.py")
    p, _ = read_table(prompts, schema="prompts", run=run)
    o, ometa = read_table(outcomes, schema="outcomes", run=run)
    check_same_prompts(ometa, prompts, input_sha256(run, prompts), allow_other_prompts)
    keep = [c for c in o.columns if c not in p.columns or c == "prompt_id"]
    df = p.merge(o[keep], on="prompt_id", how="inner", validate="one_to_one")
    if len(df) != len(p):
        raise InputError(f"{outcomes}: {len(p) - len(df)} prompts of {prompts} have no outcome "
                         "(expected the outcomes of exactly this prompts table)")
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
    write_table(df.drop(columns=drop), out, "units", run, force=True)
    print(f"units: {len(df)} rows -> {out}", file=sys.stderr)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="join_units.py")
    ap.add_argument("prompts")
    ap.add_argument("outcomes")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--allow-other-prompts", action="store_true",
                    help="join outcomes recorded from another prompts table")
    a = ap.parse_args()
    from dolm.errors import DolmError

    try:
        units(a.prompts, a.outcomes, a.output, a.allow_other_prompts)
    except DolmError as exc:
        print(f"join_units.py: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
