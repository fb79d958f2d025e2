"""``dolm-ablate``: knock out heads, attention layers, MLPs or whole layers and measure
what changes.

Reads a prompts table, writes a tidy ``effects`` table: per prompt, baseline rows
(``intervention`` "baseline", ``kind`` none: the metrics of the unchanged model), then
one row per component set x kind (x resample draw) x metric with ``value`` (ablated),
``clean_value`` (baseline), ``component`` (the components, ``+``-joined), and ``site``,
``layer``, ``head`` when the set is one site.
"""

from __future__ import annotations

import click
from dolm.cli import model_options, output_option, prompt_selection_options, seed_option, tool
from dolm.executor import Prephase, executor_options


def _reduce_means(partials: list[str], dest: str) -> None:
    from dolm_tools.ablate.core import reduce_sums

    reduce_sums(partials, dest)


# --kind mean on Ray: phase 1 sums the reference activations per shard, the driver adds the
# sums up, and phase 2 ablates every shard's prompts with the means over all of them
MEANS = Prephase(needed=lambda p: "mean" in str(p.get("kinds") or "").replace(" ", "").split(","),
                 out_param="mean_sums_out", in_param="mean_sums", reduce=_reduce_means,
                 name="means")


@tool("ablate")
@executor_options(groups=("intervention", "metric"), prephase=MEANS)
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--components", "components", multiple=True, metavar="SETS",
              help="Component sets to ablate: ',' separates sets, '+' joins components ablated "
                   "together. Components: head.L.H, attn_out.L, mlp_out.L, layer.L (attn_out "
                   "and mlp_out of block L); '*' for an index (head.2.* = layer 2's heads "
                   "together). Repeatable.")
@click.option("--scan", type=click.Choice(["heads", "attn", "mlp", "layers"]), default=None,
              help="Ablate each head / attention layer / MLP / layer alone (a head-importance "
                   "map for heads), batched.")
@click.option("--from", "from_file", type=click.Path(dir_okay=False), default=None,
              help="An effects file to pick components from (e.g. a --scan heads run, or "
                   "dolm-patch head rows), with --top/--bottom.")
@click.option("--top", type=int, default=None,
              help="--from: ablate together the K components with the largest mean score.")
@click.option("--bottom", type=int, default=None,
              help="--from: ablate together the K components with the smallest mean score.")
@click.option("--by", "by_metric", default=None,
              help="--from: the metric to rank by (needed when the file has several).")
@click.option("--rank-by", type=click.Choice(["effect", "value"]), default="effect",
              show_default=True,
              help="--from: score = mean of value - clean_value (the change the file's "
                   "intervention made) or of value.")
@click.option("--from-kind", default=None,
              help="--from: use the file's rows of this kind only (needed when it mixes kinds).")
@click.option("--allow-model-mismatch", is_flag=True,
              help="Use a --from file made with another model (weights differ).")
@click.option("--kind", "kinds", default="zero", show_default=True,
              help="Comma list of ablation kinds: zero, mean (over --reference at each "
                   "position), resample (from another --reference prompt, seeded).")
@click.option("--reference", type=click.Path(dir_okay=False), default=None,
              help="Prompts table whose activations mean/resample use (default: PROMPTS).")
@click.option("--align", type=click.Choice(["start", "end"]), default="start",
              show_default=True,
              help="mean/resample: match token positions with the reference from the start, or "
                   "from the end (last token to last token) for prompts of different lengths.")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="--kind resample: draws per prompt (rows carry 'sample').")
@click.option("--positions", default="all", show_default=True,
              help="Token positions ablated: all, last, or comma-separated indices "
                   "(negative = from the end).")
@click.option("--mean-sums-out", type=click.Path(dir_okay=False), default=None, hidden=True,
              help="(--shard, Ray phase 1) Write the shard's block of the reference's "
                   "activation sums and counts here, and nothing else.")
@click.option("--mean-sums", type=click.Path(dir_okay=False, exists=True), default=None,
              hidden=True,
              help="(Ray phase 2) --kind mean uses the means of these reduced sums.")
