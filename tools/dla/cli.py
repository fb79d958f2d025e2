"""dolm-dla: direct logit attribution of the final-position residual stream.

Usage::

    dolm-dla PROMPTS --model M -o attributions.parquet [--metric auto|logit|logit_diff]
        [--target TOKEN] [--foil TOKEN] [--no-heads] [--first-token]
"""

from __future__ import annotations

import click
from dolm.cli import model_options, output_option, tool
from dolm.executor import executor_options


@tool("dla")
@executor_options()
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True))
@model_options
@output_option(help="Attributions table (Parquet; '-' for stdout).")
@click.option("--metric", type=click.Choice(["auto", "logit", "logit_diff"]), default="auto",
              show_default=True,
              help="Attribute the target's logit, or the logit difference target - foil; auto: "
              "logit_diff when every prompt has a foil (column foil, --foil, or the other of "
              "two choices), else logit.")
@click.option("--target", default=None, metavar="TOKEN",
              help="Target token for every prompt instead of the target column (one token).")
@click.option("--foil", default=None, metavar="TOKEN",
              help="Foil token for every prompt instead of the foil column (one token).")
@click.option("--heads/--no-heads", default=True, show_default=True,
              help="Also split each layer's attention output into heads (head.L.H rows plus "
              "the output projection's bias, attn_bias.L).")
@click.option("--first-token", is_flag=True,
              help="Use the first token of multi-token targets, foils and choices instead of "
              "refusing them.")
def main(run, prompts, model_opts, output, force, metric, target, foil, heads, first_token):
    """Direct logit attribution at the last prompt token, with the final norm linearised
    by its cached scale (LayerNorm: centring too; RMSNorm: scale only).

    \b
    One row per (prompt, component). Components: embed, pos_embed (learned positions),
    attn.L, mlp.L, bias.final_norm, bias.unembed (if any): these have in_total = true and
    sum to metric_value, the model's own logit (difference); head.L.H and attn_bias.L
    (in_total = false) sum to attn.L. Columns: prompt_id, position, metric, target, foil,
    target_id, foil_id, component, kind, layer, head, value, in_total, metric_value,
    norm_scale, and for prompts with two choices the original study's per-layer columns
    (on every row of layer L): attn_to_1, attn_to_2, mlp_to_1, mlp_to_2 (layer L's
    attention/MLP attribution to the logit of choice 1/2), total_to_1 = attn_to_1 +
    mlp_to_1, total_to_2, attn_mlp_ratio = |attn_to_1| / (|attn_to_1| + |mlp_to_1|),
    decision_diff = total_to_1 - total_to_2 (positive: layer L pushes toward choice 1).
    """
    from dolm.errors import InputError
    from dolm.formats import read_table

    df, _meta = read_table(prompts, schema="prompts", run=run)
    if len(df) == 0:
        raise InputError(f"{prompts}: no prompts (the table is empty)")
    from dolm_tools.dla.core import run_dla

    run_dla(run, df=df, prompts=prompts, model_opts=model_opts, output=output, force=force,
            metric=metric, target=target, foil=foil, heads=heads, first_token=first_token)


if __name__ == "__main__":  # pragma: no cover
    main()
