"""dolm-circuit: edge attribution, circuits and their faithfulness.

Usage::

    dolm-circuit edges PROMPTS --model M --method eap|eap-ig|exact -o edges.parquet
    dolm-circuit prune EDGES --top-n N | --threshold X -o circuit.json
    dolm-circuit evaluate PROMPTS --model M --circuit C --ablate mean|resample|zero|cf|noise
        -o faithfulness.parquet
"""

from __future__ import annotations

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

METHODS = ("eap", "eap-ig", "exact")


@tool_group("circuit")
def main():
    """Edges of a model's computational graph, scored (EAP, EAP-IG, exact edge patching),
    pruned into circuits, and circuits evaluated (faithfulness, completeness)."""


def _corruption_options(f):
    f = click.option("--noise", type=click.FloatRange(min=0, min_open=True), default=3.0,
                     show_default=True,
                     help="--corruption noise: Gaussian noise on the embeddings, in units of "
                     "their standard deviation.")(f)
    f = click.option("--corruption", type=click.Choice(["cf", "noise"]), default="cf",
                     show_default=True,
                     help="Corrupted run: the counterfactual prompt (cf_prompt, same token "
                     "length) or noised embeddings.")(f)
    f = click.option("--metric", type=click.Choice(["logit_diff", "prob_target"]),
                     default="logit_diff", show_default=True,
                     help="logit(target) - logit(foil) (foil: column foil or cf_target), or "
                     "P(target) at the last prompt token.")(f)
    return f


def _merge_edges(run, shard_files, outputs, force):
    from dolm_tools.circuit.core import merge_edges

    merge_edges(run, shard_files, outputs, force)


@subcommand(main, "edges", "circuit")
@executor_options(merge=_merge_edges)
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True))
@model_options
@click.option("--method", type=click.Choice(METHODS), default="eap-ig", show_default=True,
              help="eap: one gradient at the clean run; eap-ig: integrated gradients over "
              "--steps points from the corrupted to the clean embeddings; exact: patch each "
              "edge alone (the reference; costs a partial forward per edge and prompt).")
@_corruption_options
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="eap-ig: interpolation steps (backward passes per batch).")
@click.option("--budget", type=click.IntRange(min=1), default=5000, show_default=True,
              help="exact: the most edges patched one at a time without --force-budget.")
@click.option("--force-budget", is_flag=True, help="exact: run over the budget anyway.")
@click.option("--per-prompt", is_flag=True,
              help="Also write one row per prompt and edge (aggregated rows have prompt_id "
              "null).")
@prompt_selection_options()
@output_option(help="Edges table (Parquet; '-' for stdout).")
@seed_option
def edges(run, prompts, model_opts, method, metric, corruption, noise, steps, budget,
          force_budget, per_prompt, where, limit, output, force, seed):
    """Score every edge of the model's graph for METRIC on PROMPTS.

    \b
    Nodes: embed, head.L.H, mlp.L, logits; edges from every sender to every downstream
    receiver, into heads separately through q, k and v. Score = metric(clean run with
    the edge patched from the corrupted run) - metric(clean run) (exact), or its
    EAP / EAP-IG estimate. Any model whose heads dolm resolves (GPT-2, llama/
    mistral/qwen2 with grouped-query attention, gpt_neox, ...; post-norm blocks are
    refused).
    """
    from dolm_tools.circuit.core import run_edges

    run_edges(run, prompts=prompts, model_opts=model_opts, method=method, metric=metric,
              corruption=corruption, noise=noise, steps=steps, budget=budget,
              force_budget=force_budget, per_prompt=per_prompt, where=where, limit=limit,
              output=output, force=force, seed=seed)


@subcommand(main, "prune", "circuit")
@click.argument("edges_path", metavar="EDGES", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--top-n", type=click.IntRange(min=1), default=None,
              help="Keep the N edges of largest |score|.")
@click.option("--threshold", type=click.FloatRange(min=0), default=None,
              help="Keep the edges with |score| >= X.")
@output_option(help="Circuit JSON ('-' for stdout).")
def prune(run, edges_path, top_n, threshold, output, force):
    """Select a circuit from an edges table (aggregated rows) by --top-n or --threshold."""
    from dolm_tools.circuit.core import run_prune

    run_prune(run, edges_path=edges_path, top_n=top_n, threshold=threshold, output=output,
              force=force)


@subcommand(main, "evaluate", "circuit")
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True))
@model_options
@click.option("--circuit", "circuit_path", type=click.Path(dir_okay=False), required=True,
              help="Circuit JSON (dolm-circuit prune).")
@click.option("--ablate", type=click.Choice(["mean", "resample", "zero", "cf", "noise"]),
              default="mean", show_default=True,
              help="Value of an ablated edge's sender: its mean output over the prompts' "
              "tokens, its output on another prompt of the same length, zero, the "
              "counterfactual run, or the noised run.")
@_corruption_options
@click.option("--edges", "edges_path", type=click.Path(dir_okay=False), default=None,
              help="An edges table whose ranking gives the faithfulness curve (default: the "
              "circuit's own edges by |score|).")
@click.option("--sizes", default=None,
              help="Circuit sizes of the curve, comma-separated (default: a log grid up to "
              "the ranking's length).")
@prompt_selection_options()
@output_option(help="Faithfulness table (Parquet; '-' for stdout).")
@seed_option
def evaluate(run, prompts, model_opts, circuit_path, ablate, metric, corruption, noise,
             edges_path, sizes, where, limit, output, force, seed):
    """Faithfulness of a circuit: the model with every edge outside it ablated.

    \b
    faithfulness = mean circuit metric / mean full metric; the curve repeats it for the
    top-n edges of the ranking; complement_ratio ablates the circuit instead.
    """
    from dolm_tools.circuit.core import run_evaluate

    if ablate in ("cf", "noise"):
        corruption = ablate
    run_evaluate(run, prompts=prompts, model_opts=model_opts, circuit_path=circuit_path,
                 ablate=ablate, metric=metric, corruption=corruption, noise=noise,
                 edges_path=edges_path, sizes=sizes, where=where, limit=limit, output=output,
                 force=force, seed=seed)


if __name__ == "__main__":  # pragma: no cover
    main()
