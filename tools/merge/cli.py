"""dolm-merge: join the tables that ``--shard K/N`` runs wrote into the table of one run.

Usage::

    dolm-merge SHARD... -o OUT.parquet
"""

from __future__ import annotations

import click
from dolm.cli import output_option, tool


@tool("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(dir_okay=False))
@output_option(help="Merged table (Parquet; '-' for stdout).")
def main(run, shards, output, force):
    """Merge SHARDS, tables written by one tool with --shard 1/N ... N/N, into OUT: the
    table of the in-process run, rows in its order.

    \b
    For the tools whose shards concatenate: dolm-patch (its -o and its --summary tables,
    one merge each), dolm-ablate, dolm-dla, dolm-lens. Checks first that the shards are
    1..N of one N, each once, made by the same tool with the same options, inputs and
    model, and that their blocks tile the prompts. Tools whose outputs need statistics
    over all prompts (steer apply, mediate interventional, circuit edges) merge only
    under --executor ray; collect-acts has `dolm-collect-acts merge`.
    """
    from dolm.cli import log
    from dolm.executor import merge_by_hand

    n = merge_by_hand(run, list(shards), output, force)
    if output != "-":
        log(f"dolm-merge: {n} shards of dolm-{run.tool} -> {output}")


if __name__ == "__main__":  # pragma: no cover
    main()
