"""dolm-lens: logit lens and tuned lens over the residual stream (``resid_post.L``).

Usage::

    dolm-lens PROMPTS --model M -o lens.parquet [--positions last|all|I,J] [--top-k 5]
        [--translators T.safetensors [--lens logit|tuned|both] [--allow-model-mismatch]]
    dolm-lens train DATA... --model M -o T.safetensors [--text-column prompt] [--steps 250]
        [--tokens-per-step 4096] [--lr-scale 1.0] [--momentum 0.9] [--weight-decay 1e-3]
"""

from __future__ import annotations

import click
from dolm.cli import (
    CONTEXT_SETTINGS,
    DefaultCommandGroup,
    model_options,
    output_option,
    seed_option,
    subcommand,
)
from dolm.executor import executor_options


@click.group(name="dolm-lens", cls=DefaultCommandGroup,
             context_settings=CONTEXT_SETTINGS)
def main() -> None:
    """Read the residual stream through the model's own final norm and unembedding
    (logit lens), or through trained affine translators first (tuned lens).

    \b
    dolm-lens PROMPTS -o OUT [options]      (same as: dolm-lens run ...)
    dolm-lens train DATA... -o TRANSLATORS [options]
    """


@subcommand(main, "run", "lens")
@executor_options()
@click.argument("prompts", type=click.Path(dir_okay=False, allow_dash=True))
@model_options
@output_option(help="Lens table (Parquet; '-' for stdout).")
@click.option("--positions", default="last", show_default=True,
              help="Token positions to read: last, all, or comma-separated token indices "
              "(negative counts from the end; a BOS the tokenizer adds is position 0).")
@click.option("--top-k", type=int, default=5, show_default=True,
              help="Most probable tokens kept per (prompt, lens, layer, position).")
@click.option("--translators", type=click.Path(dir_okay=False), default=None,
              help="Tuned-lens translators (safetensors from `dolm-lens train`).")
@click.option("--lens", "lens", type=click.Choice(["logit", "tuned", "both"]), default=None,
              help="Which lens to read out [default: both with --translators, else logit].")
@click.option("--allow-model-mismatch", is_flag=True,
              help="Use translators trained on another model (same width and depth).")
@click.option("--target", default=None, metavar="TOKEN",
              help="Token whose log-prob to report for every prompt, instead of the "
              "prompts' target column (must be one token).")
@click.option("--first-token", is_flag=True,
              help="Use the first token of multi-token targets and choices instead of "
              "refusing them.")
def run_cmd(run, prompts, model_opts, output, force, positions, top_k, translators, lens,
            allow_model_mismatch, target, first_token):
    """Logit (and tuned) lens per prompt, layer and position.

    \b
    The site is resid_post.L (block L's output, before the final norm), L = 0..n_layers-1;
    at the last layer the logit lens is the model's output. One row per (prompt, lens,
    layer, position, rank); columns: prompt_id, lens, site, layer, position, rank, token,
    token_id, prob, logprob (of that top-k token), and per cell (repeated over ranks):
    entropy, kl_to_final (KL(final || lens), nats), target_logprob, target_rank,
    choice_logprobs (one per choice, in the prompts' order), intended (index of the
    intended choice), crossing_layer (first layer from which the intended choice leads
    the others at every later layer; null if it does not lead at the last layer).
    """
    from dolm_tools.lens.options import check_request

    df, pos, lenses = check_request(prompts=prompts, positions=positions, top_k=top_k,
                                    translators=translators, lens=lens, run=run)
    from dolm.executor import shard_rows
    from dolm_tools.lens.core import run_lens

    df = shard_rows(df, run)  # every prompt is read on its own: a block is the whole's rows

    run_lens(run, df=df, prompts=prompts, model_opts=model_opts, output=output, force=force,
             positions=positions, pos=pos, lenses=lenses, top_k=top_k, translators=translators,
             allow_model_mismatch=allow_model_mismatch, target=target, first_token=first_token)


@subcommand(main, "train", "lens")
@click.argument("data", nargs=-1, required=True, type=click.Path(dir_okay=False, allow_dash=True))
@model_options
@output_option(help="Translators file (safetensors).")
@seed_option
@click.option("--text-column", default="prompt", show_default=True,
              help="Column of a table DATA holding the texts (e.g. 'text' for a prompts "
              "table's full training strings). A text file gives one sequence per line.")
@click.option("--steps", type=int, default=250, show_default=True, help="Optimiser steps.")
@click.option("--tokens-per-step", type=int, default=4096, show_default=True,
              help="Tokens per step, drawn at random from the cached residuals "
              "(the paper uses 2^18).")
@click.option("--lr-scale", type=float, default=1.0, show_default=True,
              help="Learning rate = lr_scale * (1 - momentum).")
@click.option("--momentum", type=float, default=0.9, show_default=True,
              help="Nesterov momentum of SGD.")
@click.option("--weight-decay", type=float, default=1e-3, show_default=True)
@click.option("--max-tokens", type=int, default=32768, show_default=True,
              help="Training tokens cached (residuals of every layer are kept in memory).")
@click.option("--max-length", type=int, default=256, show_default=True,
              help="Longer sequences are cut into chunks of this many tokens.")
@click.option("--holdout", type=float, default=0.1, show_default=True,
              help="Fraction of sequences held out to report the per-layer KL of both lenses.")
def train_cmd(run, data, model_opts, output, force, seed, text_column, steps, tokens_per_step,
              lr_scale, momentum, weight_decay, max_tokens, max_length, holdout):
    """Train tuned-lens translators (h + W h + b per layer, zero-initialised) to minimise
    KL(final || lens) on the texts of DATA (prompts tables or other tables: --text-column;
    text files: one sequence per line; several files are pooled).

    \b
    SGD with Nesterov momentum 0.9, lr = lr_scale * (1 - momentum) = 0.1, weight decay
    1e-3, linear decay to 0 over --steps, no warm-up (the tuned-lens paper's defaults);
    tokens are drawn from residuals cached once (--max-tokens). The held-out per-layer KL
    of the logit and tuned lens is printed and stored in the file's metadata, with the
    model's weights hash: `dolm-lens --translators` refuses another model's translators.
    """
    from dolm_tools.lens.options import TrainConfig, check_train, read_texts

    cfg = TrainConfig(steps=steps, tokens_per_step=tokens_per_step, lr_scale=lr_scale,
                      momentum=momentum, weight_decay=weight_decay, max_tokens=max_tokens,
                      max_length=max_length, holdout=holdout, seed=seed,
                      extra={"data": list(data), "text_column": text_column})
    check_train(cfg)
    texts = [t for path in data for t in read_texts(path, text_column, run)]
    from dolm_tools.lens.core import run_train

    run_train(run, texts=texts, model_opts=model_opts, output=output, force=force, cfg=cfg)


if __name__ == "__main__":  # pragma: no cover
    main()
