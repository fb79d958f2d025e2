"""One executor for prompt-parallel work: in-process, a ``--shard K/N`` slice, or Ray.

A tool that scores prompts one by one (collect-acts, patch, ablate, ...) gets the same
flags from one decorator, :func:`executor_options`:

- ``--executor local`` (default): the run as it always was, in this process.
- ``--shard K/N``: block K of N of the (selected) prompts, for a job array; the blocks
  are contiguous, so concatenating the N outputs in K order gives the in-process output.
- ``--executor ray [--ray-address ADDR] [--shards N] [--gpus-per-worker G] [--resume]``:
  the driver splits the prompts into N shards and hands them to Ray actors (each loads the
  model once and takes shards from the queue until none is left). Every shard runs the
  tool itself with ``--shard K/N`` into ``<output>.shards/``; a shard counts as finished
  only once all its outputs are renamed into place and its ``.done.json`` marker is
  written. The driver then merges the shards in prompt order into the outputs, with one
  provenance entry that records the executor, the cluster and every shard. Nothing
  half-written is ever merged; ``--resume`` skips the shards already finished.

A tool only has to slice its prompts with :func:`shard_rows` after it selected them.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from dolm.errors import DolmError, DolmRuntimeError, InputError

EXECUTORS = ("local", "ray")
INSTALL_HINT = "pip install 'dolm[ray]' (or: pip install 'ray>=2.60')"
MAX_RETRIES = 3  # restarts of a killed worker, and retries of the shard it was running
COPY_BYTES = 64 << 20  # at most this much of one HDF5 dataset in memory while merging
_FLAGS = ("executor", "ray_address", "shards", "gpus_per_worker")


# --------------------------------------------------------------- shards


def parse_shard(value: str | None, option: str = "--shard") -> tuple[int, int] | None:
    """``"2/4"`` -> (2, 4); None when not sharding."""
    if value is None:
        return None
    try:
        k_s, n_s = str(value).split("/")
        k, n = int(k_s), int(n_s)
    except ValueError:
        raise InputError(f"{option}: expected K/N (e.g. 2/4), found {value!r}") from None
    if n < 1 or not 1 <= k <= n:
        raise InputError(f"{option}: expected K/N with 1 <= K <= N, found {value!r}")
    return k, n


def shard_range(k: int, n: int, total: int) -> tuple[int, int]:
    """Contiguous block of rows ``[start, stop)`` for shard ``k`` of ``n`` (1-based)."""
    return (k - 1) * total // n, k * total // n


def shard_rows(df: Any, run: Any, what: str = "prompts") -> Any:
    """The block of ``df`` (a prompts table after selection, or a list: prompt pairs)
    that ``run``'s shard does.

    Unsharded runs get ``df`` back. An empty block is an error naming ``--shards``: more
    shards than ``what``. The block's place is recorded in the run's provenance.
    """
    spec = getattr(run, "shard", None)
    if spec is None:
        return df
    k, n = spec
    lo, hi = shard_range(k, n, len(df))
    if hi <= lo:
        raise InputError(f"--shards {n}: more shards than {what} ({len(df)} selected); "
                         f"shard {k}/{n} would hold none: use at most {len(df)} shards")
    run.params["shard_block"] = {"index": k, "count": n, "start": lo, "stop": hi,
                                 "n_prompts": len(df)}
    return df.iloc[lo:hi] if hasattr(df, "iloc") else df[lo:hi]


def shard_offset(run: Any) -> int:
    """Index of the shard's first prompt in the whole (selected) table (0 unsharded)."""
    block = getattr(run, "params", {}).get("shard_block")
    return int(block["start"]) if block else 0


# --------------------------------------------------------------- the decorator


@dataclass(frozen=True)
class Prephase:
    """A first round of shards whose partial results the driver reduces into one file
    that every shard of the main round reads (mean ablation: per-shard sums and counts,
    reduced to the means over all prompts, then applied).

    ``needed(params)``: whether this run has the phase. ``out_param``: the tool's option
    that makes a shard write only its partial result there (and no output). ``in_param``:
    the option the main round reads the reduced file from. ``reduce(partials, dest)``:
    combine the partial files (in shard order) into ``dest``. ``name``: file prefix."""

    needed: Callable[[dict[str, Any]], bool]
    out_param: str
    in_param: str
    reduce: Callable[[list[str], str], None]
    name: str = "phase1"
    suffix: str = ".safetensors"


