"""dolm-collect-acts, the run: read and check inputs, then score batches into durable files.

Outputs are written through partial files (see :mod:`dolm_tools.collect_acts.store`): the
outcomes journal ``<output>.partial`` and the activations file ``<acts>.partial``. Both
are renamed/converted into their final names only once every prompt is done, so a killed
run never leaves a finished-looking file, and ``--resume`` continues from the last
committed batch.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dolm.errors import InputError
from dolm.executor import parse_shard, shard_range
from dolm_tools.collect_acts import positions as pos
from dolm_tools.collect_acts.engine import (
    Scorer,
    Settings,
    find_extractor,
    plan_items,
)
from dolm_tools.collect_acts.store import ActsWriter, Journal

ACT_DTYPES = ("float32", "float16")
COMPRESSIONS = ("gzip", "lzf", "none")
MODEL_KEYS = ("spec", "revision", "architecture", "weights_sha256", "dtype")
BUFFER_BYTES = 64 << 20  # activations held in memory between commits, at most (about)


def commit_seconds() -> float:
    """Seconds between durable commits (env ``DOLM_COMMIT_SECONDS``, default 2)."""
    try:
        return max(0.0, float(os.environ.get("DOLM_COMMIT_SECONDS", "2")))
    except ValueError:
        return 2.0


def split_patterns(values: Any) -> list[str]:
    out: list[str] = []
    for v in values or ():
        out += [p.strip() for p in str(v).split(",") if p.strip()]
    return out


def model_fingerprint(info: dict[str, Any]) -> dict[str, Any]:
    return {k: info.get(k) for k in MODEL_KEYS if k in info}


def widths(lm: Any, sites: list[str]) -> dict[str, int]:
    """Per-position width of each site (InputError for pattern sites)."""
    return {s: lm.site_width(s) for s in sites}


def _same_file(a: str, b: str) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def relpath(target: str, start_file: str) -> str:
    """``target`` relative to the folder of ``start_file`` (how shards find their acts)."""
    try:
        return os.path.relpath(
            os.path.abspath(target), os.path.dirname(os.path.abspath(start_file))
        )
    except ValueError:  # pragma: no cover - another drive on Windows
        return os.path.abspath(target)


@dataclass
class Request:
    """The options of a run, checked before any file or model is read."""

    site_patterns: list[str]
    attention_to: list[str]
    specs: list[str]
    shard: tuple[int, int] | None


@dataclass
class Durable:
    """The partial files of a run: the outcomes journal, and (with --acts) the open
    activations file and its writer; ``resumed``: continuing a killed run."""

    journal: Journal
    tmp_journal: str | None = None
    fh: Any = None
    writer: ActsWriter | None = None
    resumed: bool = False


def run_collect(
    run: Any,
    *,
    prompts: str,
    model_opts: Any,
    output: str,
    force: bool,
    acts: str | None,
    sites: tuple[str, ...],
    positions: tuple[str, ...],
    act_dtype: str,
    compression: str,
    attention_to: tuple[str, ...],
    generate: int,
    resume: bool,
    shard: str | None,
) -> None:
    """Check the options, plan the prompts, score them into the partial files, and turn
    those into the outputs (see the module doc)."""
    from dolm.cli import load_model, log, progress

    req = check_request(prompts, output, acts, sites, positions, attention_to, generate,
                        resume, shard)
    lm, settings, items, fingerprint = _plan(run, req, prompts, load_model, model_opts,
                                             act_dtype, generate)
    run.params["fingerprint"] = fingerprint
    dur = _journal(output, fingerprint, resume, log)
    try:
        if acts:
            _open_acts(dur, run, lm, settings, acts, output, fingerprint, force, act_dtype,
                       compression, log)
        if not dur.resumed:
            dur.journal.start()
        elif dur.journal.n_done:
            log(f"dolm-collect-acts: resuming after {dur.journal.n_done} of {len(items)} "
                "prompts")

        _loop(lm, settings, items, dur.journal, dur.writer, model_opts.batch_size, progress,
              log)
        _finish(dur, run, lm, settings, fingerprint, output, acts, force, log)
    finally:
        dur.journal.close()
        if dur.fh is not None and not (dur.writer is not None and dur.writer.broken):
            _close_quietly(dur.fh)
        if dur.tmp_journal is not None:
            Path(dur.tmp_journal).unlink(missing_ok=True)


def check_request(prompts: str, output: str, acts: str | None, sites, positions,
                  attention_to, generate: int, resume: bool, shard: str | None) -> Request:
    """The option checks that need no file or model."""
    site_patterns = split_patterns(sites)
    if acts and not site_patterns:
        raise InputError("--acts: needs --sites (e.g. --sites 'resid_post.*')")
    if site_patterns and not acts:
        raise InputError("--sites: needs --acts FILE (the activations HDF5 to write)")
    if positions and not acts:
        raise InputError("--positions: only used with --acts/--sites")
    if acts and output != "-" and os.path.abspath(acts) == os.path.abspath(output):
        raise InputError(f"--acts {acts}: must differ from --output")
    for opt, path in (("--output", output), ("--acts", acts)):
        if path and path != "-" and prompts != "-" and _same_file(path, prompts):
            raise InputError(f"{opt} {path}: is the prompts file; write the output elsewhere")
    if resume and output == "-":
        raise InputError("--resume: needs a file for --output (not '-')")
    if generate < 0:
        raise InputError(f"--generate: expected a number of tokens >= 0, found {generate}")
    spans = split_patterns(attention_to)
    for s in spans:
        if s in pos.BUILTIN:
            raise InputError(f"--attention-to {s}: expected a span name from the prompts' spans")
    specs = pos.parse_specs(list(positions) or None)
    return Request(site_patterns, spans, specs, parse_shard(shard))


def _plan(run: Any, req: Request, prompts: str, load_model, model_opts, act_dtype: str,
          generate: int):
    """Read the prompts (this shard's), load the model, plan the items; returns (model,
    settings, items, the run's fingerprint)."""
    from dolm.formats import read_table

    df, _ = read_table(prompts, schema="prompts", run=run)
    prompts_sha = run.inputs[-1].get("sha256") if run.inputs else None
    n_total = len(df)
    lo, hi = (0, n_total) if req.shard is None else shard_range(*req.shard, n_total)
    sub = df.iloc[lo:hi].reset_index(drop=True)
    del df

    lm = load_model(model_opts, run=run)
    site_names = lm.expand_sites(req.site_patterns) if req.site_patterns else []
    for s in site_names:
        if s.split(".")[0] == "attn":
            raise InputError(
                f"--sites: {s} is an attention pattern, not one vector per position; "
                "use --attention-to SPAN for attention mass, or attn_out.L for the output"
            )
    settings = Settings(
        sites=site_names,
        positions=req.specs,
        act_dtype=act_dtype,
        generate=generate,
        attention_to=req.attention_to,
    )
    items = plan_items(sub, lm, settings, where=prompts, first_index=lo)
    fingerprint = {
        "prompts_sha256": prompts_sha,
        "n_prompts": n_total,
        "shard": None
        if req.shard is None
        else {"index": req.shard[0], "count": req.shard[1], "start": lo, "stop": hi},
        "model": model_fingerprint(lm.info),
        "options": settings.fingerprint(),
    }
    return lm, settings, items, fingerprint


def _journal(output: str, fingerprint: dict, resume: bool, log) -> Durable:
    """The outcomes journal (a temporary one for --output -), reopened with --resume."""
    from dolm.formats import partial_path

    dur = Durable(Journal(partial_path(output), fingerprint) if output != "-" else None)
    if output == "-":
        fd, dur.tmp_journal = tempfile.mkstemp(prefix=".dolm-collect-acts.", suffix=".partial")
        os.close(fd)
        dur.journal = Journal(dur.tmp_journal, fingerprint)
    dur.resumed = bool(resume) and dur.journal.resume()
    if resume and not dur.resumed:
        log(f"dolm-collect-acts: --resume: no partial run at {dur.journal.path}; starting "
            "from the top")
    return dur


def _open_acts(dur: Durable, run: Any, lm, settings, acts: str, output: str,
               fingerprint: dict, force: bool, act_dtype: str, compression: str, log) -> None:
    """The activations partial: reopened and checked when resuming, else created (a
    partial that cannot be reused means starting over)."""
    from dolm.formats import open_h5_for_write, partial_path

    site_widths = widths(lm, settings.sites)
    extra = dict(fingerprint, outcomes=None if output == "-" else relpath(output, acts))
    part = partial_path(acts)
    if dur.resumed and not part.exists():
        log(f"dolm-collect-acts: --resume: {part} is gone; starting over")
    elif dur.resumed:
        try:
            dur.fh = open_h5_for_write(
                acts, "activations", run, force=force, resume=True, extra=extra
            )
        except Exception as exc:  # noqa: BLE001 - an unreadable partial: start over
            log(f"dolm-collect-acts: cannot reuse {part} ({exc}); starting over")
            dur.fh = None
    if dur.fh is not None:
        dur.writer = ActsWriter(dur.fh, site_widths, act_dtype, compression)
        why = dur.writer.reopen(dur.journal.acts_rows, dur.journal.segments)
        if why is not None:
            log(f"dolm-collect-acts: cannot reuse {part} ({why}); starting over")
            _close_quietly(dur.fh)
            dur.fh = dur.writer = None
    if dur.fh is None:
        dur.resumed = False
        part.unlink(missing_ok=True)
        dur.fh = open_h5_for_write(
            acts, "activations", run, force=force, resume=False, extra=extra
        )
        dur.writer = ActsWriter(dur.fh, site_widths, act_dtype, compression)
        dur.writer.create()
        dur.writer.commit()


def _finish(dur: Durable, run: Any, lm, settings, fingerprint: dict, output: str,
            acts: str | None, force: bool, log) -> None:
    """Both outputs appear together (the table is written first under a temporary name);
    the journal goes last."""
    from dolm.formats import all_or_none, finish_h5, write_table

    table = build_table(dur.journal.rows(), settings, lm)
    out_extra = dict(fingerprint, acts=None if not acts else relpath(acts, output))
    if output == "-":
        out_extra["acts"] = os.path.abspath(acts) if acts else None
    with all_or_none():
        write_table(table, output, schema="outcomes", run=run, force=force,
                    extra=out_extra)
        if dur.fh is not None:
            finish_h5(dur.fh, acts, "activations", run)
            dur.fh = None
    dur.journal.remove()
    done = f"dolm-collect-acts: {table.num_rows} prompts -> {output}"
    if acts:
        done += f"; {dur.writer.rows} rows x {len(settings.sites)} sites -> {acts}"
    log(done)


def _close_quietly(fh: Any) -> None:
    try:
        fh.close()
    except Exception:  # noqa: BLE001 - closing a broken file must not hide the error
        pass


def _loop(lm, settings, items, journal, writer, batch_size, progress, log) -> None:
    from dolm.models import iter_batched

    scorer = Scorer(lm, settings, extractor=find_extractor if settings.generate else None)
    on_cuda = str(getattr(scorer.device, "type", "cpu")) == "cuda"
    bar = progress(total=len(items), initial=journal.n_done, desc="collect-acts", unit="prompt")

    every = commit_seconds()
    last = time.monotonic()

    def backoff(size: int) -> None:
        log(f"dolm-collect-acts: out of memory; batch size now {size}")

    try:
        for start, stop, (rows, coords, acts) in iter_batched(
            len(items),
            lambda i, j: scorer.score(items[i:j]),
            batch_size,
            max_batch_size=32 if on_cuda else 8,
            start=journal.n_done,
            on_backoff=backoff,
        ):
            if writer is not None:
                writer.append(coords, acts)
            journal.append(rows)
            bar.update(stop - start)
            due = time.monotonic() - last >= every
            full = writer is not None and writer.buffered_bytes >= BUFFER_BYTES
            if due or full or stop == len(items):
                digest = writer.commit() if writer is not None else None
                journal.commit(writer.rows if writer is not None else 0, digest)
                last = time.monotonic()
    finally:
        bar.close()


def table_schema(settings: Settings, lm: Any) -> Any:
    import pyarrow as pa

    fields = [
        ("prompt_id", pa.string()),
        ("n_tokens", pa.int64()),
        ("target_n_tokens", pa.int64()),
        ("target_logprob", pa.float64()),
        ("target_rank", pa.int64()),
        ("correct", pa.bool_()),
        ("choice_probs", pa.list_(pa.float64())),
        ("choice_probs_raw", pa.list_(pa.float64())),
        ("choice_pred", pa.int64()),
    ]
    if settings.generate:
        fields += [
            ("generation", pa.string()),
            ("answer", pa.string()),
            ("exact_match", pa.bool_()),
        ]
    for span in settings.attention_to:
        for layer in range(lm.n_layers):
            for h in range(lm.n_heads):
                fields.append((f"attn_to.{span}.L{layer}.H{h}", pa.float64()))
    return pa.schema(fields)


def build_table(rows: Any, settings: Settings, lm: Any) -> Any:
    import pyarrow as pa

    schema = table_schema(settings, lm)
    return pa.Table.from_pylist(list(rows), schema=schema)


__all__ = ["ACT_DTYPES", "COMPRESSIONS", "parse_shard", "run_collect", "shard_range"]
