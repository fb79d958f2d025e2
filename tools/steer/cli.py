"""``dolm-steer``: find directions at model sites, and steer along them.

\b
dolm-steer fit PROMPTS -o dirs.safetensors --method diffmeans|probe|pca|file ...
dolm-steer apply PROMPTS --directions dirs.safetensors --alphas -4,-2,0,2,4 -o effects.parquet

``fit`` writes a ``directions`` safetensors file (one unit vector ``direction.<site>`` per
site; metadata: method, label, sites, best site, norms, projection statistics, held-out
probe scores, training-data hash, model hash) and, with ``--scores``, a ``probes`` table
(held-out score per site: the localisation step). ``apply`` writes ``effects``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click
from dolm.cli import (
    model_options,
    output_option,
    prompt_selection_options,
    seed_option,
    subcommand,
    tool_group,
)
from dolm.executor import executor_options

TOOL = "steer"


@tool_group(TOOL)
def main() -> None:
    """Directions at model sites (fit) and steering along them (apply).

    \b
    dolm-steer fit PROMPTS -o dirs.safetensors --method diffmeans|probe|pca|file ...
    dolm-steer apply PROMPTS --directions dirs.safetensors --alphas A,B,... -o effects.parquet
    """


# ------------------------------------------------------------------ fit


@subcommand(main, "fit", TOOL, outputs=("output", "scores"))
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--method", type=click.Choice(["diffmeans", "probe", "pca", "file"]),
              default="diffmeans", show_default=True,
              help="diffmeans: mean of the positive set - mean of the negative set; probe: a "
                   "linear probe per site, held-out scores; pca: first principal axis of the "
                   "paired differences prompt - cf_prompt; file: a vector from --vector.")
@click.option("--sites", default="resid_post.*", show_default=True,
              help="Sites (names or patterns, comma-separated): one direction per site.")
@click.option("--label", default=None,
              help="diffmeans/probe: the prompts column to separate (binary, or continuous "
                   "with --threshold; --probe ridge regresses on it).")
@click.option("--threshold", type=float, default=None,
              help="Binarise --label: positive = value > T (e.g. posterior_b 0.5 for the "
                   "generator identity).")
@click.option("--negatives", type=click.Path(dir_okay=False), default=None,
              help="diffmeans: a prompts table of the negative set (PROMPTS is the positive "
                   "set); instead of --label.")
@click.option("--probe", "probe_kind", type=click.Choice(["logistic", "ridge"]), default=None,
              help="probe: logistic (binary label; held-out accuracy, AUC) or ridge "
                   "(continuous label; held-out R^2, Pearson r). Default: logistic for a binary "
                   "or --threshold label, ridge otherwise.")
@click.option("--test-fraction", type=click.FloatRange(0.05, 0.9), default=0.25,
              show_default=True,
              help="probe/diffmeans: held-out share for the scores (split by group_id when "
                   "present); the saved direction uses every prompt.")
@click.option("--C", "c_reg", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True, help="probe: inverse regularisation strength (ridge: 1/alpha).")
@click.option("--position", type=click.Choice(["last", "mean"]), default="last",
              show_default=True,
              help="One vector per prompt: the last token, or the mean over the prompt's tokens.")
@click.option("--acts", type=click.Path(dir_okay=False), default=None,
              help="Read activations from this dolm-collect-acts file instead of running the "
                   "model (diffmeans/probe).")
@click.option("--acts-label", default=None,
              help="--acts: the position_label of the rows to use (needed when it has several).")
@click.option("--allow-other-prompts", is_flag=True,
              help="--acts: use activations collected from another prompts table (its "
                   "recorded prompts sha256 differs from PROMPTS').")
@click.option("--allow-model-mismatch", is_flag=True,
              help="--acts: use activations of another model than an explicit --model.")
@click.option("--vector", type=click.Path(dir_okay=False), default=None,
              help="file: a vector (.npy, .pt, .safetensors, or whitespace-separated text) for "
                   "the one site of --sites.")
@click.option("--scores", type=click.Path(dir_okay=False), default=None,
              help="Also write the held-out probe scores per site (a probes table).")
@prompt_selection_options()
@model_options
@output_option(help="Directions file to write (safetensors).")
@seed_option
def fit(run, prompts, method, sites, label, threshold, negatives, probe_kind, test_fraction,
        c_reg, position, acts, acts_label, allow_other_prompts, allow_model_mismatch, vector,
        scores, where, limit, model_opts, output, force, seed):
    """Fit directions at sites from PROMPTS (a prompts table)."""
    import numpy as np
    from dolm.cli import log
    from dolm.formats import read_table, save_safetensors, write_table
    from dolm.metrics import select_prompts

    _check_fit_options(method, label, negatives, acts, vector, output, scores)
    df, _ = read_table(prompts, schema="prompts", run=run)
    df = select_prompts(df, where, limit, prompts)
    neg_df = None
    if negatives is not None:
        neg_df, _ = read_table(negatives, schema="prompts", run=run)
        if len(neg_df) == 0:
            from dolm.errors import InputError

            raise InputError(f"--negatives {negatives}: no prompts")
    y = None if label is None else _label_values(df, label, threshold, prompts)
    probe_kind = _probe_kind(method, probe_kind, y, label)
    job = FitJob(method=method, prompts=prompts, df=df, neg_df=neg_df, label=label, y=y,
                 threshold=threshold, negatives=negatives, probe_kind=probe_kind,
                 test_fraction=test_fraction, c_reg=c_reg, seed=seed, position=position,
                 vector=vector, batch_size=model_opts.batch_size)
    if acts is not None:
        _read_acts(job, run, acts, sites, acts_label, model_opts,
                   allow_other_prompts or negatives is not None, allow_model_mismatch)
    else:
        _model_acts(job, run, sites, model_opts)
    extra = {"method": method, "sites": job.site_list, "label": label,
             "threshold": threshold, "position": position, "normalisation": "unit",
             "model_spec": job.model_info.get("spec"),
             "weights_sha256": job.model_info.get("weights_sha256")}
    fitted, method_extra = METHODS[method](job)
    extra.update(method_extra)
    site_list = job.site_list
    best = fitted.best_site or (site_list[0] if len(site_list) == 1 else None)
    extra.update(best_site=best, norms=fitted.norms, proj_mean=fitted.proj_mean,
                 proj_std=fitted.proj_std,
                 scores={s: {r["metric"]: r["value"] for r in fitted.scores if r["site"] == s}
                         for s in site_list if any(r["site"] == s for r in fitted.scores)},
                 n_prompts=len(job.pids))
    import torch

    tensors = {f"direction.{s}": torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
               for s, v in fitted.directions.items()}
    if scores is not None:
        write_table(_scores_frame(fitted, job, best), scores, schema="probes", run=run,
                    force=force, extra=extra)
    save_safetensors(tensors, output, schema="directions", run=run, force=force, extra=extra)
    if fitted.scores:
        key = fitted.scores[0]["metric"]
        line = ", ".join(f"{r['site']} {r['value']:.3f}" for r in fitted.scores
                         if r["metric"] == key)
        log(f"dolm-steer fit: held-out {key}: {line}")
    if best is not None:
        log(f"dolm-steer fit: best site {best}")


@dataclass
class FitJob:
    """One ``fit`` run's inputs: the prompts (and negatives), the label values ``y``, the
    method's settings, and (once read) the activations ``data`` (site -> (N, width), the
    prompts' rows first, then the negatives'), the sites, the model (None with --acts)."""

    method: str
    prompts: str
    df: Any
    neg_df: Any
    label: str | None
    y: Any
    threshold: float | None
    negatives: str | None
    probe_kind: str | None
    test_fraction: float
    c_reg: float
    seed: int
    position: str
    vector: str | None
    batch_size: Any
    data: dict = field(default_factory=dict)
    site_list: list = field(default_factory=list)
    lm: Any = None
    model_info: dict = field(default_factory=dict)

    @property
    def pids(self) -> list[str]:
        return [str(x) for x in self.df["prompt_id"]]

    def all_ids(self) -> list[str]:
        """Prompt ids of the rows of ``data``: the prompts, then the negatives."""
        neg = [] if self.neg_df is None else [str(x) for x in self.neg_df["prompt_id"]]
        return self.pids + neg


def _check_fit_options(method, label, negatives, acts, vector, output, scores) -> None:
    """Option combinations ``fit`` refuses before reading anything."""
    from dolm.errors import InputError

    if output == "-":
        raise InputError("--output: a safetensors file cannot go to stdout; give a path")
    if scores is not None and scores == output:
        raise InputError("--scores: must differ from --output")
    if method == "pca" and acts is not None:
        raise InputError("--acts: --method pca runs the model on each cf_prompt; it cannot "
                         "read stored activations")
    if method == "file" and acts is not None:
        raise InputError("--acts: --method file reads its vector from --vector, not from "
                         "activations")
    if method == "file" and vector is None:
        raise InputError("--method file: give --vector FILE")
    if method in ("diffmeans", "probe") and label is None and negatives is None:
        raise InputError(f"--method {method}: give --label COLUMN"
                         + (" or --negatives FILE" if method == "diffmeans" else ""))
    if method == "probe" and negatives is not None:
        raise InputError("--negatives: only for --method diffmeans (a probe needs --label)")
    if label is not None and negatives is not None:
        raise InputError("--label and --negatives: give one of them")


def _probe_kind(method: str, probe_kind, y, label):
    """--probe, defaulted from the label (logistic for a binary one) and checked."""
    import numpy as np
    from dolm.errors import InputError

    if probe_kind is None and method == "probe":
        probe_kind = "logistic" if set(np.unique(y)) <= {0.0, 1.0} else "ridge"
    if probe_kind == "logistic" and y is not None and not set(np.unique(y)) <= {0.0, 1.0}:
        raise InputError(f"--probe logistic: --label {label} is not binary; binarise it with "
                         "--threshold T, or use --probe ridge")
    return probe_kind


def _read_acts(job: FitJob, run, acts: str, sites: str, acts_label, model_opts,
               allow_other_prompts: bool, allow_model_mismatch: bool) -> None:
    """``job.data``/``site_list``/``model_info`` from a dolm-collect-acts file."""
    from dolm.activations import vectors_by_prompt
    from dolm.cli import check_model_match, check_same_prompts, input_sha256, load_model
    from dolm.formats import read_h5

    fh, ameta = read_h5(acts, schema="activations", run=run)
    try:
        check_same_prompts(ameta, job.prompts, input_sha256(run, job.prompts),
                           allow_other_prompts)
        if click.get_current_context().get_parameter_source("model").name in (
                "COMMANDLINE", "ENVIRONMENT"):
            check_model_match(ameta, load_model(model_opts), allow_model_mismatch)
        want = None if sites in ("*", "all") else _acts_sites(fh, sites, acts)
        job.data, job.site_list = vectors_by_prompt(fh, acts, job.all_ids(), want, acts_label)
    finally:
        fh.close()
    job.model_info = ameta.model_entry() or {}
    if job.model_info:
        run.set_model(job.model_info)


def _model_acts(job: FitJob, run, sites: str, model_opts) -> None:
    """``job.data``/``site_list``/``model_info``/``lm`` by running the model."""
    from dolm.cli import load_model
    from dolm.errors import InputError
    from dolm_tools.steer import fit as F

    lm = job.lm = load_model(model_opts, run=run)
    job.model_info = lm.info
    job.site_list = lm.expand_sites(sites)
    for s in job.site_list:
        if lm.parse_site(s).kind in ("attn", "logits"):
            raise InputError(f"--sites: {s}: directions live at residual, attention/MLP "
                             "output, head or final_norm sites")
    if job.method == "file":
        return
    texts = [str(x) for x in job.df["prompt"]]
    if job.neg_df is not None:
        texts += [str(x) for x in job.neg_df["prompt"]]
    job.data = F.model_acts(lm, texts, job.all_ids(), job.site_list, job.position,
                            job.batch_size)


def _fit_diffmeans(job: FitJob):
    import numpy as np
    from dolm.errors import InputError
    from dolm_tools.steer import fit as F

    pids, y, extra = job.pids, job.y, {}
    if job.neg_df is not None:
        pos = np.r_[np.ones(len(pids), bool), np.zeros(len(job.neg_df), bool)]
        fitted = F.diff_means(job.data, pos, None, job.test_fraction, job.seed)
        extra["training_data_sha256"] = F.data_hash(job.all_ids(), pos.astype(float))
        extra["negatives"] = job.negatives
    else:
        if not set(np.unique(y)) <= {0.0, 1.0}:
            raise InputError(f"--label {job.label}: diffmeans needs a binary label; binarise "
                             "it with --threshold T")
        fitted = F.diff_means(job.data, y.astype(bool), _groups(job.df), job.test_fraction,
                              job.seed)
        extra["training_data_sha256"] = F.data_hash(pids, y)
    extra["n_positive"] = int(len(pids) if y is None else y.sum())
    return fitted, extra


def _fit_probe(job: FitJob):
    from dolm_tools.steer import fit as F

    fitted = F.probes(job.data, job.y, job.probe_kind, _groups(job.df), job.test_fraction,
                      job.seed, job.c_reg)
    return fitted, dict(probe=job.probe_kind, test_fraction=job.test_fraction, C=job.c_reg,
                        training_data_sha256=F.data_hash(job.pids, job.y))


def _fit_pca(job: FitJob):
    from dolm.errors import InputError
    from dolm_tools.steer import fit as F

    df, pids = job.df, job.pids
    if "cf_prompt" not in df.columns or df["cf_prompt"].isna().any():
        raise InputError(f"--method pca: {job.prompts} needs a cf_prompt for every prompt "
                         "(the pair's other member)")
    cf = [str(x) for x in df["cf_prompt"]]
    cf_data = F.model_acts(job.lm, cf, [p + ":cf" for p in pids], job.site_list,
                           job.position, job.batch_size)
    fitted = F.pca_pairs(job.data, cf_data)
    return fitted, {"training_data_sha256": F.data_hash(pids, [None] * len(pids))}


def _fit_file(job: FitJob):
    from dolm.errors import InputError
    from dolm.formats import sha256_file
    from dolm_tools.steer import fit as F

    if len(job.site_list) != 1:
        raise InputError(f"--method file: --sites must name one site, found "
                         f"{', '.join(job.site_list)}")
    site = job.site_list[0]
    width = job.lm.d_head if job.lm.parse_site(site).kind == "head" else job.lm.d_model
    fitted = F.from_vector(F.read_vector(job.vector), site, width, job.vector)
    return fitted, {"training_data_sha256": sha256_file(job.vector), "vector": job.vector}


#: --method -> fn(job) -> (fitted directions and held-out scores, metadata for the file)
METHODS = {"diffmeans": _fit_diffmeans, "probe": _fit_probe, "pca": _fit_pca,
           "file": _fit_file}


def _scores_frame(fitted, job: FitJob, best):
    """The held-out scores per site as a ``probes`` table."""
    import pandas as pd
    from dolm.errors import InputError

    if not fitted.scores:
        raise InputError(f"--scores: --method {job.method} gives no scores here (probe, pca, "
                         "and diffmeans with a --label and at least 8 prompts do)")
    sdf = pd.DataFrame(fitted.scores)
    sdf["layer"] = [_layer_of(s) for s in sdf["site"]]
    sdf["method"] = job.method if job.method != "probe" else f"probe_{job.probe_kind}"
    sdf["label"] = job.label
    sdf["best"] = sdf["site"] == best
    sdf = sdf[["site", "layer", "method", "label", "metric", "value", "n_train", "n_test",
               "best"]]
    sdf["layer"] = sdf["layer"].astype("Int64")
    return sdf


def _groups(df):
    """group_id per prompt for a grouped held-out split (None when absent)."""
    if "group_id" in df.columns and df["group_id"].notna().all():
        return df["group_id"].tolist()
    return None


def _layer_of(site: str):
    parts = site.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def _acts_sites(fh, sites: str, path: str) -> list[str]:
    """Expand --sites patterns against the datasets an activations file has."""
    from dolm.activations import match_sites

    return sorted(match_sites(fh, sites, path), key=_site_key)


def _site_key(s: str):
    parts = s.split(".")
    return (parts[0], *[int(p) for p in parts[1:] if p.isdigit()])


def _label_values(df, label: str, threshold, path: str):
    import numpy as np
    import pandas as pd
    from dolm.errors import InputError

    if label not in df.columns:
        raise InputError(f"--label {label}: {path} has no such column (it has "
                         f"{', '.join(map(str, df.columns))})")
    col = df[label]
    if col.isna().any():
        bad = df.loc[col.isna(), "prompt_id"].astype(str).tolist()[:3]
        raise InputError(f"--label {label}: empty for prompt(s) {', '.join(bad)}")
    if col.dtype == bool or str(col.dtype) == "boolean":
        vals = col.astype(float).to_numpy()
    else:
        try:
            vals = pd.to_numeric(col).astype(float).to_numpy()
        except (TypeError, ValueError):
            raise InputError(f"--label {label}: expected numbers or booleans, found "
                             f"{col.iloc[0]!r}") from None
    if threshold is not None:
        vals = (vals > threshold).astype(float)
    return np.asarray(vals, dtype=np.float64)


# ------------------------------------------------------------------ apply


def _apply_slopes(table, extra: dict) -> dict:
    """--executor ray: the dose-response slopes of the merged table (a shard's are its own
    prompts')."""
    from dolm_tools.steer.apply import slopes

    if extra.get("mode") == "add":
        df = table.to_pandas()
        extra["slopes"] = {one: slopes(df[df["site"] == one]) for one in extra["sites"]}
    return extra


@subcommand(main, "apply", TOOL)
@executor_options(groups=("intervention", "metric"), finish=_apply_slopes)
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--directions", "directions", required=True, type=click.Path(dir_okay=False),
              help="A directions file (dolm-steer fit).")