def executor_options(outputs: tuple[str, ...] = ("output",),
                     merge: Callable[..., None] | None = None,
                     groups: tuple[str, ...] = (),
                     finish: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None,
                     prephase: Prephase | None = None,
                     fill: Callable[[dict[str, Any]], None] | None = None,
                     ) -> Callable[[Callable], Callable]:
    """Add ``--executor``, ``--ray-address``, ``--shards``, ``--gpus-per-worker`` (and
    ``--shard K/N``, ``--resume`` where the tool has none of its own) to a tool command.

    Put it right under ``@tool``/``@subcommand``. ``outputs``: the keyword arguments that
    name output files (as in ``@tool``). ``merge(run, shard_files, outputs, force)``
    replaces the generic merge (concatenating tables and HDF5 datasets in shard order).
    ``groups``: columns whose values make the blocks of a table that is not prompt-major
    (ablate writes every prompt's baseline, then every prompt under each intervention):
    the merged rows are put back in that order (see :func:`order_groups`). ``finish``:
    see :func:`merge_shards`. ``prephase``: a first round reduced before the main one
    (:class:`Prephase`). ``fill(params)``: fills in output paths the tool derives from
    others (so that every shard's files are named and merged).
    """

    def deco(f: Callable) -> Callable:
        have = {p.name for p in getattr(f, "__click_params__", [])}
        own_shard, own_resume = "shard" in have, "resume" in have

        @functools.wraps(f)
        def wrapper(run: Any, *args: Any, **kw: Any) -> Any:
            opts = {k: kw.pop(k) for k in _FLAGS}
            shard = kw.get("shard") if own_shard else kw.pop("shard")
            resume = kw.get("resume") if own_resume else kw.pop("resume")
            if opts["executor"] == "ray":
                if shard is not None:
                    raise InputError("--shard: not with --executor ray (it makes its own "
                                     "shards; use --shards N)")
                ctx = click.get_current_context()
                params = dict(ctx.params)
                if fill is not None:
                    fill(params)
                return drive_ray(run, command=(f.__module__, f.__name__),
                                 params=params, outputs=outputs, shards=opts["shards"],
                                 address=opts["ray_address"], gpus=opts["gpus_per_worker"],
                                 resume=bool(resume), own_resume=own_resume,
                                 merge=merge or functools.partial(merge_shards, groups=groups,
                                                                  finish=finish),
                                 prephase=prephase)
            for key, flag in (("ray_address", "--ray-address"), ("shards", "--shards"),
                              ("gpus_per_worker", "--gpus-per-worker")):
                if opts[key] is not None:
                    raise InputError(f"{flag}: only used with --executor ray")
            if resume and not own_resume:
                raise InputError("--resume: only used with --executor ray for this tool "
                                 "(it skips the shards a killed run finished)")
            if shard is not None and not own_shard:
                run.shard = parse_shard(shard)
                run.params["shard"] = shard
                # what `dolm-merge` needs: a plain concatenation (in group order), or not
                run.params["shard_merge"] = {"generic": merge is None and finish is None,
                                             "groups": list(groups)}
            return f(run, *args, **kw)

        options = [
            click.option("--executor", type=click.Choice(EXECUTORS), default="local",
                         show_default=True,
                         help="Where the prompts run: in this process, or on a Ray cluster "
                              "(needs `pip install 'dolm[ray]'`)."),
            click.option("--ray-address", default=None, metavar="ADDR",
                         help="--executor ray: the cluster to join (host:port of `ray start "
                              "--head`, or 'auto'); default: a local cluster on this machine."),
            click.option("--shards", type=click.IntRange(min=1), default=None, metavar="N",
                         help="--executor ray: split the prompts into N shards (default: one "
                              "per worker); outputs go to <output>.shards/ until merged."),
            click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                         metavar="G",
                         help="--executor ray: GPUs per worker (default 0: one CPU each)."),
        ]
        if not own_shard:
            options.append(click.option("--shard", default=None, metavar="K/N",
                                        help="Do block K of N of the prompts (a job-array "
                                             "slice; concatenate the N outputs in K order)."))
        if not own_resume:
            options.append(click.option("--resume", is_flag=True,
                                        help="--executor ray: keep the shards an interrupted "
                                             "run finished and do only the rest."))
        for opt in reversed(options):
            wrapper = opt(wrapper)
        return wrapper

    return deco


