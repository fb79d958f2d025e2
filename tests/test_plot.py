"""dolm-plot: every figure kind renders from small synthetic files written with the real
schemas; images are non-blank and of the expected size; the report embeds every figure
and the provenance; bad input exits 3."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dolm.formats import Run, write_json, write_table
from dolm.formats.schema import available_schemas
from dolm_tools.plot import style
from dolm_tools.plot.draw import load_sources, render
from dolm_tools.plot.registry import load_all, plan

MODELS = {
    "toy": {"spec": "toy", "architecture": "gpt2", "weights_sha256": "a" * 64, "n_layers": 4},
    "gpt2-small": {"spec": "gpt2", "architecture": "gpt2", "weights_sha256": "b" * 64,
                   "n_layers": 6},
}


def installed(*schemas: str) -> bool:
    return all(s in available_schemas() for s in schemas)


def needs(*schemas: str):
    missing = [s for s in schemas if s not in available_schemas()]
    return pytest.mark.skipif(bool(missing), reason=f"schema not installed yet: {missing}")


def make_run(tool: str, model: str | None = "toy", seed: int = 0) -> Run:
    run = Run(tool, argv=[f"dolm-{tool}", "--model", model or "-", "--seed", str(seed)],
              seed=seed)
    if model:
        run.set_model(MODELS[model])
    return run


# ------------------------------------------------------------------ synthetic tables


def effects_trace(n_layers: int = 4, n_pos: int = 6, n_prompts: int = 3, peak: int = 2,
                  seed: int = 0) -> pd.DataFrame:
    """A causal trace over resid_pre / attn_out / mlp_out with a bump at (peak, last-1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_prompts):
        for fam, scale in (("resid_pre", 1.0), ("attn_out", 0.4), ("mlp_out", 0.7)):
            for layer in range(n_layers):
                for pos in range(n_pos):
                    bump = np.exp(-((layer - peak) ** 2) / 2.0) * (pos == n_pos - 2)
                    v = scale * (2.0 * bump - 0.3 * (pos == 0)) + 0.05 * rng.normal()
                    for metric, val in (("logit_diff", v), ("recovery", v / 2)):
                        rows.append(dict(prompt_id=f"p{p}", tool="patch",
                                         intervention=f"denoise {fam}.{layer}@{pos}",
                                         site=f"{fam}.{layer}", layer=layer, position=pos,
                                         head=None, window=None, kind="denoise", alpha=None,
                                         component=None, metric=metric, value=float(val)))
    return _effects_frame(rows)


