"""dolm-collect-acts: prompts + a model -> outcomes (Parquet) and activations (HDF5).

Usage::

    dolm-collect-acts PROMPTS --model M -o outcomes.parquet \\
        [--acts acts.h5 --sites 'resid_post.*' --positions last,subject_last] \\
        [--attention-to numbers] [--generate 32] [--resume] [--shard 2/4]
    dolm-collect-acts merge SHARD_OUTCOMES... -o outcomes.parquet [--acts acts.h5]
"""

from __future__ import annotations

import click
from dolm.cli import CONTEXT_SETTINGS, DefaultCommandGroup, model_options, output_option, subcommand
from dolm.executor import executor_options


def _merge_shards(run, shard_files, outputs, force):
    """--executor ray: the shards join with ``dolm-collect-acts merge``'s checks."""
    from dolm.executor import adopt_chain
    from dolm_tools.collect_acts.merge import run_merge

    adopt_chain(run, shard_files[0]["output"])
    run_merge(run, shards=tuple(s["output"] for s in shard_files), output=outputs["output"],
              acts=outputs.get("acts"), force=force)


@click.group(name="dolm-collect-acts", cls=DefaultCommandGroup,
             context_settings=CONTEXT_SETTINGS)
def main() -> None:
    """Run a model over a prompts table: per-prompt outcomes, optional activations.

    \b
    dolm-collect-acts PROMPTS -o OUT [options]     (same as: dolm-collect-acts run ...)
    dolm-collect-acts merge SHARDS... -o OUT [--acts FILE]
    """


@subcommand(main, "run", "collect-acts", outputs=("output", "acts"))
@executor_options(outputs=("output", "acts"), merge=_merge_shards)
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True))
@model_options
@output_option(help="Outcomes table (Parquet; '-' for stdout).")
@click.option(
    "--acts",
    type=click.Path(dir_okay=False),
    default=None,
    help="Activations file to write (HDF5); needs --sites.",
)
@click.option(
    "--sites",
    multiple=True,
    help="Sites to store, names or patterns, comma-separated or repeated "
    "(e.g. 'resid_post.*', 'head.3.*', embed, final_norm).",
)
@click.option(
    "--positions",
    multiple=True,
    help="Token positions to store: last (default), all, a span name from the prompts' "
    "spans column (all its tokens), or <span>_first / <span>_last; comma-separated.",
)
@click.option(
    "--act-dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Dtype of stored activations.",
)
@click.option(
    "--compression",
    type=click.Choice(["gzip", "lzf", "none"]),
    default="gzip",
    show_default=True,
    help="HDF5 compression of the activation datasets (gzip level 1 + shuffle).",
)
@click.option(
    "--attention-to",
    multiple=True,
    metavar="SPAN",
    help="Add columns attn_to.<SPAN>.L<l>.H<h>: attention mass from the last prompt token "
    "to the span's tokens, per layer and head. Repeatable.",
)
@click.option(
    "--generate",
    type=int,
    default=0,
    show_default=True,
    metavar="N",
    help="Also generate N tokens greedily: columns generation, answer, exact_match.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue an interrupted run from what it durably wrote (same inputs and options).",
)
@click.option("--shard", default=None, metavar="K/N", help="Do block K of N of the prompts.")
def run_cmd(
    run,
    prompts,
    model_opts,
    output,
    force,
    acts,
    sites,
    positions,
    act_dtype,
    compression,
    attention_to,
    generate,
    resume,
    shard,
):
    """Score every prompt: target log-prob and rank, greedy correctness, choice
    probabilities; optionally store activations, attention mass and generations.

    \b
    Outcome columns: prompt_id, n_tokens, target_n_tokens, target_logprob (summed over
    the target's tokens, teacher-forced), target_rank (of the first target token, 0 = top),
    correct (greedy decoding writes the target), choice_probs (renormalised over the
    choices), choice_probs_raw, choice_pred; with --generate: generation, answer,
    exact_match; with --attention-to: attn_to.<span>.L<l>.H<h>.
    """
    from dolm_tools.collect_acts.collect import run_collect

    run_collect(
        run,
        prompts=prompts,
        model_opts=model_opts,
        output=output,
        force=force,
        acts=acts,
        sites=sites,
        positions=positions,
        act_dtype=act_dtype,
        compression=compression,
        attention_to=attention_to,
        generate=generate,
        resume=resume,
        shard=shard,
    )


@subcommand(main, "merge", "collect-acts", outputs=("output", "acts"))
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False))
@output_option(help="Merged outcomes table (Parquet).")
@click.option(
    "--acts",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also merge the shards' activations into this HDF5 file.",
)
def merge_cmd(run, shards, output, force, acts):
    """Merge the outputs of --shard K/N runs (all N shards, same prompts, model, options)."""
    from dolm_tools.collect_acts.merge import run_merge

    run_merge(run, shards=shards, output=output, acts=acts, force=force)


if __name__ == "__main__":  # pragma: no cover
    main()