# --------------------------------------------------------------- the Ray driver


def import_ray() -> Any:
    """``ray``, or a named error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InputError(f"--executor ray: the ray package is not installed; {INSTALL_HINT}"
                         ) from None
    return ray


def shards_folder(output: str) -> Path:
    """Where a Ray run keeps its shards: ``<output>.shards/`` beside the output."""
    p = Path(output)
    return p.parent / f"{p.name}.shards"


def check_writable(folder: str | os.PathLike, what: str) -> str | None:
    """None when a file can be created in ``folder``; else why not (for ``what``)."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".dolm-write-check.", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return f"{what}: cannot write in {folder}: {exc.strerror or exc}"
    return None


def check_address(address: str | None) -> None:
    """Fail fast (exit 1, named) when nothing listens at a ``host:port`` address."""
    if not address or address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray-address {address}: expected HOST:PORT (the address `ray "
                         "start --head` prints), 'auto' or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise DolmRuntimeError(f"--ray-address {address}: no Ray cluster answers there "
                               f"({exc.strerror or exc}); start one with `ray start --head "
                               "--port PORT` or leave --ray-address out for a local "
                               "cluster") from None


def count_rows(path: Any) -> int | None:
    """Rows of a Parquet prompts table from its footer (None when it cannot tell)."""
    if not isinstance(path, str) or path == "-" or not os.path.isfile(path):
        return None
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - CSV or unreadable: the tool itself says what is wrong
        return None


def _fingerprint(params: dict[str, Any], outputs: tuple[str, ...]) -> str:
    """What a finished shard must match to be reused by --resume: the options and the
    inputs' sizes and times."""
    import hashlib

    skip = set(_FLAGS) | set(outputs) | {"force", "resume", "shard"}
    items = {}
    for k, v in sorted(params.items()):
        if k in skip:
            continue
        if isinstance(v, str) and os.path.isfile(v):
            st = os.stat(v)
            v = [os.path.abspath(v), st.st_size, st.st_mtime_ns]
        items[k] = v
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()


def _absolute(params: dict[str, Any]) -> dict[str, Any]:
    """Paths that exist here, made absolute: a worker may start in another folder."""
    out = {}
    for k, v in params.items():
        if isinstance(v, str) and v not in ("", "-") and os.path.exists(v):
            v = os.path.abspath(v)
        elif isinstance(v, tuple):
            v = tuple(os.path.abspath(x) if isinstance(x, str) and os.path.exists(x) else x
                      for x in v)
        out[k] = v
    return out


def _shard_name(k: int, n: int, phase: str = "") -> str:
    return f"{phase + '-' if phase else ''}shard-{k:04d}-of-{n:04d}"


def _prepare_folder(folder: Path, n: int, fp: str, resume: bool) -> dict[tuple[str, int], dict]:
    """Create/clean the shards folder; with ``resume`` return the finished shards kept,
    by (phase, index): those whose options, inputs and shard count match and whose files
    are all there. Everything else in the folder (half-written shards) is deleted."""
    kept: dict[tuple[str, int], dict] = {}
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder (the shards go there)")
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise InputError(f"--output: cannot create the shards folder {folder}: "
                         f"{exc.strerror or exc}") from None
    if resume:
        for marker in folder.glob("*shard-*.done.json"):
            try:
                info = json.loads(marker.read_text())
            except (OSError, ValueError):
                continue
            files = [folder / name for name in info.get("files", {}).values()]
            if (info.get("fingerprint") == fp and info.get("count") == n
                    and all(p.is_file() for p in files)):
                kept[(str(info.get("phase") or ""), int(info["index"]))] = info
    keep = {folder / name for info in kept.values() for name in info["files"].values()}
    keep |= {folder / f"{_shard_name(k, n, ph)}.done.json" for ph, k in kept}
    for p in folder.iterdir():
        if p not in keep and p.is_file():
            p.unlink()
    return kept


