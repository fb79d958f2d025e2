"""Study helpers of formats-psm and cot-mediation (pipelines/*.py): true effects from the
experiment design on the right units, the top heads, the side-by-side table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "pipelines" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_formats_compare_true_effects_on_the_contrast_units(tmp_path):
    fp = _load("formats_psm")
    rng = np.random.default_rng(0)
    n = 60
    hard = rng.random(n) < 0.5
    # potential outcomes: few-shot helps only hard units (+1), polite never
    exp = pd.DataFrame([{"unit_id": f"u{i}", "format": f,
                         "correct": float((f == "fewshot" and hard[i]) or (not hard[i]))}
                        for i in range(n) for f in ("direct", "polite", "fewshot")])
    got = np.where(hard, "fewshot", np.where(rng.random(n) < 0.5, "direct", "polite"))
    got[:4] = "direct"
    hard[:4] = True
    exp.loc[exp.unit_id.isin([f"u{i}" for i in range(4)]) & (exp.format == "fewshot"),
            "correct"] = 1.0
    exp.loc[exp.unit_id.isin([f"u{i}" for i in range(4)]) & (exp.format != "fewshot"),
            "correct"] = 0.0
    obs = pd.DataFrame({"unit_id": [f"u{i}" for i in range(n)], "format": got,
                        "correct": exp.query("format == 'direct'")["correct"].to_numpy()})
    for units in (exp, obs):  # the columns every unit table (schema units) has
        units["prompt_id"] = [f"p{i}" for i in range(len(units))]
        units["family"], units["prompt"], units["target"] = "formats", "Q:", " 1"
    eff = [{"estimand": e, "estimate": 0.5, "ci_low": 0.0, "ci_high": 1.0, "n_sets": 4,
            "se": 0.25, "p_value": 0.05, "se_method": "test"}
           for e in ("ATT", "ATC", "ATE", "naive")]
    group = {"all": 30, "matched_ess": 4.0, "matched": 4, "unmatched": 26, "discarded": 0}
    summ = {"tool": "psm", "input": "obs.parquet", "treatment": "format", "outcome": "correct",
            "covariates": ["difficulty"], "covariates_from": "option",
            "reference_level": "direct", "levels": ["direct", "fewshot", "polite"],
            "n_units": n, "dropped_missing": {"rows": 0}, "options": {}, "contrasts": [
                {"contrast": "fewshot vs direct", "treated_level": "fewshot",
                 "control_level": "direct", "n_treated": 30, "n_control": 30,
                 "propensity": {"model": "logistic", "description": "test"},
                 "matching": {"distance": "logit", "ratio": 1, "replace": False,
                              "caliper_sd": 0.2, "caliper_width": 0.1},
                 "positivity": {"common_support": "both", "discarded_treated": 0,
                                "discarded_control": 0, "extreme_ps_treated": 0,
                                "extreme_ps_control": 0},
                 "counts": {e: {"treated": group, "control": group}
                            for e in ("ATT", "ATC", "ATE")},
                 "effects": eff, "sensitivity": {}}]}
    exp.to_parquet(tmp_path / "exp.parquet")
    obs.to_parquet(tmp_path / "obs.parquet")
    (tmp_path / "psm.json").write_text(json.dumps(summ))
    out = fp.compare(str(tmp_path / "exp.parquet"), str(tmp_path / "obs.parquet"),
                     str(tmp_path / "psm.json"), str(tmp_path / "cmp"))
    r = out.set_index("estimand")
    # ATT: units that received few-shot are all hard -> +1; ATC: received direct
    assert r.loc["ATT", "true"] == pytest.approx(1.0)
    n_direct = int((got == "direct").sum())
    assert r.loc["ATC", "true"] == pytest.approx(4 / n_direct)
    assert r.loc["ATE", "true_n_units"] == int((got != "polite").sum())
    assert (tmp_path / "cmp" / "comparison.md").read_text().count("| fewshot vs direct |") == 3
    from dolm.errors import InputError
    from dolm.formats import validate_file

    assert validate_file(str(tmp_path / "cmp" / "comparison.parquet")) == ("psm_check", [])
    # a unit table without the outcome column is refused, naming the file and the column
    exp.drop(columns="correct").to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad\.parquet.*correct"):
        fp.compare(str(tmp_path / "bad.parquet"), str(tmp_path / "obs.parquet"),
                   str(tmp_path / "psm.json"), str(tmp_path / "cmp2"))


def test_cot_top_heads_and_side_by_side(tmp_path):
    cm = _load("cot_mediation")
    from dolm.formats import Run, write_table

    def rows(method, mediators, est, site=None):
        return pd.DataFrame([{
            "method": method, "mediator": m, "effect": e, "estimate": v * (2 if e == "total"
                                                                          else 1),
            "ci_low": v - 1, "ci_high": v + 1, "se": 0.1, "p_value": 0.5, "q_value": 0.5,
            "significant": False, "n_units": 8, "ci_method": "x",
            "site": (site or {}).get(m)} for m, v in zip(mediators, est, strict=True)
            for e in ("acme_average", "acme_control", "ade_average", "total")])

    stat = rows("statistical", ["attn_to.numbers.L0.H1", "attn_to.numbers.L1.H0",
                                "attn_to.numbers.L1.H1", "other"], [0.1, -0.5, 0.3, 9.0])
    write_table(stat, str(tmp_path / "stat.parquet"), schema="mediation",
                run=Run(tool="test", argv=["t"]), extra={"outcome": "exact_match"})
    assert cm.top(str(tmp_path / "stat.parquet"), 2) == "head.1.0,head.1.1"
    ivt = rows("interventional", ["head.1.0", "head.1.1"], [0.02, 0.0],
               site={"head.1.0": "head.1.0", "head.1.1": "head.1.1"})
    write_table(ivt, str(tmp_path / "iv.parquet"), schema="mediation",
                run=Run(tool="test", argv=["t"]), extra={"outcome": "target_correct"})
    out = cm.compare([str(tmp_path / "iv.parquet")], str(tmp_path / "stat.parquet"),
                     str(tmp_path / "cmp"))
    assert set(out.site) == {"head.1.0", "head.1.1"}
    s = out.set_index(["site", "method"])
    assert s.loc[("head.1.0", "statistical"), "acme_average"] == pytest.approx(-0.5)
    assert s.loc[("head.1.0", "statistical"), "outcome"] == "exact_match"
    assert s.loc[("head.1.0", "interventional"), "outcome"] == "target_correct"
    assert s.loc[("head.1.0", "interventional"), "total"] == pytest.approx(0.04)