def effects_heads(n_layers: int = 4, n_heads: int = 4, n_prompts: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for p in range(n_prompts):
        for layer in range(n_layers):
            for h in range(n_heads):
                v = (-1.5 if (layer, h) == (2, 1) else 0.6 if (layer, h) == (3, 0) else 0.0)
                rows.append(dict(prompt_id=f"p{p}", tool="ablate",
                                 intervention=f"zero head.{layer}.{h}", site=f"head.{layer}.{h}",
                                 layer=layer, position=None, head=h, window=None, kind="zero",
                                 alpha=None, component=f"head.{layer}.{h}", metric="logit_diff",
                                 value=float(v + 0.05 * rng.normal())))
    for p in range(n_prompts):
        for comp, v in (("head.2.1+head.3.0", -2.0), ("mlp_out.1", 0.4), ("attn_out.0", -0.2)):
            rows.append(dict(prompt_id=f"p{p}", tool="ablate", intervention=f"mean {comp}",
                             site=None, layer=None, position=None, head=None, window=None,
                             kind="mean", alpha=None, component=comp, metric="logit_diff",
                             value=float(v + 0.1 * rng.normal())))
    return _effects_frame(rows)


def effects_steer(n_prompts: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    rows = []
    for p in range(n_prompts):
        for layer in (1, 3):
            for a in (-4.0, -2.0, 0.0, 2.0, 4.0):
                v = np.tanh(a / (1 + layer)) * 2 + 0.05 * rng.normal()
                rows.append(dict(prompt_id=f"p{p}", tool="steer",
                                 intervention=f"add resid_post.{layer} alpha={a}",
                                 site=f"resid_post.{layer}", layer=layer, position=None,
                                 head=None, window=None, kind="add", alpha=a, component=None,
                                 metric="prob_target", value=float(v)))
        # whole-prompt interventions (no layer, component or strength)
        for name, v in (("swap subject", -0.4), ("swap relation", 0.1)):
            rows.append(dict(prompt_id=f"p{p}", tool="patch", intervention=name, site=None,
                             layer=None, position=None, head=None, window=None, kind="swap",
                             alpha=None, component=None, metric="prob_target",
                             value=float(v + 0.05 * rng.normal())))
    return _effects_frame(rows)


def _effects_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in ("layer", "position", "head", "window"):
        df[col] = df[col].astype("Int64")
    df["alpha"] = df["alpha"].astype("float64")
    for col in ("site", "kind", "component"):
        df[col] = df[col].astype(object)
    return df


def bayes_prompts(n_draws: int = 6, perms: int = 3) -> pd.DataFrame:
    from math import comb  # noqa: F401

    rows = []
    i = 0
    for tpl in ("base", "independent"):
        for nx in range(n_draws + 1):
            for _k in range(perms):
                post = 0.625 if tpl == "independent" else (
                    0.5 * 0.5 ** n_draws * 0.5 + 0.5 * 0.75 ** nx * 0.25 ** (n_draws - nx) * 0.75
                ) / (0.5 * 0.5 ** n_draws + 0.5 * 0.75 ** nx * 0.25 ** (n_draws - nx))
                rows.append(dict(prompt_id=f"bayes-eval-{i:06d}", family="bayes",
                                 prompt="Draws from one bag:" + " X" * nx + " Y" * (n_draws - nx),
                                 target=" X", foil=" Y", choices=[" X", " Y"], cf_prompt=None,
                                 cf_target=None, cf_foil=None, spans=None, cf_spans=None,
                                 group_id=f"n{n_draws}x{nx}", split="eval", n_draws=n_draws,
                                 n_x=nx, posterior_x=float(post), template=tpl))
                i += 1
    return pd.DataFrame(rows)


def outcomes_for(prompts: pd.DataFrame, noise: float, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    post = prompts["posterior_x"].to_numpy()
    px = np.clip(post + noise * rng.normal(size=len(post)), 0.01, 0.99)
    df = pd.DataFrame({
        "prompt_id": prompts["prompt_id"],
        "n_tokens": np.full(len(post), 8, dtype=np.int64),
        "target_logprob": np.log(px),
        "target_rank": (px < 0.5).astype(np.int64),
        "correct": px >= 0.5,
        "choice_probs": [[float(p), float(1 - p)] for p in px],
        "choice_pred": (px < 0.5).astype(np.int64),
    })
    for span in ("draws", "header"):
        for layer in range(2):
            for h in range(2):
                df[f"attn_to.{span}.L{layer}.H{h}"] = rng.uniform(0, 0.8, len(df))
    return df


def lens_table(n_layers: int = 4, n_prompts: int = 2) -> pd.DataFrame:
    """Rows as dolm-lens writes them: prompt x lens x layer x position x rank."""
    rows = []
    toks = [" the", " X", " Y", " bag"]
    for p in range(n_prompts):
        for lens in ("logit", "tuned"):
            for layer in range(n_layers):
                for pos in (4, 5):
                    x = layer / (n_layers - 1)
                    if lens == "tuned":
                        x = min(1.0, x + 0.25)
                    choice = [float(-3 + 2.5 * x), float(-1.5 - 0.5 * x)]
                    for rank in range(3):
                        prob = float(max(0.05, 0.9 * x - 0.2 * rank))
                        rows.append(dict(
                            prompt_id=f"p{p}", lens=lens, site=f"resid_post.{layer}",
                            layer=layer, position=pos, rank=rank,
                            token=toks[(layer + rank) % 4], token_id=(layer + rank) % 4,
                            prob=prob, logprob=float(np.log(prob)), entropy=float(3 - 2 * x),
                            kl_to_final=float((1 - x) * (2 if lens == "logit" else 1)),
                            target_logprob=float(-3 + 2.8 * x), target_rank=int(3 - 3 * x),
                            choice_logprobs=choice, intended=0,
                            crossing_layer=(n_layers // 2 if lens == "logit" else 1)
                            if p == 0 else None))
    df = pd.DataFrame(rows)
    for col in ("intended", "crossing_layer", "target_rank"):
        df[col] = df[col].astype("Int64")
    return df


def probes_table(n_layers: int = 4, peak: int = 2) -> pd.DataFrame:
    rows = []
    for layer in range(n_layers):
        acc = 0.6 + 0.3 * np.exp(-((layer - peak) ** 2))
        for metric, v in (("accuracy", acc), ("auc", acc + 0.05), ("train_accuracy", acc + 0.05)):
            rows.append(dict(site=f"resid_post.{layer}", layer=layer, method="probe_logistic",
                             label="cot", metric=metric, value=float(v), n_train=80, n_test=20,
                             best=layer == peak))
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    return df


def write_directions(path: Path, run: Run | None, n_layers: int = 4, d: int = 4) -> dict:
    """Directions as dolm-steer fit writes them (numpy, no torch); returns dolm.extra."""
    from safetensors.numpy import save_file

    sites = [f"resid_post.{layer}" for layer in range(n_layers)]
    extra = {"method": "probe", "sites": sites, "label": "cot", "position": "last",
             "best_site": sites[2], "norms": {s: 1.0 + i for i, s in enumerate(sites)},
             "proj_mean": {s: 0.0 for s in sites}, "proj_std": {s: 1.0 for s in sites},
             "scores": {s: {"accuracy": 0.6 + 0.1 * i, "auc": 0.65 + 0.1 * i}
                        for i, s in enumerate(sites)}}
    if run is not None:
        tensors = {f"direction.{s}": np.ones(d, dtype=np.float32) / 2 for s in sites}
        meta = {"dolm.schema": json.dumps({"name": "directions", "version": 1}),
                "dolm.provenance": json.dumps(run.chain()), "dolm.extra": json.dumps(extra)}
        save_file(tensors, str(path), metadata=meta)
    return extra


def write_translators(path: Path, run: Run | None, n_layers: int = 4, d: int = 4) -> dict:
    """Translators as dolm-lens train writes them (numpy, no torch); returns dolm.extra."""
    from safetensors.numpy import save_file

    extra = {"site": "resid_post", "d_model": d, "n_layers": n_layers,
             "layers": list(range(n_layers - 1)), "model_spec": "toy",
             "heldout_kl": {"layer": list(range(n_layers)),
                            "logit": [1.5 / (i + 1) for i in range(n_layers - 1)] + [0.0],
                            "tuned": [0.5 / (i + 1) for i in range(n_layers - 1)] + [0.0],
                            "n_tokens": 64}}
    if run is not None:
        tensors = {}
        for layer in range(n_layers - 1):
            tensors[f"translator.{layer}.weight"] = np.zeros((d, d), dtype=np.float32)
            tensors[f"translator.{layer}.bias"] = np.zeros(d, dtype=np.float32)
        meta = {"dolm.schema": json.dumps({"name": "translators", "version": 1}),
                "dolm.provenance": json.dumps(run.chain()), "dolm.extra": json.dumps(extra)}
        save_file(tensors, str(path), metadata=meta)
    return extra


def dla_table(n_layers: int = 4, n_heads: int = 2, n_prompts: int = 2) -> pd.DataFrame:
    """Rows as dolm-dla writes them: one per prompt x component (logit_diff, two choices)."""
    rows = []
    for p in range(n_prompts):
        comps = [("embed", "embed", None, None, 0.3, True),
                 ("pos_embed", "pos_embed", None, None, 0.05, True)]
        for layer in range(n_layers):
            comps.append((f"attn.{layer}", "attn", layer, None, 0.5 * layer - 0.4, True))
            for h in range(n_heads):
                comps.append((f"head.{layer}.{h}", "head", layer, h,
                              (0.5 * layer - 0.4) / n_heads, False))
            comps.append((f"mlp.{layer}", "mlp", layer, None, 0.8 - 0.3 * layer, True))
        comps += [("bias.final_norm", "bias", None, None, -0.1, True),
                  ("bias.unembed", "bias", None, None, 0.02, True)]
        total = sum(c[4] for c in comps if c[5])
        for comp, kind, layer, head, value, in_total in comps:
            a1 = 0.5 * layer - 0.4 if layer is not None else None
            m1 = 0.8 - 0.3 * layer if layer is not None else None
            rows.append(dict(
                prompt_id=f"p{p}", position=7, metric="logit_diff", target=" A", foil=" B",
                target_id=5, foil_id=6, component=comp, kind=kind, layer=layer, head=head,
                value=value + 0.01 * p, in_total=in_total, metric_value=total + 0.01 * p * 11,
                norm_scale=0.9, attn_to_1=a1, attn_to_2=None if a1 is None else -a1 / 2,
                mlp_to_1=m1, mlp_to_2=None if m1 is None else m1 / 3,
                total_to_1=None if a1 is None else a1 + m1,
                total_to_2=None if a1 is None else -a1 / 2 + m1 / 3,
                attn_mlp_ratio=None if a1 is None else abs(a1) / (abs(a1) + abs(m1)),
                decision_diff=None if a1 is None else (a1 + m1) - (-a1 / 2 + m1 / 3)))
    df = pd.DataFrame(rows)
    for col in ("layer", "head", "foil_id"):
        df[col] = df[col].astype("Int64")
    return df


def patch_summary_table(n_prompts: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_prompts):
        for grid in ("resid_pre", "mlp_out"):
            rows.append(dict(prompt_id=f"p{p}", grid=grid, window=None, kind="denoise",
                             mode="noise", method="exact", metric="logit_diff",
                             clean_value=2.0, corrupt_value=-1.0, n_cells=24,
                             peak_layer=int(rng.integers(1, 4)), peak_position=4, peak_head=None,
                             peak_value=float(rng.uniform(0.4, 1.0)), peak_effect=2.0,
                             num_choice_flips=int(rng.integers(0, 5)),
                             gini_coefficient=float(rng.uniform(0.5, 0.9)),
                             top5_concentration=float(rng.uniform(0.3, 0.8)),
                             clean_choice=" X", clean_chose_intended=True))
    df = pd.DataFrame(rows)
    for col in ("window", "peak_head"):
        df[col] = df[col].astype("Int64")
    return df


def psm_tables(n: int = 80, seed: int = 0) -> dict:
    """Balance, units, pairs and summary of a toy matching (consistent, not a real fit)."""
    rng = np.random.default_rng(seed)
    contrast = "direct vs cot"
    ps = rng.uniform(0.05, 0.95, n)
    treated = rng.random(n) < ps
    units = pd.DataFrame({
        "contrast": contrast, "row": np.arange(n, dtype=np.int64),
        "id": [f"u{i}" for i in range(n)],
        "level": np.where(treated, "direct", "cot"), "treated": treated, "propensity": ps,
        "logit_propensity": np.log(ps / (1 - ps)), "discarded": (ps > 0.9) & treated,
        "weight_att": np.where((ps < 0.8), 1.0, 0.0), "weight_atc": np.nan,
        "weight_ate": np.where((ps < 0.8), 1.0, 0.0),
        "x.difficulty": rng.normal(size=n) + treated, "x.length": rng.normal(size=n),
        "x.grp[b]": (rng.random(n) < 0.3 + 0.3 * treated).astype(float)})
    brow = []
    for est in ("ATT", "ATE"):
        for var, before, after in (("distance", 1.0, 0.05), ("difficulty", -0.9, 0.04),
                                   ("length", 0.3, -0.12), ("grp[b]", 0.08, 0.02)):
            for sample, smd in (("all", before), ("matched", after)):
                brow.append(dict(contrast=contrast, estimand=est, variable=var,
                                 type="binary" if "[" in var else "continuous", sample=sample,
                                 mean_treated=0.5 + smd / 4, mean_control=0.5, smd=smd,
                                 var_ratio=None if "[" in var else 1.1, ecdf_mean=abs(smd) / 4,
                                 ecdf_max=abs(smd) / 2))
    t_idx = np.flatnonzero(treated)[:20]
    c_idx = np.flatnonzero(~treated)[:20]
    k = min(len(t_idx), len(c_idx))
    pairs = pd.DataFrame({
        "contrast": contrast, "estimand": "ATT", "set_id": np.arange(k, dtype=np.int64),
        "treated_row": t_idx[:k].astype(np.int64), "control_row": c_idx[:k].astype(np.int64),
        "treated_id": [f"u{i}" for i in t_idx[:k]], "control_id": [f"u{i}" for i in c_idx[:k]],
        "treated_ps": ps[t_idx[:k]], "control_ps": ps[c_idx[:k]],
        "distance": np.abs(ps[t_idx[:k]] - ps[c_idx[:k]]), "weight": 1.0,
        "treated_outcome": rng.normal(-0.5, 1, k), "control_outcome": rng.normal(0, 1, k)})
    counts = {"all": 40, "matched_ess": 20.0, "matched": 20, "unmatched": 15, "discarded": 5}
    summary = {
        "tool": "psm", "input": "units.csv", "treatment": "format", "outcome": "score",
        "covariates": ["difficulty", "length", "grp"], "covariates_from": "option",
        "dag": None, "reference_level": "cot", "levels": ["cot", "direct"], "n_units": n,
        "dropped_missing": {"rows": 0}, "outcome_binary": False, "options": {},
        "contrasts": [{
            "contrast": contrast, "treated_level": "direct", "control_level": "cot",
            "n_treated": int(treated.sum()), "n_control": int((~treated).sum()),
            "propensity": {"model": "logistic", "description": "logistic regression"},
            "matching": {"distance": "logit", "ratio": 1, "replace": False, "caliper_sd": 0.2,
                         "caliper_width": 0.22},
            "positivity": {"common_support": "both", "discarded_treated": 5,
                           "discarded_control": 0, "extreme_ps_treated": 0,
                           "extreme_ps_control": 0},
            "counts": {"ATT": {"treated": counts, "control": counts}},
            "effects": [
                {"estimand": e, "estimate": v, "se": 0.07, "ci_low": v - 0.14,
                 "ci_high": v + 0.14, "p_value": 0.001, "n_sets": 20, "se_method": "ai"}
                for e, v in (("ATT", -0.45), ("ATE", -0.48), ("naive", -0.14))],
            "sensitivity": {}}]}
    return {"units": units, "balance": pd.DataFrame(brow), "pairs": pairs, "summary": summary}


def write_activations(path: Path, run: Run | None, n_layers: int = 3, rows: int = 8,
                      d: int = 16) -> None:
    """A small activations file; without the schema installed, a bare HDF5 file."""
    import h5py

    if installed("activations"):
        from dolm.formats import finish_h5, open_h5_for_write

        fh = open_h5_for_write(path, "activations", run, extra={"sites": "resid_post.*"})
    else:
        fh = h5py.File(path, "w")
    text = h5py.string_dtype("utf-8")
    fh.create_dataset("prompt_id", data=np.array([f"p{i // 2}" for i in range(rows)],
                                                 dtype=object), dtype=text)
    fh.create_dataset("prompt_index", data=np.arange(rows, dtype=np.int64) // 2)
    fh.create_dataset("position", data=np.arange(rows, dtype=np.int64) % 2 + 3)
    fh.create_dataset("position_label", data=np.array(["last"] * rows, dtype=object), dtype=text)
    fh.create_dataset("token_id", data=np.arange(rows, dtype=np.int64))
    rng = np.random.default_rng(0)
    for layer in range(n_layers):
        for fam, scale in (("resid_post", 1.0 + layer), ("mlp_out", 0.5)):
            fh.create_dataset(f"{fam}.{layer}",
                              data=(scale * rng.normal(size=(rows, d))).astype(np.float32))
    if installed("activations"):
        finish_h5(fh, path, "activations", run)
    else:
        fh.close()


def cunit_metrics_table(f1: float = 0.8, rounds: int = 4) -> pd.DataFrame:
    rows = [dict(metric=m, value=v, group="structure", regime=None, step=None, n=None)
            for m, v in (("f1", f1), ("precision", f1 + 0.1), ("tpr", f1 - 0.1),
                         ("fdr", 1 - f1 - 0.1), ("shd", 3.0), ("n_edges_true", 12.0))]
    rows += [dict(metric="cf_corr", value=0.9, group="counterfactual", regime=None, step=None,
                  n=100)]
    rows += [dict(metric="int_nll", value=1.2 + 0.1 * i, group="likelihood", regime=r,
                  step=None, n=50) for i, r in enumerate(("all", "do(x0,x2)", "do(x1,x3)"))]
    rows += [dict(metric="seconds", value=3.0, group="training", regime=None, step=None,
                  n=None)]
    for r in range(rounds):
        for m, v in (("h", 0.2 / (r + 1)), ("train_nll", 2.0 - 0.2 * r), ("val_nll", 2.1 - 0.2 * r),
                     ("temperature", 0.6 ** r), ("rho", 10.0 ** r), ("edges", 30.0 - 3 * r)):
            rows.append(dict(metric=m, value=v, group="history", regime=None, step=r, n=None))
    df = pd.DataFrame(rows)
    df["step"] = df["step"].astype("Int64")
    df["n"] = df["n"].astype("Int64")
    return df


def variables_table(n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(4)
    x0 = rng.normal(size=n)
    x1 = 0.8 * x0 + 0.3 * rng.normal(size=n)
    x2 = -0.5 * x1 + 0.5 * rng.normal(size=n)
    target = np.where(np.arange(n) < 40, "", "x1")
    x1[40:] = 2.0 + 0.2 * rng.normal(size=n - 40)
    return pd.DataFrame({"x0": x0, "x1": x1, "x2": x2, "target": target,
                         "regime": np.where(target == "", "obs", "do(x1)"), "split": "train"})


def mediation_tables(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    meds = [f"attn_to.draws.L{layer}.H{h}" for layer in range(2) for h in range(2)]
    rows, sens, per = [], [], []
    for i, m in enumerate(meds):
        acme = 0.3 - 0.15 * i + 0.02 * rng.normal()
        ade = 0.1 + 0.02 * rng.normal()
        for effect, est in (("acme_average", acme), ("ade_average", ade), ("total", acme + ade),
                            ("prop_mediated_average", acme / (acme + ade))):
            rows.append(dict(method="statistical", mediator=m, effect=effect, estimate=est,
                             ci_low=est - 0.08, ci_high=est + 0.08, se=0.04, p_value=0.01,
                             q_value=0.02, significant=abs(acme) > 0.1, n_units=100,
                             ci_method="quasi-bayesian"))
        # the same mediators measured by patching a model (no average rows)
        for effect, est in (("acme_control", acme * 0.8), ("ade_control", ade), ("total",
                                                                                  acme + ade)):
            rows.append(dict(method="interventional", mediator=m, effect=effect, estimate=est,
                             ci_low=est - 0.05, ci_high=est + 0.05, se=0.03, p_value=0.02,
                             q_value=0.03, significant=True, n_units=40,
                             ci_method="bootstrap"))
        for rho in np.round(np.linspace(-0.9, 0.9, 19), 2):
            sens.append(dict(mediator=m, rho=float(rho), acme=float(acme - 0.5 * rho)))
        per.append(dict(mediator=m, acme_average=acme, ci_low=acme - 0.08,
                        ci_high=acme + 0.08, p_value=0.01, q_value=0.02,
                        significant=abs(acme) > 0.1, rho_at_zero=acme / 0.5))
    summary = {"tool": "mediate", "method": "statistical", "input": "units.parquet",
               "treatment": "cot", "outcome": "correct", "covariates": ["difficulty"],
               "n_units": 100, "control_value": "False", "treat_value": "True", "options": {},
               "inference": "quasi-Bayesian", "n_mediators": len(meds), "mediators": per,
               "skipped": [], "top": [p["mediator"] for p in per]}
    return {"effects": pd.DataFrame(rows), "sensitivity": pd.DataFrame(sens),
            "summary": summary}


def psm_check_table() -> pd.DataFrame:
    """Two estimands of one contrast: the first matched CI covers the truth, the second not."""
    return pd.DataFrame({
        "contrast": "polite vs direct", "estimand": ["ATT", "ATE"],
        "naive": [-0.30, -0.30], "naive_ci_low": [-0.5, -0.5], "naive_ci_high": [-0.1, -0.1],
        "matched": [-0.20, -0.05], "matched_ci_low": [-0.35, -0.10],
        "matched_ci_high": [-0.05, 0.00], "matched_n_sets": np.array([30, 60], dtype=np.int64),
        "true": [-0.18, -0.15], "true_ci_low": [-0.25, -0.2], "true_ci_high": [-0.1, -0.1],
        "true_n_units": np.array([30, 90], dtype=np.int64), "true_all_units": [-0.15, -0.15],
        "matched_ci_covers_true": [True, False], "rosenbaum_gamma": [1.4, None],
        "e_value": [2.1, 1.2], "discarded_treated": np.array([0, 0], dtype=np.int64),
        "discarded_control": np.array([1, 1], dtype=np.int64),
        "max_abs_smd_before": [0.8, 0.7], "max_abs_smd_after": [0.05, 0.08]})


def mediation_comparison_table() -> pd.DataFrame:
    rows = []
    for i, site in enumerate(("head.0.1", "head.1.2", "head.2.0")):
        for method, outcome, est in (("statistical", "exact_match", 0.1 * i),
                                     ("interventional", "target_logprob", -0.5 * i),
                                     ("interventional", "target_correct", -0.05 * i)):
            rows.append(dict(site=site, method=method, outcome=outcome, mediator=site,
                             acme_control=est, acme_treated=est, acme_average=est,
                             ade_average=0.1, total=est + 0.1, acme_ci_low=est - 0.05,
                             acme_ci_high=est + 0.05, q_value=0.2, n_units=40))
    return pd.DataFrame(rows)


def units_table(n: int = 60, seed: int = 0) -> pd.DataFrame:
    """A unit table: a 3-level treatment, a covariate, outcomes, and columns no figure splits
    by (ids, a list column, a float)."""
    rng = np.random.default_rng(seed)
    fmt = np.array(["direct", "polite", "fewshot"])[np.arange(n) % 3]
    return pd.DataFrame({
        "prompt_id": [f"p{i}" for i in range(n)], "family": "formats", "prompt": "Q:",
        "target": " 1", "format": fmt, "difficulty": (np.arange(n) // 3) % 2 + 1,
        "operands": [[1, 2]] * n, "propensity": rng.random(n),
        "correct": (fmt == "direct").astype(float),
        "target_logprob": np.where(fmt == "polite", -2.0, -0.5)})


def dag_obj() -> dict:
    return {
        "nodes": ["format", "completion", "difficulty", "length", "attention"],
        "edges": [
            {"source": "difficulty", "target": "format", "weight": 0.8},
            {"source": "difficulty", "target": "completion", "weight": -0.6},
            {"source": "length", "target": "format", "weight": 0.3},
            {"source": "length", "target": "completion", "weight": -0.4},
            {"source": "format", "target": "attention", "weight": 1.2},
            {"source": "attention", "target": "completion", "weight": 0.9},
        ],
        "latent": ["length"],
        "roles": {"treatment": "format", "outcome": "completion", "mediators": ["attention"]},
    }


# ------------------------------------------------------------------ a run directory


def learned_dag() -> dict:
    obj = dag_obj()
    # a learned graph misses the length edges and reverses attention -> completion (a DAG:
    # dolm refuses a cyclic one on reading)
    obj["edges"] = [e for e in obj["edges"] if e["source"] != "length"
                    and (e["source"], e["target"]) != ("attention", "completion")]
    obj["edges"].append({"source": "completion", "target": "attention", "weight": 0.2})
    obj.pop("latent")
    return obj


def circuit_files() -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """An edges table, a circuit and a faithfulness curve of a 2-layer, 2-head graph."""
    rows = []
    senders = ["embed", "head.0.0", "head.0.1", "mlp.0"]
    for i, s_ in enumerate(senders):
        for j, (d, c) in enumerate([("head.1.0", "q"), ("head.1.0", "k"), ("mlp.1", None),
                                    ("logits", None)]):
            rows.append({"src": s_, "dst": d, "channel": c, "score": (i - j) / 3.0})
    e = pd.DataFrame(rows)
    e["abs_score"] = e["score"].abs()
    e["rank"] = e["abs_score"].rank(ascending=False, method="first").astype(int)
    e["method"], e["metric"], e["prompt_id"] = "exact", "logit_diff", None
    circ = {"model": {"spec": "toy", "weights_sha256": None, "n_layers": 2, "n_heads": 2},
            "method": "exact", "metric": "logit_diff", "corruption": "cf",
            "nodes": ["embed", "head.0.0", "head.1.0", "logits"],
            "edges": [{"source": "embed", "target": "head.1.0", "channel": "q", "score": 1.0},
                      {"source": "head.0.0", "target": "head.1.0", "channel": "k",
                       "score": -0.5},
                      {"source": "head.1.0", "target": "logits", "channel": None,
                       "score": 2.0}],
            "selection": {"top_n": 3, "threshold": None, "n_candidates": 16}}
    f = pd.DataFrame({"kind": ["circuit", "curve", "curve", "curve"], "n_edges": [3, 1, 3, 16],
                      "metric": "logit_diff", "ablate": "cf", "full": 2.0,
                      "circuit": [1.8, 0.5, 1.8, 2.0], "complement": [0.1, 1.0, 0.1, -2.0],
                      "ablated": -2.0, "faithfulness": [0.9, 0.25, 0.9, 1.0],
                      "faithfulness_norm": [0.95, 0.6, 0.95, 1.0],
                      "complement_ratio": [0.05, 0.5, 0.05, -1.0], "n_prompts": 4})
    return e, circ, f


def synthetic() -> list[tuple[str, str, str, object, str | None]]:
    """(file name, schema, tool, data, model) for every figure kind: data is a DataFrame,
    a dict (JSON) or, for HDF5, the keyword arguments of ``write_activations``."""
    prompts = bayes_prompts()
    gpt2 = effects_trace(n_layers=6, peak=4, seed=3)
    psm = psm_tables()
    other = psm_tables(seed=1)["summary"]
    for e in other["contrasts"][0]["effects"]:
        for k in ("estimate", "ci_low", "ci_high"):
            e[k] += 0.2
    med = mediation_tables()
    med2 = mediation_tables(1)
    return [
        ("trace_toy.parquet", "effects", "patch", effects_trace(), "toy"),
        ("trace_gpt2.parquet", "effects", "patch", gpt2[gpt2["metric"] == "logit_diff"],
         "gpt2-small"),
        ("ablate.parquet", "effects", "ablate", effects_heads(), "toy"),
        ("steer.parquet", "effects", "steer", effects_steer(), "toy"),
        ("prompts.parquet", "prompts", "gen-prompts", prompts, None),
        ("outcomes_toy.parquet", "outcomes", "collect-acts", outcomes_for(prompts, 0.05), "toy"),
        ("outcomes_gpt2.parquet", "outcomes", "collect-acts", outcomes_for(prompts, 0.15, 1),
         "gpt2-small"),
        ("acts_toy.h5", "activations", "collect-acts", {"n_layers": 3}, "toy"),
        ("acts_gpt2.h5", "activations", "collect-acts", {"n_layers": 5}, "gpt2-small"),
        ("patch_summary.parquet", "patch_summary", "patch", patch_summary_table(), "toy"),
        ("patch_summary_gpt2.parquet", "patch_summary", "patch", patch_summary_table(seed=1),
         "gpt2-small"),
        ("psm.units.parquet", "psm_units", "psm", psm["units"], None),
        ("psm.balance.parquet", "psm_balance", "psm", psm["balance"], None),
        ("psm.pairs.parquet", "psm_pairs", "psm", psm["pairs"], None),
        ("psm.json", "psm_summary", "psm", psm["summary"], "toy"),
        ("psm_gpt2.json", "psm_summary", "psm", other, "gpt2-small"),
        ("psm_check.parquet", "psm_check", "psm", psm_check_table(), "toy"),
        ("mediation_comparison.parquet", "mediation_comparison", "mediate",
         mediation_comparison_table(), "toy"),
        ("units.parquet", "units", "join_units", units_table(), "toy"),
        ("dag.json", "dag", "psm", dag_obj(), None),
        ("dag_learned.json", "dag", "train-cunit", learned_dag(), None),
        ("fit_a.parquet", "cunit_metrics", "train-cunit", cunit_metrics_table(), None),
        ("fit_b.parquet", "cunit_metrics", "train-cunit", cunit_metrics_table(0.6, 3), None),
        ("variables.parquet", "variables", "train-cunit", variables_table(), None),
        ("mediation.effects.parquet", "mediation", "mediate", med["effects"], "toy"),
        ("mediation.sensitivity.parquet", "mediation_sensitivity", "mediate",
         med["sensitivity"], "toy"),
        ("mediation.json", "mediation_summary", "mediate", med["summary"], "toy"),
        ("mediation_gpt2.json", "mediation_summary", "mediate", med2["summary"], "gpt2-small"),
        ("lens_toy.parquet", "lens", "lens", lens_table(), "toy"),
        ("lens_gpt2.parquet", "lens", "lens", lens_table(6), "gpt2-small"),
        ("translators.safetensors", "translators", "lens", {"n_layers": 4}, "toy"),
        ("probes_toy.parquet", "probes", "steer", probes_table(), "toy"),
        ("probes_gpt2.parquet", "probes", "steer", probes_table(6, 4), "gpt2-small"),
        ("directions.safetensors", "directions", "steer", {"n_layers": 4}, "toy"),
        ("dla_toy.parquet", "attributions", "dla", dla_table(), "toy"),
        ("dla_gpt2.parquet", "attributions", "dla", dla_table(6, 3), "gpt2-small"),
        ("edges.parquet", "edges", "circuit", circuit_files()[0], "toy"),
        ("circuit.json", "circuit", "circuit", circuit_files()[1], "toy"),
        ("faithfulness.parquet", "faithfulness", "circuit", circuit_files()[2], "toy"),
    ]


def file_key(name: str) -> str:
    return name.rsplit(".", 1)[0]


def write_run(d: Path) -> dict[str, Path]:
    """A small run folder: every synthetic file whose schema is installed."""
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, schema, tool, data, model in synthetic():
        if not installed(schema):
            continue
        path = d / name
        run = make_run(tool, model)
        if schema == "cunit_metrics":  # the fits compared are fits of one data table
            run.add_input("data.parquet", sha256="c" * 64)
        if isinstance(data, pd.DataFrame):
            write_table(data, path, schema, run)
        elif schema == "activations":
            write_activations(path, run, **data)
        elif schema == "translators":
            write_translators(path, run, **data)
        elif schema == "directions":
            write_directions(path, run, **data)
        else:
            write_json(data, path, schema, run)
        files[file_key(name)] = path
    return files


# ------------------------------------------------------------------ helpers


def exe(name: str = "dolm-plot") -> str:
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def dolm_plot(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


def png_pixels(data: bytes) -> np.ndarray:
    import io

    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(data), format="png")


def assert_drawn(data: bytes, size: tuple[int, int], what: str) -> None:
    """A PNG of the expected pixel size with real content (not blank, not a flat colour)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", what
    img = png_pixels(data)
    h, w = img.shape[:2]
    assert (w, h) == size, f"{what}: {w}x{h} pixels, expected {size[0]}x{size[1]}"
    rgb = img[..., :3]
    assert float(rgb.var()) > 1e-3, f"{what}: blank image"
    inked = float((rgb.min(axis=2) < 0.9).mean())
    assert inked > 0.01, f"{what}: only {inked:.1%} of the pixels are drawn"


def direct_sources(folder: Path) -> list:
    """Sources for the synthetic files whose schema has not landed yet (e.g. lens), made
    without the schema so that their figure functions are tested all the same."""
    from dolm.formats import FileMeta
    from dolm_tools.plot.registry import Source

    out = []
    for name, schema, tool, data, model in synthetic():
        if installed(schema):
            continue
        chain = [{"tool": tool, "argv": [f"dolm-{tool}"], "model": MODELS[model] if model
                  else None}]
        meta = FileMeta(path=name, schema=schema, version=1, provenance=chain)
        if isinstance(data, pd.DataFrame):
            out.append(Source(name, schema, "table", data, meta))
        elif schema == "activations":
            write_activations(folder / name, None, **data)
            out.append(Source(str(folder / name), schema, "hdf5", str(folder / name), meta))
        elif schema in ("translators", "directions"):
            writer = write_translators if schema == "translators" else write_directions
            out.append(Source(name, schema, "safetensors", writer(folder / name, None, **data),
                              meta))
        else:
            out.append(Source(name, schema, "json", data, meta))
    return out


def all_sources(files: dict[str, Path], folder: Path) -> list:
    from dolm_tools.plot.registry import label_sources

    loaded = load_sources([str(p) for p in files.values()])
    extra = direct_sources(folder)
    label_sources(loaded + extra)
    return loaded + extra


def spec_key(spec) -> str:
    return f"{'+'.join(spec.schemas)}:{spec.name}:{spec.mode}"


@pytest.fixture(scope="module")
def run_files(tmp_path_factory) -> dict[str, Path]:
    return write_run(tmp_path_factory.mktemp("plot") / "run")


@pytest.fixture(scope="module")
def rendered(run_files, tmp_path_factory) -> dict[str, list]:
    """Every planned figure of the run (and of the not-yet-installed schemas), as PNG."""
    out: dict[str, list] = {}
    for plot in plan(all_sources(run_files, tmp_path_factory.mktemp("direct"))):
        key = spec_key(plot.spec)
        if key not in out:  # one image per figure kind keeps the test fast
            out[key] = [(plot, style.figure_bytes(render(plot), "png"))]
    return out


# ------------------------------------------------------------------ every figure kind


@pytest.mark.parametrize("key", sorted(spec_key(s) for s in load_all()))
def test_every_figure_kind_renders(rendered, key):
    assert key in rendered, f"figure {key} was not drawn from the synthetic run"
    for plot, png in rendered[key]:
        assert_drawn(png, style.pixels(plot.size), plot.stem)


def test_titles_name_the_models(rendered):
    from dolm_tools.plot.draw import render as draw

    plot = rendered["effects:layers:compare"][0][0]
    fig = draw(plot)
    title = fig.get_suptitle()
    assert "Effect by layer" in title and "toy" in title and "gpt2" in title
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    # the toy trace peaks at layer 2, the 6-layer one at layer 4
    assert any(t.startswith("toy: peak L2") for t in labels), labels
    assert any(t.startswith("gpt2: peak L4") for t in labels), labels
    fig = draw(rendered["effects:trace:single"][0][0])
    assert fig.axes[0].get_xlabel() == "token position" and fig.axes[0].get_ylabel() == "layer"
    # signed effects: a diverging colour map centred at 0
    im = fig.axes[0].images[0]
    assert im.cmap.name == style.DIVERGING and im.norm.vcenter == 0


def test_check_figures_show_the_numbers(rendered):
    from dolm_tools.plot.draw import render as draw

    fig = draw(rendered["psm_check:check:single"][0][0])
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["polite vs direct: ATT ✓", "polite vs direct: ATE ✗"]
    # the matched estimates are drawn where the table puts them
    xs = sorted(float(x) for line in ax.lines if line.get_marker() == "D"
                for x in line.get_xdata())
    assert xs == pytest.approx([-0.20, -0.05])
    fig = draw(rendered["mediation_comparison:methods:single"][0][0])
    titles = [a.get_title() for a in fig.axes]
    assert titles == ["outcome: exact_match", "outcome: target_logprob",
                      "outcome: target_correct"]
    lp = fig.axes[1]
    assert sorted(float(line.get_xdata()[0]) for line in lp.lines
                  if line.get_marker() == "D") == pytest.approx([-1.0, -0.5, 0.0])


def test_covariate_distributions_are_the_weighted_ones(rendered):
    """psm_units covariates (bal.plot): the bars are the weighted shares of a 0/1 covariate,
    the steps a weighted density (integral 1) equal to numpy's, per group and sample."""
    from dolm_tools.plot.draw import render as draw

    plot = rendered["psm_units:covariates:single"][0][0]
    fig = draw(plot)
    d = psm_tables()["units"]
    covs = ["x.difficulty", "x.length", "x.grp[b]"]
    samples = [None, "weight_att", "weight_ate"]  # weight_atc is all missing: no column
    grid = np.array(fig.axes).reshape(len(covs), len(samples))
    assert [a.get_title() for a in grid[0]] == ["all units", "matched: ATT weights",
                                                 "matched: ATE weights"]
    t = d["treated"].to_numpy()
    for j, wcol in enumerate(samples):
        w = np.ones(len(d)) if wcol is None else d[wcol].to_numpy()
        bars = [p.get_height() for p in grid[2, j].patches]
        want = [np.sum((w * d["x.grp[b]"])[g]) / np.sum(w[g]) for g in (t, ~t)]
        assert bars == pytest.approx(want)
        steps = [a for a in grid[0, j].patches]
        assert len(steps) == 2
        x = d["x.difficulty"].to_numpy()
        edges = np.histogram_bin_edges(x, bins=min(30, max(5, int(np.sqrt(len(x))))))
        for step, g in zip(steps, (t, ~t), strict=True):
            sel = g & (w > 0)
            h, _ = np.histogram(x[sel], bins=edges, weights=w[sel], density=True)
            assert step.get_data().values == pytest.approx(h)
            assert np.sum(step.get_data().values * np.diff(edges)) == pytest.approx(1.0)


def test_units_figure_splits_by_treatment_and_covariates_only():
    from dolm_tools.plot.fig_psm import unit_conditions

    df = units_table()
    assert unit_conditions(df) == ["format", "difficulty"]
    from dolm_tools.plot.draw import render as draw

    plots = units_plots()
    by_format = next(p for p in plots if p.variant == "format")
    fig = draw(by_format)
    assert [a.get_ylabel() for a in fig.axes] == ["mean correct", "mean target_logprob"]
    heights = [b.get_height() for b in fig.axes[0].patches]
    assert heights == pytest.approx([1.0, 0.0, 0.0])  # direct, fewshot, polite (sorted)
    assert [b.get_height() for b in fig.axes[1].patches] == pytest.approx([-0.5, -0.5, -2.0])


def units_plots() -> list:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "units.parquet"
        write_table(units_table(), path, "units", make_run("join_units", "toy"))
        return plan(load_sources([str(path)]))


def test_heatmap_cells_show_enough_decimals_to_tell_them_apart():
    from dolm_tools.plot.common import cell_decimals

    # ablation MAE grid of the toy: 0.0195 .. 0.0405 read "0.02" everywhere with 2 decimals
    assert cell_decimals([0.0195, 0.0231, 0.0405]) == 3
    assert cell_decimals([0.1, 0.9]) == 2 and cell_decimals([1.0, 30.0]) == 2
    assert cell_decimals([0.001, 0.0012]) == 4 and cell_decimals([0.5]) == 2


def test_output_is_deterministic(rendered):
    plot = rendered["effects:layers:single"][0][0]
    for fmt in ("png", "svg", "pdf"):
        assert style.figure_bytes(render(plot), fmt) == style.figure_bytes(render(plot), fmt), fmt


def test_aggregation_is_the_mean_over_prompts():
    from dolm_tools.plot.common import mean_sem
    from dolm_tools.plot.fig_effects import layer_curve, trace_grid

    df = effects_trace(n_prompts=3)
    d = df[(df["metric"] == "logit_diff") & (df["site"].str.startswith("resid_pre"))]
    grid, xs, ys = trace_grid(d)
    want = d[(d["layer"] == 2) & (d["position"] == 4)]["value"].mean()
    assert grid[ys.index(2), xs.index(4)] == pytest.approx(want)
    agg, note = layer_curve(d)
    assert note == " at position 4"
    assert int(agg.loc[agg["mean"].abs().idxmax(), "layer"]) == 2
    m = mean_sem(pd.DataFrame({"prompt_id": ["a", "a", "b"], "k": 1, "value": [1.0, 3.0, 4.0]}),
                 ["k"])
    assert m["mean"].iloc[0] == pytest.approx(3.0)  # prompts weigh equally: (2 + 4) / 2


# ------------------------------------------------------------------ the executable


def test_cli_draws_files_in_every_format(run_files, tmp_path):
    out = tmp_path / "figs"
    r = dolm_plot(run_files["trace_toy"], run_files["trace_gpt2"], "-o", out, "--only", "layers")
    assert r.returncode == 0, r.stderr
    written = r.stdout.split()
    names = sorted(Path(p).name for p in written)
    # one figure per metric; models are compared on the metric both files have
    assert names == ["compare.effects.layers.logit_diff.png", "trace_gpt2.layers.logit_diff.png",
                     "trace_toy.layers.logit_diff.png", "trace_toy.layers.recovery.png"]
    for p in written:
        assert_drawn(Path(p).read_bytes(), style.pixels("single"), p)
    r = dolm_plot(run_files["trace_toy"], "-o", out, "--only", "layers")
    assert r.returncode == 3 and "--force" in r.stderr
    r = dolm_plot(run_files["ablate"], "-o", out, "--only", "heads", "--format", "svg")
    assert r.returncode == 0, r.stderr
    svg = Path(r.stdout.split()[0]).read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    r = dolm_plot(run_files["steer"], "-o", out, "--format", "pdf", "--only", "dose_response")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.split()[0]).read_bytes()[:5] == b"%PDF-"


@needs("dag")
def test_dag_subcommand(run_files, tmp_path):
    import os

    images = []
    for seed in ("1", "2"):  # same picture whatever the hash seed
        target = tmp_path / f"dag{seed}.png"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = dolm_plot("dag", run_files["dag"], "-o", target, env=env)
        assert r.returncode == 0, r.stderr
        images.append(target.read_bytes())
    assert_drawn(images[0], style.pixels("single"), "dag")
    assert images[0] == images[1]


def test_dag_layout_and_roles():
    from dolm_tools.plot.fig_dag import graph, layout, node_roles

    obj = dag_obj()
    pos = layout(graph(obj))
    assert pos["difficulty"][0] < pos["format"][0] < pos["attention"][0] < pos["completion"][0]
    roles = node_roles(obj)
    assert roles == {"format": "treatment", "completion": "outcome", "attention": "mediator"}


def test_report_embeds_every_figure_and_the_provenance(run_files, tmp_path):
    import base64
    import re
    import shutil

    run_dir = tmp_path / "run"
    (run_dir / "sub").mkdir(parents=True)
    keep = [k for k in ("trace_gpt2", "steer", "outcomes_toy", "prompts", "psm", "dag",
                        "acts_toy", "translators") if k in run_files]
    for k in keep:
        shutil.copy(run_files[k], run_dir / ("sub" if k == "dag" else "") / run_files[k].name)
    (run_dir / "notes.txt").write_text("not a dolm file")
    report = tmp_path / "report.html"
    r = dolm_plot("report", run_dir, "-o", report)
    assert r.returncode == 0, r.stderr
    text = report.read_text()
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"',
                      text)
    # files are drawn by folder (here: no study folders): the top level, and sub/
    top = [str(run_files[k]) for k in keep if k != "dag"]
    expected = {p.stem for p in plan(load_sources(top))}
    if "dag" in keep:
        expected |= {p.stem for p in plan(load_sources([str(run_files["dag"])]))}
    skipped = set(re.findall(r"<li><b>([^<]+)</b>", text))  # degenerate: not drawn, said why
    assert skipped <= expected
    assert {name for name, _ in imgs} == expected - skipped
    assert len(imgs) == len(expected - skipped)
    for name, data in imgs[:3]:
        png = base64.b64decode(data)
        assert png[:4] == b"\x89PNG", name
    assert "http://" not in text and "https://" not in text  # self-contained
    for k in keep:
        assert run_files[k].name in text
    for tool in ("patch", "collect-acts") if "outcomes_toy" in keep else ("patch",):
        assert f"<td>{tool} " in text
    assert "dolm-patch --model gpt2-small --seed 0" in text  # argv
    assert "gpt2" in text and "aaaaaaaaaaaa" in text  # model spec and weights hash
    assert "<th>prompt_id</th>" in text  # head of a table
    if "translators" in keep:  # the held-out KL per layer, logit vs tuned, as a table
        assert "<th>layer</th><th>logit</th><th>tuned</th>" in text
    r = dolm_plot("report", run_dir, "-o", report)
    assert r.returncode == 3 and "--force" in r.stderr


# ------------------------------------------------------------------ bad input


def plot_in_process(capsys, *args) -> tuple[int, str]:
    """Run dolm-plot's command in this process (its exit code and stderr): cheap checks."""
    from dolm_tools.plot.cli import main

    with pytest.raises(SystemExit) as exit_:
        main.main(args=[str(a) for a in args], prog_name="dolm-plot")
    return exit_.value.code, capsys.readouterr().err


def test_bad_inputs_exit_3(run_files, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "o"
    # through the real executable: a missing file, a schema plot does not draw
    r = dolm_plot(tmp_path / "nope.parquet", "-o", out)
    assert r.returncode == 3 and "nope.parquet: file not found" in r.stderr, r.stderr
    widgets = tmp_path / "w.parquet"
    table = pa.table({"w": [1]}).replace_schema_metadata(
        {"dolm.schema": json.dumps({"name": "widgets", "version": 1})})
    pq.write_table(table, widgets)
    r = dolm_plot(widgets, "-o", out)
    assert r.returncode == 3, r.stderr
    assert "'widgets'" in r.stderr and "it knows: " in r.stderr and "effects" in r.stderr
    # the rest in this process (same command, same exit codes)
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"a": [1, 2]}).to_parquet(plain)
    code, err = plot_in_process(capsys, plain, "-o", out)
    assert code == 3 and "not a dolm file" in err and "effects" in err
    empty = tmp_path / "empty.parquet"
    write_table(effects_trace().iloc[:0], empty, "effects", make_run("patch"))
    code, err = plot_in_process(capsys, empty, "-o", out)
    assert code == 3 and "empty" in err and "empty.parquet" in err
    code, err = plot_in_process(capsys, run_files["steer"], "-o", out, "--only", "trace")
    assert code == 3 and "dose_response" in err
    code, err = plot_in_process(capsys, "report", tmp_path / "no-run", "-o", tmp_path / "r.html")
    assert code == 3 and "not found" in err
    code, err = plot_in_process(capsys, "dag", run_files["trace_toy"], "-o", tmp_path / "x.png")
    assert code == 3 and "expected a 'dag' file" in err
    code, err = plot_in_process(capsys, run_files["steer"], "-o", out, "--format", "gif")
    assert code == 3 and "gif" in err
    assert not out.exists()  # nothing half-written


if __name__ == "__main__":  # write a demo run folder for looking at the figures by eye
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/plot-demo")
    print(json.dumps({k: str(v) for k, v in write_run(out).items()}, indent=1))
