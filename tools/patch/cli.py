"""``dolm-patch``: activation patching and causal tracing.

Reads a prompts table, writes a tidy ``effects`` table (one row per prompt x patched
cell x metric) and, with ``--summary``, a per-prompt ``patch_summary`` table.
"""

from __future__ import annotations

import click
from dolm.cli import model_options, output_option, seed_option, tool
from dolm.executor import executor_options


@tool("patch", outputs=("output", "summary"))
@executor_options(outputs=("output", "summary"))
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--mode", type=click.Choice(["counterfactual", "noise", "path"]),
              default="counterfactual", show_default=True,
              help="counterfactual: clean prompt vs its cf_prompt; noise: Gaussian noise on the "
                   "--span embeddings (ROME causal tracing); path: path patching from "
                   "--senders to --receivers, every other path frozen (IOI).")
@click.option("--senders", default=None,
              help="--mode path: sender nodes (embed, head.L.H, mlp.L; comma list, * globs).")
@click.option("--receivers", default=None,
              help="--mode path: receiver nodes (head.L.H, mlp.L, logits; comma list, globs).")
@click.option("--channels", default="q,k,v", show_default=True,
              help="--mode path: the inputs of receiving heads the path enters (q, k, v).")
@click.option("--sites", default="resid_pre", show_default=True,
              help="Comma list of site kinds (resid_pre, resid_mid, resid_post, attn_out, "
                   "mlp_out, head: every layer/head) or sites/patterns (resid_pre.3, head.2.*).")
@click.option("--positions", default="all", show_default=True,
              help="all, last, span:NAME, or comma-separated token indices (negative = from "
                   "the end).")
@click.option("--head-positions", type=click.Choice(["all", "each"]), default="all",
              show_default=True,
              help="Patch a head at all positions at once, or one cell per position.")
@click.option("--joint-positions", is_flag=True,
              help="One cell per site patching all the selected positions together (default: "
                   "one cell per position; heads follow --head-positions).")
@click.option("--window", type=click.IntRange(min=1), default=1, show_default=True,
              help="Restore W consecutive layers of attn_out/mlp_out around each layer (ROME).")
@click.option("--direction", type=click.Choice(["denoise", "noise"]), default="denoise",
              show_default=True,
              help="denoise: clean states into the corrupted run; noise: corrupted states "
                   "into the clean run.")
@click.option("--align", type=click.Choice(["none", "last"]), default="none", show_default=True,
              help="last: allow pairs of unequal token length, aligning them at the end "
                   "(positions reported from the end).")
@click.option("--span", default="subject", show_default=True,
              help="--mode noise: the span (from the spans column) whose embeddings are noised.")
@click.option("--samples", type=click.IntRange(min=1), default=10, show_default=True,
              help="--mode noise: noised copies per prompt (results are their mean).")
@click.option("--noise-scale", type=float, default=3.0, show_default=True,
              help="--mode noise: noise std as a multiple of the token-embedding std.")
@click.option("--metric", type=click.Choice(["auto", "logit_diff", "prob_target"]),
              default="auto", show_default=True,
              help="Primary metric for recovery and the summary (auto: logit_diff when every "
                   "prompt has a foil, else prob_target).")
@click.option("--method", type=click.Choice(["exact", "attribution"]), default="exact",
              show_default=True,
              help="exact patching, or attribution patching (first-order estimate from two "
                   "forwards and one backward).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use only the first N prompts.")
@click.option("--summary", type=click.Path(dir_okay=False), default=None,
              help="Also write the per-prompt summary table here (Parquet).")
@model_options
@output_option
@seed_option
def main(run, prompts, mode, senders, receivers, channels, sites, positions, head_positions,
         joint_positions, window,
         direction, align, span, samples, noise_scale, metric, method, limit, summary,
         model_opts, output, force, seed):
    """Activation patching / causal tracing of PROMPTS (a prompts table).

    \b
    Cells: every site of --sites x every position of --positions (heads: x head).
    Metrics per cell: logit_diff (target - foil; foil falls back to cf_target),
    prob_target, and recovery = (patched - corrupt) / (clean - corrupt) on the
    primary --metric.
    """
    import pandas as pd
    from dolm.cli import load_model, log, progress
    from dolm.errors import InputError
    from dolm.executor import shard_offset, shard_rows
    from dolm.formats import frame, read_table, write_table
    from dolm_tools.patch.prepare import choose_metric, read_prompts
    from dolm_tools.patch.run import Options, Patcher

    if summary is not None and output not in (None, "-") and summary == output:
        raise InputError("--summary: must differ from --output")
    if noise_scale <= 0:
        raise InputError(f"--noise-scale: expected a positive number, found {noise_scale}")
    df, _meta = read_table(prompts, schema="prompts", run=run)
    if limit is not None:
        df = df.iloc[:limit]
    whole, df = df, shard_rows(df, run)
    lm = load_model(model_opts, run=run)
    if mode == "path":
        from dolm_tools.patch.path import run_path

        return run_path(run, df=df, prompts=prompts, lm=lm, senders=senders,
                        receivers=receivers, channels=channels, direction=direction,
                        metric=metric, output=output, force=force, seed=seed,
                        batch_size=model_opts.batch_size)
    notes: list[str] = []
    plist = read_prompts(df, lm, mode=mode, metric=metric, path=prompts, notes=notes)
    for note in notes[:5]:
        log(f"dolm-patch: note: {note}")
    if len(notes) > 5:
        log(f"dolm-patch: note: ... and {len(notes) - 5} more")
    if df is not whole and metric == "auto":  # a shard: --metric auto looks at every prompt
        plist_all = read_prompts(whole, lm, mode=mode, metric=metric, path=prompts, notes=[])
        metric = choose_metric(plist_all, metric)
    metric = choose_metric(plist, metric)
    opts = Options(mode=mode, direction=direction, method=method, sites=sites,
                   positions=positions, head_positions=head_positions, joint=joint_positions,
                   window=window,
                   align=align, span=span, samples=samples, noise_scale=noise_scale,
                   metric=metric, seed=seed, batch_size=model_opts.batch_size,
                   first_index=shard_offset(run))

    def bar(total):
        return progress(total=total, desc="patching", unit="cell")

    patcher = Patcher(lm, plist, opts, progress=bar)
    rows, summ = patcher.run()
    extra = {"mode": mode, "method": method, "direction": direction, "metric": metric,
             "align": align, "window": window, "sites": sites, "positions": positions,
             "joint_positions": joint_positions, "head_positions": head_positions}
    if mode == "noise":
        extra.update(span=span, samples=samples, noise_scale=noise_scale,
                     noise_std=patcher.opts.noise_scale * patcher.embed_std)
    effects = frame(rows, "effects")
    write_table(effects, output, schema="effects", run=run, force=force, extra=extra)
    if summary is not None:
        sdf = pd.DataFrame(summ, columns=SUMMARY_COLUMNS)
        for col in ("window", "peak_layer", "peak_position", "peak_head", "num_choice_flips"):
            sdf[col] = sdf[col].astype("Int64")
        sdf["clean_chose_intended"] = sdf["clean_chose_intended"].astype("boolean")
        write_table(sdf, summary, schema="patch_summary", run=run, force=force, extra=extra)


SUMMARY_COLUMNS = ["prompt_id", "grid", "window", "kind", "mode", "method", "metric",
                   "clean_value", "corrupt_value", "n_cells", "peak_layer", "peak_position",
                   "peak_head", "peak_value", "peak_effect", "num_choice_flips",
                   "gini_coefficient", "top5_concentration", "clean_choice",
                   "clean_chose_intended"]
