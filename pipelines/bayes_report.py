"""The bayes study's report: MAE to Bayes and order drift per condition, probe
localisation, head scan, steering slope. Markdown on stdout.

    python pipelines/bayes_report.py RUN_DIR > RUN_DIR/report.md

Reads the study's files from RUN_DIR (see pipelines/bayes.just); any of them may have
been replaced by hand by a file of the same schema. Files that are missing are skipped.
MAE is the mean over prompts of ``mae_bayes`` (|model P(X) - exact posterior|); drift the
mean over prompts of ``order_drift`` (|P(X) - mean P(X) over the orderings of the same
multiset|). Steering slopes are least-squares slopes of the mean P(X) against alpha.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from dolm.formats import load_safetensors, read_table


def _read(path):
    if not os.path.exists(path):
        return None, None
    if path.endswith(".safetensors"):
        return load_safetensors(path)
    return read_table(path)


def _mean(df, metric, by):
    d = df[df["metric"] == metric]
    return d.groupby(by, sort=False)["value"].mean()


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _f(x, nd=4):
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def _model(meta) -> str:
    entry = meta.model_entry() if meta is not None else None
    if not entry:
        return "?"
    return f"{entry.get('spec')} (weights {str(entry.get('weights_sha256'))[:12]})"


def ablation_section(path, title) -> list[str]:
    df, meta = _read(path)
    if df is None:
        return []
    out = [f"## {title}", "", f"`{os.path.basename(path)}`, model {_model(meta)}; "
           f"{df['prompt_id'].nunique()} prompts.", ""]
    mae = _mean(df, "mae_bayes", "intervention")
    drift = _mean(df, "order_drift", "intervention")
    comp = df.drop_duplicates("intervention").set_index("intervention")["component"]
    rows = []
    for name in mae.index:
        c = comp.get(name)
        rows.append([name, _f(mae.get(name)), _f(drift.get(name)),
                     "" if c is None or c != c else c])
    out += [_table(["intervention", "MAE to Bayes", "order drift", "components"], rows), ""]
    return out


def scan_section(path, k=5) -> list[str]:
    df, meta = _read(path)
    if df is None:
        return []
    d = df[(df["metric"] == "mae_bayes") & df["head"].notna()]
    delta = (d["value"] - d["clean_value"]).groupby(d["site"]).mean().sort_values()
    base = df[(df["metric"] == "mae_bayes") & (df["intervention"] == "baseline")]["value"].mean()
    out = ["## Head scan (each head ablated alone)", "",
           f"`{os.path.basename(path)}`, kind {', '.join(sorted(set(d['kind'])))}, "
           f"{len(delta)} heads; baseline MAE {_f(base)}. Change in MAE when ablated:", ""]
    top = [[s, _f(v)] for s, v in delta[::-1][:k].items()]
    bottom = [[s, _f(v)] for s, v in delta[:k].items()]
    out += ["Largest increase (Bayes heads):", "", _table(["head", "ΔMAE"], top), "",
            "Largest decrease (anti heads):", "", _table(["head", "ΔMAE"], bottom), ""]
    return out


def probes_section(run_dir) -> list[str]:
    out = []
    for name, what in (("probe_posterior", "posterior_x (ridge, held-out R²)"),
                       ("probe_generator", "generator identity posterior_b > 0.5 "
                                           "(logistic, held-out accuracy)"),
                       ("diffmeans_generator", "generator identity, difference of means "
                                               "(held-out accuracy of the projection)")):
        df, _ = _read(os.path.join(run_dir, f"{name}.parquet"))
        if df is None:
            continue
        key = "r2" if "r2" in set(df["metric"]) else "accuracy"
        d = df[df["metric"] == key].sort_values("layer")
        if not out:
            out = ["## Probes per layer (localisation)", ""]
        best = d.loc[d["value"].idxmax()]
        out += [f"{what}: best {best['site']} ({_f(best['value'], 3)}); "
                f"{int(best['n_train'])} train / {int(best['n_test'])} held-out prompts", "",
                _table(["site", key], [[r.site, _f(r.value, 3)] for r in d.itertuples()]), ""]
    return out


def steer_section(path, title) -> list[str]:
    df, meta = _read(path)
    if df is None:
        return []
    x = meta.extra or {}
    unit = x.get("scale", "unit")
    out = [f"## {title}", "",
           f"`{os.path.basename(path)}`: {x.get('direction_label')}, positions "
           f"{x.get('positions')}, {df['prompt_id'].nunique()} prompts (filter: "
           f"{x.get('where')}); alpha in "
           + ("standard deviations of the training activations along the direction"
              if unit == "std" else "residual units") + ".", ""]
    rows = []
    for site, g in df[df["metric"] == "p_x"].groupby("site", sort=False):
        agg = g.groupby("alpha")["value"].mean()
        clean = g.groupby("prompt_id")["clean_value"].first().mean()
        slope = x.get("slopes", {}).get(site, {}).get("p_x")
        std = (x.get("proj_std") or {}).get(site) if unit == "std" else 1.0
        near = agg[(agg.index >= -1) & (agg.index <= 1)]
        slope0 = float(np.polyfit(near.index.to_numpy(float), near.to_numpy(float), 1)[0]) \
            if len(near) >= 2 else None
        rows.append([site, _f(clean), _f(slope), _f(slope0),
                     _f(slope / std if slope is not None and std else None, 5), _f(std, 3),
                     f"{_f(agg.iloc[0])} .. {_f(agg.iloc[-1])}"])
    out += [_table(["site", "unsteered P(X)", "slope dP(X)/dalpha", "slope, |alpha|<=1",
                    "slope per residual unit", "1 alpha in residual units",
                    f"P(X) at alpha {df['alpha'].min():g} .. {df['alpha'].max():g}"], rows), ""]
    if df["site"].nunique() == 1:
        g = df[df["metric"] == "p_x"]
        agg = g.groupby("alpha")["value"].mean()
        mae = _mean(df, "mae_bayes", "alpha")
        out += [_table(["alpha", "mean P(X)", "MAE to Bayes"],
                       [[f"{a:g}", _f(v), _f(mae.get(a))] for a, v in agg.items()]), ""]
    return out


def robust_section(run_dir) -> list[str]:
    df, meta = _read(os.path.join(run_dir, "robust.parquet"))
    prompts, _ = _read(os.path.join(run_dir, "robust_prompts.parquet"))
    if df is None or prompts is None:
        return []
    d = df.merge(prompts[["prompt_id", "distractors", "symbols"]], on="prompt_id")
    names = list(dict.fromkeys(d["intervention"]))
    rows = []
    for (sym, k), g in d.groupby(["symbols", "distractors"]):
        mae = _mean(g, "mae_bayes", "intervention")
        drift = _mean(g, "order_drift", "intervention")
        rows.append([sym, int(k)] + [f"{_f(mae.get(n))} / {_f(drift.get(n))}" for n in names])
    return ["## Robustness: distractors and symbol swap", "",
            f"`robust.parquet`, model {_model(meta)}; each cell: MAE to Bayes / order drift.",
            "", _table(["symbols", "distractors"] + names, rows), ""]


def main(run_dir: str) -> None:
    parts = ["# bayes study", ""]
    outcomes, ometa = _read(os.path.join(run_dir, "outcomes.parquet"))
    if outcomes is not None:
        parts += [f"Model: {_model(ometa)}.", ""]
    parts += ablation_section(os.path.join(run_dir, "ablate.parquet"),
                              "Evidence sweep: MAE to Bayes, baseline vs ablations")
    parts += probes_section(run_dir)
    parts += scan_section(os.path.join(run_dir, "scan.parquet"))
    parts += steer_section(os.path.join(run_dir, "steer.parquet"),
                           "Steering dose-response along the best posterior probe direction")
    parts += steer_section(os.path.join(run_dir, "steer_diffmeans.parquet"),
                           "Steering along the generator difference of means, every layer")
    parts += robust_section(run_dir)
    print("\n".join(parts))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python pipelines/bayes_report.py RUN_DIR")
    main(sys.argv[1])
