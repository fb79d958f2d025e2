"""dolm-collect-acts merge: join the outputs of ``--shard K/N`` runs into one.

Checks before writing anything: every shard is a finished outcomes file made with
``--shard``; the shards are 1..N of the same N, each exactly once; they come from the
same prompts file, model and options; each holds all the rows of its block; prompt ids
are disjoint. Activations are copied dataset by dataset in bounded slices (never a whole
dataset in memory).
"""

from __future__ import annotations

import os
from typing import Any

from dolm.activations import COORDS
from dolm.errors import InputError
from dolm.executor import check_shard_set, concat_h5
from dolm_tools.collect_acts.store import _first_difference


def _shard_of(path: str, extra: dict[str, Any]) -> dict[str, Any]:
    shard = extra.get("shard")
    if not isinstance(shard, dict):
        raise InputError(f"{path}: not a shard (made without dolm-collect-acts --shard K/N)")
    return shard


def _common(extra: dict[str, Any]) -> dict[str, Any]:
    return {k: extra.get(k) for k in ("prompts_sha256", "n_prompts", "model", "options")}


def run_merge(
    run: Any, *, shards: tuple[str, ...], output: str, acts: str | None, force: bool
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from dolm.cli import log
    from dolm.formats import read_h5, read_table, write_table

    if not shards:
        raise InputError("merge: expected the shards' outcomes files as arguments")
    if acts and output != "-" and os.path.abspath(acts) == os.path.abspath(output):
        raise InputError(f"--acts {acts}: must differ from --output")
    for path in shards:
        for opt, out in (("--output", output), ("--acts", acts)):
            if out and out != "-" and os.path.abspath(out) == os.path.abspath(path):
                raise InputError(f"{opt} {out}: is one of the shards; write the merge elsewhere")
    loaded = []
    for path in shards:
        if str(path).endswith(".partial"):
            raise InputError(f"{path}: an unfinished shard (.partial); finish it with --resume")
        df, meta = read_table(path, schema="outcomes", run=run)
        shard = _shard_of(path, meta.extra)
        loaded.append((path, df, meta.extra, shard))

    # ---- same N, each K once, none missing
    n = check_shard_set([(p, int(s["index"]), int(s["count"])) for p, _, _, s in loaded],
                        "merge")

    # ---- same prompts, model and options
    first_path, _, first_extra, _ = loaded[0]
    for path, _, extra, _ in loaded[1:]:
        diff = _first_difference(_common(first_extra), _common(extra))
        if diff is not None:
            diff = diff.replace(" then,", f" in {first_path},").replace(" now", f" in {path}")
            raise InputError(f"merge: shards differ in {diff}")

    # ---- complete and disjoint
    loaded.sort(key=lambda t: int(t[3]["index"]))
    expect = 0
    ids: set[str] = set()
    for path, df, _, s in loaded:
        start, stop = int(s["start"]), int(s["stop"])
        if start != expect:
            raise InputError(
                f"{path}: shard {s['index']}/{n} starts at prompt {start}, expected {expect}"
            )
        if len(df) != stop - start:
            raise InputError(
                f"{path}: shard {s['index']}/{n} is incomplete: {len(df)} rows, "
                f"expected {stop - start}"
            )
        dup = ids.intersection(df["prompt_id"])
        if dup:
            raise InputError(f"{path}: prompt ids also in another shard (e.g. {sorted(dup)[0]!r})")
        ids.update(df["prompt_id"])
        expect = stop
    if expect != int(first_extra["n_prompts"]):
        raise InputError(
            f"merge: shards cover {expect} prompts, expected {first_extra['n_prompts']}"
        )

    common = _common(first_extra)
    out_extra = dict(common, shard=None, merged_from=[p for p, _, _, _ in loaded], acts=None)

    # ---- activations
    shard_acts: list[str] = []
    has_acts = [e.get("acts") for _, _, e, _ in loaded]
    if acts:
        for (path, _, _, s), rel in zip(loaded, has_acts, strict=True):
            if not rel:
                raise InputError(
                    f"--acts: shard {path} has no activations file (made without --acts)"
                )
            found = (
                rel
                if os.path.isabs(rel)
                else os.path.join(os.path.dirname(os.path.abspath(path)), rel)
            )
            found = os.path.normpath(found)
            if not os.path.exists(found):
                raise InputError(
                    f"{path}: its activations file {found} is missing (shard {s['index']}/{n})"
                )
            shard_acts.append(found)
    elif any(has_acts):
        log("dolm-collect-acts merge: the shards have activations; pass --acts FILE to merge them")

    # the validated files again, with pyarrow: exact column types (nullable ints stay ints)
    table = pa.concat_tables(
        [pq.read_table(p).replace_schema_metadata(None) for p, _, _, _ in loaded]
    )
    from dolm.formats import all_or_none

    with all_or_none():  # the merged table and activations appear together
        if acts:
            handles = []
            try:
                for (path, _, extra, _), a in zip(loaded, shard_acts, strict=True):
                    fh, meta = read_h5(a, schema="activations", run=run)
                    handles.append(fh)
                    diff = _first_difference(_common(extra), _common(meta.extra))
                    if diff is not None or meta.extra.get("shard") != extra.get("shard"):
                        raise InputError(
                            f"{a}: does not belong to {path} ({diff or 'shard differs'})")
                out_extra["acts"] = (
                    os.path.abspath(acts)
                    if output == "-"
                    else os.path.relpath(
                        os.path.abspath(acts), os.path.dirname(os.path.abspath(output))
                    )
                )
                concat_h5(handles, acts, "activations", run, force,
                          dict(common, shard=None, outcomes=None), first=COORDS)
            finally:
                for fh in handles:
                    fh.close()
        write_table(table, output, schema="outcomes", run=run, force=force, extra=out_extra)


__all__ = ["run_merge"]