@click.option("--site", default=None,
              help="The site(s) to steer at: one of the file's, a comma list, or all (one "
                   "dose-response per site); default: the file's best site.")
@click.option("--alphas", default="-4,-2,0,2,4", show_default=True,
              help="Comma-separated strengths: one dose-response point each, batched.")
@click.option("--mode", type=click.Choice(["add", "project"]), default="add", show_default=True,
              help="add alpha x unit direction, or project the direction out (alphas unused).")
@click.option("--scale", type=click.Choice(["unit", "std"]), default="unit", show_default=True,
              help="Units of alpha: the unit direction, or the standard deviation of the "
                   "training activations along it (proj_std in the file).")
@click.option("--positions", default="last", show_default=True,
              help="Prompt positions steered: last, all, integers (negative = from the end), "
                   "span:NAME, NAME_first or NAME_last (spans from the prompts' spans column; "
                   "generated tokens are always steered).")
@click.option("--generate", "n_generate", type=click.IntRange(min=0), default=0,
              show_default=True,
              help="Also generate N tokens greedily under steering (column 'generation').")
@click.option("--allow-model-mismatch", is_flag=True,
              help="Use a directions file made with another model (weights differ).")
@prompt_selection_options("'posterior_b > 0.3 and posterior_b < 0.7' (ambiguous evidence)")
@model_options
@output_option
@seed_option
def apply(run, prompts, directions, site, alphas, mode, scale, positions, n_generate,
          allow_model_mismatch, where, limit, model_opts, output, force, seed):
    """Steer the model on PROMPTS along a direction; write effects (one row per prompt x
    alpha x metric; clean_value is the unsteered metric).

    \b
    Metrics: logit_diff, prob_target; choice tasks: choice_prob_target, accuracy;
    bayes family: p_x, mae_bayes, order_drift (see dolm-ablate --help).
    """
    import numpy as np
    from dolm.cli import check_model_match, load_model, log, parse_float_list, progress
    from dolm.errors import InputError
    from dolm.executor import shard_rows
    from dolm.formats import load_safetensors, read_table, write_table
    from dolm.metrics import prompt_targets, select_prompts
    from dolm.positions import needs_spans, parse_spans, parse_spec

    positions = parse_spec(positions).text
    alpha_list = parse_float_list(alphas, "--alphas")
    if not all(np.isfinite(alpha_list)):
        raise InputError(f"--alphas: expected finite numbers, found {alphas!r}")
    tensors, dmeta = load_safetensors(directions, schema="directions", run=run)
    dx = dmeta.extra or {}
    have = sorted(k[len("direction."):] for k in tensors)
    if site is None:
        one = dx.get("best_site") or (have[0] if len(have) == 1 else None)
        if one is None:
            raise InputError(f"--site: {directions} has directions for {', '.join(have)} and "
                             "no best site; name one (or a comma list, or all)")
        sites = [one]
    elif site.strip() == "all":
        sites = have
    else:
        sites = list(dict.fromkeys(x.strip() for x in site.split(",") if x.strip()))
    for one in sites:
        if one not in have:
            raise InputError(f"--site {one}: {directions} has no direction for this site (it "
                             f"has {', '.join(have)})")
        if scale == "std" and not (dx.get("proj_std") or {}).get(one):
            raise InputError(f"--scale std: {directions} records no proj_std for {one}")
    df, _ = read_table(prompts, schema="prompts", run=run)
    df = shard_rows(select_prompts(df, where, limit, prompts), run)
    import pandas as pd
    from dolm_tools.steer.apply import effects_rows, generate, run_steering, slopes

    lm = load_model(model_opts, run=run)
    check_model_match(dmeta, lm, allow_model_mismatch)
    vecs = {}
    for one in sites:
        try:
            s = lm.parse_site(one)
        except InputError as exc:
            raise InputError(f"--site {one}: {exc}") from None
        if s.kind in ("attn", "logits"):
            raise InputError(f"--site {one}: cannot steer at an attention pattern or logits")
        width = lm.d_head if s.kind == "head" else lm.d_model
        vec = tensors[f"direction.{one}"].float().numpy()
        if vec.shape != (width,):
            raise InputError(f"{directions}: direction.{one} has shape {list(vec.shape)}, but "
                             f"{one} of this model has width {width}")
        vecs[one] = vec / np.linalg.norm(vec)
    targets = prompt_targets(df, lm, prompts)
    texts = [str(x) for x in df["prompt"]]
    spans = None
    if needs_spans([positions]):
        if "spans" not in df.columns:
            raise InputError(f"--positions {positions}: {prompts} has no spans column")
        spans = [parse_spans(v, str(pid), prompts)
                 for v, pid in zip(df["spans"], df["prompt_id"], strict=True)]
    label = f"{dx.get('method', 'direction')}"
    if dx.get("label"):
        label += f"({dx['label']}" + (f">{dx['threshold']:g}" if dx.get("threshold")
                                      is not None else "") + ")"
    if scale == "std":
        label += " [sd units]"

    def bar(total):
        return progress(total=total, desc="steering", unit="run")

    frames, sl, stds = [], {}, {}
    for one, vec in vecs.items():
        std = float(dx["proj_std"][one]) if scale == "std" else 1.0
        stds[one] = std
        raw = [a * std for a in alpha_list]
        clean, per, used = run_steering(lm, targets, texts, one, vec, raw, mode, positions,
                                        model_opts.batch_size, progress=bar, spans=spans)
        gens = None
        if n_generate:
            gens = generate(lm, texts, [t.prompt_id for t in targets], one, vec, used, mode,
                            positions, n_generate, model_opts.batch_size, spans=spans)
        shown = alpha_list if mode == "add" else used
        out = effects_rows(lm, targets, one, shown, clean, per, mode, positions, label, gens)
        frames.append(out)
        if mode == "add":
            sl[one] = slopes(out)
    out = pd.concat(frames, ignore_index=True)
    extra = {"directions": directions, "sites": sites, "mode": mode, "positions": positions,
             "scale": scale, "alphas": alpha_list if mode == "add" else None, "slopes": sl,
             "direction_label": label, "generate": n_generate, "where": where,
             "n_prompts": len(targets)}
    if scale == "std":
        extra["proj_std"] = stds
    write_table(out, output, schema="effects", run=run, force=force, extra=extra)
    for one, per_metric in sl.items():
        for m in ("p_x", "logit_diff", "prob_target"):
            if m in per_metric:
                log(f"dolm-steer apply: {one}: slope d mean({m}) / d alpha = "
                    f"{per_metric[m]:.4g} ({len(targets)} prompts)")
                break