def _worker_class(ray: Any) -> Any:
    @ray.remote
    class ShardWorker:
        """Loads the model once (the first shard) and runs shards of one tool."""

        def __init__(self, cwd: str) -> None:
            import dolm.cli

            if os.path.isdir(cwd):
                os.chdir(cwd)
            dolm.cli.MODEL_CACHE = {}  # the model stays loaded from shard to shard
            self.reused = 0

        def where(self, folder: str) -> dict[str, Any]:
            import ray as _ray

            node = _ray.get_runtime_context().get_node_id()
            return {"node": node, "host": socket.gethostname(), "pid": os.getpid(),
                    "problem": check_writable(folder, f"worker on {socket.gethostname()} "
                                                      f"(pid {os.getpid()})")}

        def run_shard(self, command: tuple[str, str], params: dict[str, Any], k: int, n: int,
                      files: dict[str, str], folder: str, fp: str,
                      phase: str = "") -> dict[str, Any]:
            import importlib

            from dolm.formats import atomic_path

            t0 = time.monotonic()
            module, name = command
            cmd = importlib.import_module(module)
            cmd = getattr(cmd, name)
            with click.Context(cmd, info_name=cmd.name) as ctx:
                ctx.invoke(cmd.callback, **params)
            info = {"index": k, "count": n, "phase": phase, "fingerprint": fp, "files": files,
                    "host": socket.gethostname(), "pid": os.getpid(),
                    "seconds": round(time.monotonic() - t0, 3)}
            marker = Path(folder) / f"{_shard_name(k, n, phase)}.done.json"
            with atomic_path(marker) as tmp:  # the shard counts as finished from the rename on
                tmp.write_text(json.dumps(info))
            return info

    return ShardWorker


def _shard_error(exc: Any, k: int, n: int) -> DolmError:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, DolmError):
        err = type(cause)(f"shard {k}/{n}: {cause}")
        return err
    if cause is not None:
        return DolmRuntimeError(f"shard {k}/{n} failed: {type(cause).__name__}: {cause}")
    return DolmRuntimeError(f"shard {k}/{n} failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}")


