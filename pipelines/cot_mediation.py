"""cot-mediation study helpers (called by pipelines/cot_mediation.just).

    python pipelines/cot_mediation.py top STAT.parquet [--k 4]
        prints the head sites (head.L.H, comma-separated) whose attention feature
        attn_to.<span>.L<l>.H<h> has the largest |average ACME| in a dolm-mediate
        statistical table: the heads the interventional analysis patches.
    python pipelines/cot_mediation.py compare IV.parquet [IV2.parquet ...] --statistical STAT
            -o DIR
        statistical vs interventional indirect effects per head, side by side
        (DIR/comparison.parquet, schema mediation_comparison, and DIR/comparison.md).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

_ATTN = re.compile(r"^attn_to\.[^.]+\.L(\d+)\.H(\d+)$")


def top(stat: str, k: int) -> str:
    from dolm.formats import read_table

    df, _ = read_table(stat, schema="mediation")
    a = df[(df.method == "statistical") & (df.effect == "acme_average")].copy()
    a = a[a.mediator.str.match(_ATTN)]
    if a.empty:
        sys.exit(f"top: {stat}: no attn_to.<span>.L<l>.H<h> mediators")
    a["abs"] = a.estimate.abs()
    a = a.sort_values(["abs", "mediator"], ascending=[False, True]).head(k)
    return ",".join("head.{}.{}".format(*_ATTN.match(m).groups()) for m in a.mediator)


def compare(paths: list[str], stat: str, outdir: str) -> pd.DataFrame:
    """Interventional rows of the ``paths`` tables beside the statistical table ``stat``
    (its rows for the same heads)."""
    from dolm.formats import Run, read_table

    run = Run("pipelines/cot_mediation.py compare")
    rows = []
    tables = [read_table(p, schema="mediation", run=run) for p in paths]
    sites = {s for df, _ in tables for s in df.loc[df.method == "interventional", "site"]}
    frames = [(df.query("method == 'interventional'"), meta) for df, meta in tables]
    sdf, smeta = read_table(stat, schema="mediation", run=run)
    sdf = sdf.query("method == 'statistical'").copy()
    sdf["site"] = [("head.{}.{}".format(*_ATTN.match(m).groups()) if _ATTN.match(m) else m)
                   for m in sdf.mediator]
    frames.append((sdf[sdf.site.isin(sites)], smeta))
    for df, meta in frames:
        metric = str(meta.extra.get("outcome", "?"))  # the outcome each table was fitted on
        for method, g in df.groupby("method"):
            for site, h in g.groupby("site"):
                e = h.set_index("effect")
                rows.append({
                    "site": site, "method": method,
                    "outcome": metric,
                    "mediator": h.mediator.iloc[0],
                    **{f"{eff}": e.estimate.get(eff) for eff in
                       ("acme_control", "acme_treated", "acme_average", "ade_average", "total")},
                    "acme_ci_low": e.ci_low.get("acme_average"),
                    "acme_ci_high": e.ci_high.get("acme_average"),
                    "q_value": e.q_value.get("acme_average"),
                    "n_units": int(h.n_units.iloc[0]),
                })
    out = pd.DataFrame(rows).sort_values(["site", "method", "outcome"])
    Path(outdir).mkdir(parents=True, exist_ok=True)
    from dolm.formats import write_table

    write_table(out, Path(outdir) / "comparison.parquet", "mediation_comparison", run, force=True)
    lines = ["# cot-mediation: chain-of-thought -> answer, through attention heads", "",
             "statistical: Imai-Keele-Tingley on the unit table (mediator = the head's "
             "attention mass from the last prompt token to the question's numbers, outcome "
             "in the outcome column, e.g. exact_match of the greedy generation; units = "
             "prompts). interventional: the "
             "head's output at the last prompt token patched between the direct and the CoT "
             "prompt of each problem (CoT chain teacher-forced), outcome of a run = "
             "target_correct (every answer token is the argmax) or target_logprob; units = "
             "problem pairs.", "",
             "| site | method | outcome | ACME (avg) [95% CI] | ACME control (NIE) | "
             "ADE (avg) | total | q | n |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(v):
        return "-" if v is None or not np.isfinite(v) else f"{v:+.4f}"

    for r in out.itertuples():
        lines.append(f"| {r.site} | {r.method} | {r.outcome} | {f(r.acme_average)} "
                     f"[{f(r.acme_ci_low)}, {f(r.acme_ci_high)}] | {f(r.acme_control)} | "
                     f"{f(r.ade_average)} | {f(r.total)} | {f(r.q_value)} | {r.n_units} |")
    md = "\n".join(lines) + "\n"
    (Path(outdir) / "comparison.md").write_text(md)
    print(md)
    return out


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="cot_mediation.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("top")
    t.add_argument("stat")
    t.add_argument("--k", type=int, default=4)
    c = sub.add_parser("compare")
    c.add_argument("tables", nargs="+")
    c.add_argument("--statistical", required=True)
    c.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    from dolm.errors import DolmError

    try:
        if a.cmd == "top":
            print(top(a.stat, a.k))
        else:
            compare(a.tables, a.statistical, a.output)
    except DolmError as exc:
        print(f"cot_mediation.py: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main(sys.argv[1:])