@prompt_selection_options("\"distractors == 0 and symbols == 'XY'\"")
@model_options
@output_option
@seed_option
def main(run, prompts, components, scan, from_file, top, bottom, by_metric, rank_by, from_kind,
         allow_model_mismatch, kinds, reference, align, samples, positions, mean_sums_out,
         mean_sums, where, limit, model_opts, output, force, seed):
    """Ablate model components on PROMPTS (a prompts table); write effects.

    \b
    Metrics per prompt: logit_diff (target - foil), prob_target; choice tasks:
    choice_prob_target, accuracy; bayes family: p_x (P(first symbol) over the two
    choices), mae_bayes (|p_x - posterior_x|: its mean over the evidence sweep is the
    MAE to Bayes), order_drift (|p_x - its permutation group's mean|).
    """
    from dolm.cli import check_model_match, load_model, log, progress
    from dolm.errors import InputError
    from dolm.executor import shard_rows
    from dolm.formats import read_table, write_table
    from dolm.metrics import select_prompts
    from dolm.positions import parse_positions
    from dolm_tools.ablate import components as C
    from dolm_tools.ablate.components import KINDS

    kind_list = [k.strip() for k in kinds.split(",") if k.strip()]
    bad = [k for k in kind_list if k not in KINDS]
    if bad or not kind_list:
        raise InputError(f"--kind: expected a comma list of {', '.join(KINDS)}, found "
                         f"{kinds!r}")
    kind_list = list(dict.fromkeys(kind_list))
    if (top is not None or bottom is not None) and from_file is None:
        raise InputError("--top/--bottom: need --from FILE (an effects table to rank)")
    if from_file is not None and top is None and bottom is None:
        raise InputError(f"--from {from_file}: give --top K and/or --bottom K")
    if not components and scan is None and from_file is None:
        raise InputError("nothing to ablate: give --components, --scan or --from")
    if reference is not None and not set(kind_list) & {"mean", "resample"}:
        raise InputError("--reference: only used by --kind mean or resample")
    pos_spec = parse_positions(positions)
    ref_df = None
    df, _ = read_table(prompts, schema="prompts", run=run)
    df = select_prompts(df, where, limit, prompts)
    whole, df = df, shard_rows(df, run)
    if df is not whole:  # a shard: mean/resample read the whole selection, not the block
        if "resample" in kind_list:
            raise InputError("--kind resample: cannot run in shards yet (the donor draws "
                             "follow the whole prompt order); run it in one process")
        if reference is None and "mean" in kind_list and mean_sums is None:
            ref_df = whole  # a shard made by hand: the means over the whole selection
    if mean_sums_out is not None and (df is whole or "mean" not in kind_list):
        raise InputError("--mean-sums-out: only for a --shard K/N run with --kind mean")
    eff = emeta = ranked = None
    if from_file is not None:
        eff, emeta = read_table(from_file, schema="effects", run=run)
        metric, ranked = C.rank_components(eff, from_file, by_metric, from_kind, rank_by)
        C.check_counts(ranked, metric, from_file, top, bottom)
    if reference is not None:
        ref_df, _ = read_table(reference, schema="prompts", run=run)
        if len(ref_df) == 0:
            raise InputError(f"--reference {reference}: no prompts")
    from dolm.metrics import prompt_targets
    from dolm_tools.ablate.core import Ablator, Condition, effects_rows, load_sums

    lm = load_model(model_opts, run=run)
    targets = prompt_targets(df, lm, prompts)
    sets = C.parse_sets(lm, components)
    if scan is not None:
        sets += C.scan_sets(lm, scan)
    picked = None
    if eff is not None:
        check_model_match(emeta, lm, allow_model_mismatch)
        chosen = C.pick_sets(lm, ranked, metric, from_file, top, bottom, rank_by)
        sets += chosen
        picked = {"file": from_file, "metric": metric, "rank_by": rank_by,
                  "ranking": [{"site": s, "score": v, "rows": k} for s, v, k in ranked],
                  "sets": {c.name: list(c.components) for c in chosen}}
        for c in chosen:
            log(f"dolm-ablate: {c.name}: {c.label}")
    conds = []
    for cset in sets:
        for kind in kind_list:
            draws = range(samples) if kind == "resample" else [None]
            conds += [Condition(cset, kind, s) for s in draws]
    if mean_sums_out is not None:  # phase 1: this shard's block of the reference, summed
        from dolm.executor import shard_range
        from dolm_tools.ablate.core import reference_sums, save_sums

        ref = ref_df if reference is not None else whole
        lo, hi = shard_range(*run.shard, len(ref))
        sites = list(dict.fromkeys(s for c in conds for s in c.cset.sites))
        sums = (reference_sums(lm, [str(x) for x in ref["prompt"].iloc[lo:hi]],
                               [str(x) for x in ref["prompt_id"].iloc[lo:hi]], sites, align,
                               model_opts.batch_size) if hi > lo else {})
        save_sums(sums, mean_sums_out)
        return
    ref_texts = ref_names = None
    if ref_df is not None:
        ref_texts = [str(x) for x in ref_df["prompt"]]
        ref_names = [str(x) for x in ref_df["prompt_id"]]

    def bar(total):
        return progress(total=total, desc="ablating", unit="run")

    ab = Ablator(lm, targets, [str(x) for x in df["prompt"]], conds, positions=pos_spec,
                 ref_texts=ref_texts, ref_names=ref_names, seed=seed,
                 batch_size=model_opts.batch_size, progress=bar, align=align,
                 mean_sums=load_sums(mean_sums) if mean_sums is not None else None)
    clean, per = ab.run()
    out = effects_rows(lm, targets, conds, clean, per, positions)
    extra = {"kinds": kind_list, "positions": positions, "scan": scan,
             "sets": {c.name: list(c.components) for c in sets},
             "reference": reference or prompts, "align": align, "samples": samples, "where": where,
             "n_prompts": len(targets)}
    if picked is not None:
        extra["from"] = picked
    write_table(out, output, schema="effects", run=run, force=force, extra=extra)
    _report(out, log)


def _report(df, log) -> None:
    """A few lines on stderr: mean of the headline metric per intervention."""
    metric = next((m for m in ("mae_bayes", "logit_diff", "prob_target")
                   if m in set(df["metric"])), None)
    if metric is None:
        return
    d = df[df["metric"] == metric]
    agg = d.groupby("intervention", sort=False)["value"].mean()
    base = agg.get("baseline")
    lines = [f"dolm-ablate: mean {metric}: baseline {base:.4f}" if base is not None else ""]
    rest = agg.drop("baseline", errors="ignore")
    if base is not None and len(rest):
        rest = rest.reindex((rest - base).abs().sort_values(ascending=False).index)
    for name, v in list(rest.items())[:8]:
        lines.append(f"  {name}: {v:.4f}")
    if len(rest) > 8:
        lines.append(f"  ... {len(rest) - 8} more (largest change first)")
    log("\n".join(x for x in lines if x))
