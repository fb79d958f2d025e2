"""formats-psm study helpers (called by pipelines/formats_psm.just).

    python pipelines/formats_psm.py compare --experiment UNITS_EXP --observational UNITS_OBS
            --psm PSM.json -o DIR
        naive, matched and true effects of each format against direct side by side, with
        balance (max |SMD| before/after) and sensitivity (Rosenbaum Gamma, E-value):
        DIR/comparison.parquet (schema psm_check) and DIR/comparison.md.

The true effects come from the experiment design, where every unit is asked in every format:
per unit, correct(format) - correct(direct); ATE over all units of the contrast (the units
that received either level in the observational design), ATT over those that received the
format, ATC over those that received direct. The observational design has the same units
(same seed and n), one format each.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd


def _boot_ci(x: np.ndarray, seed: int = 0, sims: int = 2000) -> tuple[float, float]:
    if len(x) == 0:
        return (np.nan, np.nan)
    rng = np.random.default_rng(seed)
    m = x[rng.integers(0, len(x), size=(sims, len(x)))].mean(1)
    return float(np.quantile(m, 0.025)), float(np.quantile(m, 0.975))


def compare(experiment: str, observational: str, psm: str, outdir: str,
            outcome: str = "correct") -> pd.DataFrame:
    from dolm.formats import Run, read_json, read_table, write_table

    run = Run("pipelines/formats_psm.py compare")
    exp, _ = read_table(experiment, schema="units", run=run)
    obs, _ = read_table(observational, schema="units", run=run)
    summ, _ = read_json(psm, schema="psm_summary", run=run)
    bal_path = Path(psm[:-5] if psm.endswith(".json") else psm).with_suffix(".balance.parquet")
    bal = read_table(bal_path, schema="psm_balance", run=run)[0] if bal_path.exists() else None
    wide = exp.pivot_table(index="unit_id", columns="format", values=outcome, aggfunc="first")
    got = obs.set_index("unit_id")["format"]
    rows = []
    for c in summ["contrasts"]:
        t, r = c["treated_level"], c["control_level"]
        diff = (wide[t] - wide[r]).dropna()
        rec = got.reindex(diff.index)
        sets = {"ATE": diff[rec.isin([t, r])], "ATT": diff[rec == t], "ATC": diff[rec == r]}
        eff = {e["estimand"]: e for e in c["effects"]}
        for est in ("ATT", "ATC", "ATE"):
            if est not in eff:
                continue
            truth = sets[est].to_numpy(dtype=float)
            lo, hi = _boot_ci(truth)
            sens = (c.get("sensitivity") or {}).get(est) or {}
            row = {
                "contrast": c["contrast"], "estimand": est,
                "naive": eff["naive"]["estimate"] if "naive" in eff else None,
                "naive_ci_low": eff.get("naive", {}).get("ci_low"),
                "naive_ci_high": eff.get("naive", {}).get("ci_high"),
                "matched": eff[est]["estimate"], "matched_ci_low": eff[est]["ci_low"],
                "matched_ci_high": eff[est]["ci_high"], "matched_n_sets": eff[est]["n_sets"],
                "true": float(truth.mean()) if len(truth) else None,
                "true_ci_low": lo, "true_ci_high": hi, "true_n_units": int(len(truth)),
                "true_all_units": float(diff.mean()),
                "matched_ci_covers_true": bool(eff[est]["ci_low"] <= truth.mean()
                                               <= eff[est]["ci_high"]) if len(truth) else None,
                "rosenbaum_gamma": (sens.get("rosenbaum") or {}).get("gamma_critical"),
                "e_value": (sens.get("e_value") or {}).get("e_value"),
                "discarded_treated": c["positivity"].get("discarded_treated"),
                "discarded_control": c["positivity"].get("discarded_control"),
            }
            if bal is not None:
                row.update(_balance(bal[bal["contrast"] == c["contrast"]], est))
            rows.append(row)
    out = pd.DataFrame(rows)
    Path(outdir).mkdir(parents=True, exist_ok=True)
    out["rosenbaum_gamma"] = pd.to_numeric(out["rosenbaum_gamma"], errors="coerce")
    write_table(out, Path(outdir) / "comparison.parquet", "psm_check", run, force=True,
                extra={"outcome": outcome})
    md = _markdown(out, summ, exp, outcome)
    (Path(outdir) / "comparison.md").write_text(md)
    print(md)
    return out


def _balance(b: pd.DataFrame, est: str) -> dict:
    """max |SMD| over the covariates (not the distance) before (all) and after (matched)."""
    if b.empty or "smd" not in b.columns:
        return {}
    b = b[(b["estimand"] == est) & (b["type"] != "distance")]
    res = {}
    for stage, sample in (("before", "all"), ("after", "matched")):
        s = b[b["sample"] == sample]
        if not s.empty:
            res[f"max_abs_smd_{stage}"] = float(np.nanmax(np.abs(s["smd"].to_numpy(float))))
    return res


def _fmt(v, ci=None) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    s = f"{v:+.3f}"
    if ci and all(x is not None and np.isfinite(x) for x in ci):
        s += f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
    return s


def _num(v) -> str:
    return "-" if v is None or pd.isna(v) else f"{v:.2f}"


def _markdown(out: pd.DataFrame, summ: dict, exp: pd.DataFrame, outcome: str) -> str:
    acc = exp.groupby("format")[outcome].mean()
    lines = [f"# formats-psm: effect of the instruction format on `{outcome}`", "",
             f"Mean {outcome} per format in the experiment design (every unit in every "
             "format): "
             + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) + ".", "",
             f"Observational design: {summ['n_units']} units, covariates "
             f"{', '.join(summ['covariates'])}"
             + (" (backdoor set from the DAG)" if summ.get("covariates_from") == "dag" else "")
             + ".", "",
             "| contrast | estimand | naive | matched | true (experiment) | CI covers | "
             "max SMD before -> after | Gamma | E-value |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in out.itertuples():
        smd = (f"{getattr(r, 'max_abs_smd_before', float('nan')):.3f} -> "
               f"{getattr(r, 'max_abs_smd_after', float('nan')):.3f}"
               if hasattr(r, "max_abs_smd_before") else "-")
        lines.append(
            f"| {r.contrast} | {r.estimand} | {_fmt(r.naive, (r.naive_ci_low, r.naive_ci_high))}"
            f" | {_fmt(r.matched, (r.matched_ci_low, r.matched_ci_high))} (n={r.matched_n_sets})"
            f" | {_fmt(r.true, (r.true_ci_low, r.true_ci_high))} (n={r.true_n_units})"
            f" | {r.matched_ci_covers_true} | {smd} | "
            f"{_num(r.rosenbaum_gamma)} | {_num(r.e_value)} |")
    lines += ["", "naive: difference in means in the observational design (confounded by "
              "difficulty and input length); matched: dolm-psm nearest-neighbour matching on "
              "the propensity score (1:1 within a 0.2 SD caliper; a direction whose pool is "
              "smaller than its focal group is matched with replacement, and with "
              "replacement every equally near unit joins the set, --ties all, because the "
              "discrete covariates give many units the same score); n: matched sets, so a "
              "caliper can leave the estimate about fewer units than the population the "
              f"true effect averages over; true: mean of {outcome}(format) - {outcome}(direct) "
              "over the same units in the experiment design. Gamma: Rosenbaum bound at which "
              "significance is lost; E-value on the risk-ratio scale.", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="formats_psm.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--experiment", required=True)
    c.add_argument("--observational", required=True)
    c.add_argument("--psm", required=True)
    c.add_argument("--outcome", default="correct")
    c.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    from dolm.errors import DolmError

    try:
        compare(a.experiment, a.observational, a.psm, a.output, a.outcome)
    except DolmError as exc:
        print(f"formats_psm.py: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main(sys.argv[1:])