def drive_ray(run: Any, *, command: tuple[str, str], params: dict[str, Any],
              outputs: tuple[str, ...], shards: int | None, address: str | None,
              gpus: float | None, resume: bool, own_resume: bool,
              merge: Callable[..., None] | None, prephase: Prephase | None = None) -> None:
    """Run a tool's shards on Ray actors and merge them (see the module docstring)."""
    from dolm.cli import log

    ray = import_ray()
    named = {key: params.get(key) for key in outputs if params.get(key)}
    for key, path in named.items():
        if str(path) == "-":
            raise InputError(f"--{key.replace('_', '-')} -: --executor ray writes files "
                             "(the shards are merged into it); give a file name")
    n_rows = count_rows(params.get("prompts"))
    if shards is not None and n_rows is not None and shards > n_rows:
        raise InputError(f"--shards {shards}: more shards than prompts ({n_rows} in "
                         f"{params.get('prompts')}); use at most {n_rows}")
    main_out = named["output"]
    folder = shards_folder(main_out)
    problem = check_writable(Path(main_out).parent, f"--output {main_out}")
    if problem:
        raise InputError(problem)
    check_address(address)

    t0 = time.monotonic()
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, ignore_reinit_error=True)
    except Exception as exc:  # noqa: BLE001 - any failure to join is the cluster's
        raise DolmRuntimeError(f"--ray-address {address or '(local)'}: cannot start or join "
                               f"the Ray cluster: {type(exc).__name__}: {exc}") from None
    try:
        res = ray.cluster_resources()
        nodes = [nd for nd in ray.nodes() if nd.get("Alive")]
        if gpus:
            if res.get("GPU", 0) < gpus:
                raise InputError(f"--gpus-per-worker {gpus}: the cluster has "
                                 f"{res.get('GPU', 0):g} GPUs")
            slots = int(res.get("GPU", 0) // gpus)
        else:
            slots = int(res.get("CPU", 1))
        n = shards or max(1, slots)
        if n_rows is not None and n > n_rows:
            n = max(1, n_rows) if shards is None else n
        n_workers = max(1, min(n, slots))
        fp = _fingerprint(params, outputs)
        kept = _prepare_folder(folder, n, fp, resume)
        rounds = [("", named, {})]
        if prephase is not None and prephase.needed(params):
            reduced = str(folder / f"{prephase.name}{prephase.suffix}")
            rounds = [(prephase.name, {prephase.out_param: f"partial{prephase.suffix}"},
                       {"output": ".unused"}),
                      ("", named, {prephase.in_param: reduced})]
        todo = {ph: [k for k in range(1, n + 1) if (ph, k) not in kept] for ph, _, _ in rounds}
        busy = any(todo.values())
        cluster = {"address": address or "local", "nodes": len(nodes),
                   "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0),
                   "workers": n_workers if busy else 0, "gpus_per_worker": gpus or 0}
        log(f"dolm-{run.tool}: ray: {n} shards on {cluster['workers']} workers "
            f"({len(nodes)} nodes, {cluster['cpus']:g} CPUs, {cluster['gpus']:g} GPUs)"
            + (f"; {len(kept)} finished shards kept" if kept else ""))
        done = dict(kept)
        pool = None
        try:
            if busy:
                pool = _Pool(ray, run, command, params, named, folder, n, n_workers, gpus, fp,
                             own_resume, resume)
            for phase, files, scratch in rounds:
                if pool is not None and todo[phase]:
                    done.update(pool.round(phase, files, scratch, todo[phase]))
                if phase:  # the partial results reduced into the file the main round reads
                    assert prephase is not None
                    prephase.reduce([str(folder / done[(phase, k)]["files"][prephase.out_param])
                                     for k in range(1, n + 1)], reduced)
        except InputError:  # the input must change: no shard of this run is reusable
            if pool is not None:
                pool.close()
                pool = None
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            if pool is not None:
                pool.close()
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()

    shard_files = [{key: str(folder / done[("", k)]["files"][key]) for key in named}
                   for k in range(1, n + 1)]
    run.params["executor"] = {
        "kind": "ray", "cluster": cluster, "shards": n,
        "phases": [ph or "main" for ph, _, _ in rounds],
        "seconds": round(time.monotonic() - t0, 3),
        "every_shard": [{kk: done[(ph, k)].get(kk) for kk in ("index", "host", "pid", "seconds")}
                        | {"phase": ph or "main", "resumed": (ph, k) in kept}
                        for ph, _, _ in rounds for k in range(1, n + 1)],
    }
    size = sum(os.path.getsize(f) for s in shard_files for f in s.values())
    t_merge = time.monotonic()
    (merge or merge_shards)(run, shard_files, named, bool(params.get("force")))
    t_merge = time.monotonic() - t_merge
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()
    log(f"dolm-{run.tool}: merged {n} shards ({size / 2**20:.1f} MB) in {t_merge:.2f} s -> "
        f"{', '.join(map(str, named.values()))}")


class _Pool:
    """The run's Ray actors (each loads the model once) and the shard queue of a round."""

    def __init__(self, ray, run, command, params, named, folder, n, n_workers, gpus, fp,
                 own_resume, resume) -> None:
        self.ray, self.run, self.command, self.folder, self.n, self.fp = (
            ray, run, command, folder, n, fp)
        worker = _worker_class(ray).options(
            num_cpus=0 if gpus else 1, num_gpus=gpus or 0,
            max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)
        self.actors = [worker.remote(os.getcwd()) for _ in range(n_workers)]
        try:
            where = ray.get([a.where.remote(str(folder)) for a in self.actors])
            for w in where:
                if w["problem"]:
                    raise InputError(f"--output {named['output']}: {w['problem']} (the "
                                     "output folder must be shared storage every worker "
                                     "can write)")
        except BaseException:
            self.close()
            raise
        base = _absolute(params)
        for key in _FLAGS:
            base[key] = None
        base["executor"] = "local"
        base["force"] = True
        base["resume"] = bool(resume) if own_resume else False
        self.base = base

    def round(self, phase: str, named: dict[str, str], scratch: dict[str, str],
              todo: list[int]) -> dict[tuple[str, int], dict]:
        """Run shards ``todo``; ``named``: output option -> a path (its suffix counts) of
        the files a shard writes; ``scratch``: options set to a shard's own file that it
        does not write (suffix), or to a given file (absolute path)."""
        from dolm.cli import progress

        ray, n, folder = self.ray, self.n, self.folder
        queue = list(todo)
        running: dict[Any, tuple[Any, int]] = {}
        done: dict[tuple[str, int], dict] = {}

        def submit(actor: Any) -> None:
            k = queue.pop(0)
            name = _shard_name(k, n, phase)
            files = {key: f"{name}.{key}{Path(path).suffix}"
                     for key, path in named.items()}
            p = dict(self.base, shard=f"{k}/{n}", **{key: str(folder / f) for key, f in
                                                      files.items()})
            for key, v in scratch.items():
                p[key] = v if os.path.isabs(v) else str(folder / f"{name}.{key}{v}")
            running[actor.run_shard.remote(self.command, p, k, n, files, str(folder), self.fp,
                                           phase)] = (actor, k)

        for a in self.actors:
            if queue:
                submit(a)
        bar = progress(total=len(todo), desc=f"{self.run.tool} {phase or 'shards'}",
                       unit="shard")
        try:
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                actor, k = running.pop(ready[0])
                try:
                    done[(phase, k)] = ray.get(ready[0])
                except Exception as exc:  # noqa: BLE001 - mapped to dolm's exit codes
                    raise _shard_error(exc, k, n) from None
                bar.update(1)
                if queue:
                    submit(actor)
        finally:
            bar.close()
        return done

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(a)
        self.actors = []


# --------------------------------------------------------------- merging


def concat_h5(sources: list[Any], dest: str, schema: str, run: Any, force: bool,
              extra: dict[str, Any], first: tuple[str, ...] = ()) -> None:
    """Write every dataset of the open HDF5 ``sources`` concatenated along rows into
    ``dest`` (validated, renamed into place), in bounded slices; ``first``: datasets
    written before the others."""
    import numpy as np

    from dolm.formats import finish_h5, open_h5_for_write

    src0 = sources[0]
    names = [k for k in src0.keys() if k in first] + [k for k in src0.keys() if k not in first]
    for fh in sources[1:]:
        if sorted(fh.keys()) != sorted(names):
            raise InputError(f"{fh.filename}: holds other datasets than {src0.filename}")
    out = open_h5_for_write(dest, schema, run, force=force, extra=extra)
    try:
        for name in names:
            ds0 = src0[name]
            kw: dict[str, Any] = {}
            if ds0.compression:
                kw["compression"] = ds0.compression
                if ds0.compression_opts is not None:
                    kw["compression_opts"] = ds0.compression_opts
                kw["shuffle"] = ds0.shuffle
            total = sum(fh[name].shape[0] for fh in sources)
            dst = out.create_dataset(name, shape=(total, *ds0.shape[1:]), dtype=ds0.dtype,
                                     chunks=ds0.chunks, maxshape=(None, *ds0.shape[1:]), **kw)
            at = 0
            for fh in sources:
                src = fh[name]
                if src.dtype != ds0.dtype or src.shape[1:] != ds0.shape[1:]:
                    raise InputError(f"{fh.filename}: dataset {name} is {src.dtype} "
                                     f"{src.shape[1:]}, expected {ds0.dtype} {ds0.shape[1:]}")
                row_bytes = max(1, src.dtype.itemsize * int(np.prod(src.shape[1:],
                                                                    dtype=np.int64)))
                step = max(1, COPY_BYTES // row_bytes)
                if src.chunks:
                    step = max(src.chunks[0], step // src.chunks[0] * src.chunks[0])
                for lo in range(0, src.shape[0], step):
                    block = src[lo: lo + step]
                    dst[at + lo: at + lo + len(block)] = block
                at += src.shape[0]
    except BaseException:
        out.close()
        raise
    finish_h5(out, dest, schema, run)


def adopt_chain(run: Any, shard_file: str) -> None:
    """Make ``run`` the merged run: its inputs, model and parents are the first shard's
    (the shards read the same inputs), and reading the shards adds nothing more."""
    from dolm.formats import read_meta

    meta = read_meta(shard_file)
    entry = meta.provenance[-1] if meta.provenance else {}
    run.inputs = list(entry.get("inputs") or [])
    run.model = entry.get("model")
    run._parents = list(meta.provenance[:-1])
    run.add_input = lambda *a, **k: None  # the shard files are not the run's inputs


def order_groups(table: Any, groups: tuple[str, ...]) -> Any:
    """Rows of shard tables concatenated in shard order, put in the order of one run
    whose table is group-major: the groups (values of the ``groups`` columns) in the order
    they first appear, and within a group the rows in shard order (a stable sort)."""
    import numpy as np

    cols = [c for c in groups if c in table.column_names]
    if not cols or table.num_rows == 0:
        return table
    keys = list(zip(*[table.column(c).to_pylist() for c in cols], strict=True))
    rank: dict[tuple, int] = {}
    ranks = np.fromiter((rank.setdefault(k, len(rank)) for k in keys), dtype=np.int64,
                        count=len(keys))
    return table.take(np.argsort(ranks, kind="stable"))


def merge_shards(run: Any, shard_files: list[dict[str, str]], outputs: dict[str, str],
                 force: bool, groups: tuple[str, ...] = (),
                 finish: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None) -> None:
    """The generic merge: each output's shard tables (or HDF5 files) concatenated in shard
    order, all outputs appearing together; one provenance entry (``run``'s). ``finish(table,
    extra)``: the metadata of a merged table recomputed from the whole table (statistics
    a shard could only give for its own rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dolm.formats import all_or_none, read_h5, read_meta, sniff, write_table

    adopt_chain(run, shard_files[0]["output"])
    with all_or_none():
        for key, dest in outputs.items():
            paths = [s[key] for s in shard_files]
            if sniff(paths[0]) == "hdf5":
                handles = [read_h5(p)[0] for p in paths]
                try:
                    meta = read_meta(paths[0])
                    concat_h5(handles, dest, meta.schema, run, force, dict(meta.extra))
                finally:
                    for fh in handles:
                        fh.close()
                continue
            metas = [read_meta(p) for p in paths]
            tables = [pq.read_table(p) for p in paths]
            md = {k: v for k, v in (tables[0].schema.metadata or {}).items()
                  if not k.startswith(b"dolm.")}  # keeps pandas' dtypes (nullable ints)
            table = order_groups(
                pa.concat_tables([t.replace_schema_metadata(md) for t in tables]), groups)
            extra = dict(metas[0].extra)
            if isinstance(extra.get("n_prompts"), int):  # a per-shard count
                extra["n_prompts"] = sum(int(m.extra.get("n_prompts") or 0) for m in metas)
            if finish is not None:
                extra = finish(table, extra)
            write_table(table, dest, schema=metas[0].schema, run=run, force=force, extra=extra)


def check_shard_set(shards: list[tuple[str, int, int]], who: str) -> int:
    """``(path, K, N)`` of each shard given: they must be 1..N of one N, each once (named
    errors otherwise); returns N."""
    counts = {n for _, _, n in shards}
    if len(counts) != 1:
        detail = ", ".join(f"{p}: {k}/{n}" for p, k, n in shards)
        raise InputError(f"{who}: shards split the work differently ({detail})")
    n = counts.pop()
    seen: dict[int, str] = {}
    for path, k, _ in shards:
        if k in seen:
            raise InputError(f"{who}: shard {k}/{n} given twice: {seen[k]} and {path}")
        seen[k] = path
    missing = [f"{k}/{n}" for k in range(1, n + 1) if k not in seen]
    if missing:
        raise InputError(f"{who}: shards missing: {', '.join(missing)} (have {len(seen)} of "
                         f"{n})")
    return n


_NOT_COMPARED = {"shard", "shard_block", "shard_merge", "output", "summary", "effects", "acts",
                 "force", "resume"}


def merge_by_hand(run: Any, paths: list[str], output: str, force: bool) -> int:
    """``dolm-merge``: join tables made with ``--shard K/N`` (a job array) into the table of
    one in-process run; returns the number of shards.

    Checks before writing anything: every file is a shard of a tool whose shards
    concatenate (``shard_merge.generic`` in its provenance); they are 1..N of one N, each
    once; the same tool, options and inputs (by content hash); blocks that tile the
    prompts. The merged file's provenance is one entry of the tool's run, recording the
    shards as its executor.
    """
    from dolm.formats import read_meta

    if not paths:
        raise InputError("dolm-merge: expected the shards' files as arguments")
    for path in paths:
        if output != "-" and os.path.abspath(output) == os.path.abspath(path):
            raise InputError(f"--output {output}: is one of the shards; write the merge "
                             "elsewhere")
    shards = []
    for path in paths:
        meta = read_meta(path)
        entry = meta.provenance[-1] if meta.provenance else {}
        params = entry.get("params") or {}
        block, how = params.get("shard_block"), params.get("shard_merge")
        if not isinstance(block, dict) or not isinstance(how, dict):
            raise InputError(f"{path}: not a shard (made without --shard K/N by a tool that "
                             "takes it)")
        if not how.get("generic"):
            raise InputError(f"{path}: dolm-{entry.get('tool')} shards need that tool's own "
                             "merge (rows or statistics over all prompts): run it with "
                             "--executor ray, or `dolm-collect-acts merge` for collect-acts")
        shards.append((path, meta, entry, params, block))
    n = check_shard_set([(p, int(b["index"]), int(b["count"])) for p, *_, b in shards],
                        "dolm-merge")
    shards.sort(key=lambda t: int(t[4]["index"]))
    first, _, e0, p0, b0 = shards[0]

    def same(entry: dict, params: dict) -> dict:
        return {"tool": entry.get("tool"), "schema": None,
                "inputs": sorted(str(i.get("sha256")) for i in entry.get("inputs") or []),
                "model": (entry.get("model") or {}).get("weights_sha256"),
                "params": {k: v for k, v in params.items() if k not in _NOT_COMPARED}}

    want = same(e0, p0) | {"schema": shards[0][1].schema}
    at = 0
    for path, meta, entry, params, b in shards:
        got = same(entry, params) | {"schema": meta.schema}
        for key in want:
            if got[key] != want[key]:
                what = key
                if key == "params":
                    what = "option " + next(k for k in sorted({*want[key], *got[key]})
                                            if want[key].get(k) != got[key].get(k))
                raise InputError(f"dolm-merge: {path} differs from {first} in {what}")
        if int(b["start"]) != at or int(b["n_prompts"]) != int(b0["n_prompts"]):
            raise InputError(f"dolm-merge: {path} holds prompts {b['start']}..{b['stop']} of "
                             f"{b['n_prompts']}, expected the block from {at} of "
                             f"{b0['n_prompts']}")
        at = int(b["stop"])
    run.tool = str(e0.get("tool"))
    run.params = {k: v for k, v in p0.items() if k not in _NOT_COMPARED} | {
        "output": output, "executor": {"kind": "shard", "shards": n,
                                       "every_shard": [p for p, *_ in shards]}}
    merge_shards(run, [{"output": p} for p, *_ in shards], {"output": output}, force,
                 groups=tuple((p0.get("shard_merge") or {}).get("groups") or ()))
    return n


__all__ = ["EXECUTORS", "Prephase", "check_shard_set", "check_writable", "concat_h5", "drive_ray",
           "executor_options", "import_ray", "merge_by_hand", "merge_shards", "order_groups",
           "parse_shard", "shard_offset", "shard_range", "shard_rows", "shards_folder"]
