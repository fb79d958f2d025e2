"""The command-line frame every dolm tool shares.

``@tool("name")`` turns a function into the ``dolm-<name>`` click command with dolm's
conventions (DESIGN.md): errors a user can cause exit 3 with a message naming the file,
column or option; click usage errors exit 2; unexpected failures exit 1 with one line
(``DOLM_DEBUG=1`` shows the traceback); a closed stdout pipe ends the tool quietly.
Outputs are checked for ``--force`` before any work starts.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import click

from dolm.errors import DolmError, InputError

# --------------------------------------------------------------- error handling


def _fail(prog: str, message: str, code: int, hard: bool = False) -> None:
    click.echo(f"{prog}: error: {message}", err=True)
    if hard:  # see DolmRuntimeError.hard_exit
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


class _DolmErrors:
    """Mixin for click commands/groups: map exceptions to dolm's exit codes."""

    def main(self, args: Any = None, prog_name: str | None = None, **kw: Any) -> Any:
        prog = prog_name or getattr(self, "name", None) or "dolm"
        kw.pop("standalone_mode", None)
        try:
            rv = super().main(args=args, prog_name=prog, standalone_mode=False, **kw)  # type: ignore[misc]
            sys.exit(rv if isinstance(rv, int) else 0)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            _fail(prog, "aborted", 130)
        except click.MissingParameter as exc:
            exc.show()
            sys.exit(2)
        except click.BadParameter as exc:
            # a value a user gave that dolm cannot use: invalid input, exit 3
            _fail(prog, exc.format_message(), 3)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except DolmError as exc:
            if os.environ.get("DOLM_DEBUG"):
                traceback.print_exc()
            _fail(prog, str(exc), exc.exit_code, bool(getattr(exc, "hard_exit", False)))
        except BrokenPipeError:
            # downstream closed the pipe (e.g. `| head`): end quietly
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except OSError:
                pass
            sys.exit(0)
        except KeyboardInterrupt:
            _fail(prog, "interrupted", 130)
        except SystemExit:
            raise
        except Exception as exc:  # noqa: BLE001 - the last resort, reported in one line
            if os.environ.get("DOLM_DEBUG"):
                traceback.print_exc()
            hint = "" if os.environ.get("DOLM_DEBUG") else " (set DOLM_DEBUG=1 for a traceback)"
            _fail(prog, f"unexpected failure: {type(exc).__name__}: {exc}{hint}", 1)


class DolmCommand(_DolmErrors, click.Command):
    """A click command with dolm's error handling."""


class DolmGroup(_DolmErrors, click.Group):
    """A click group (tool with subcommands) with dolm's error handling."""


class DefaultCommandGroup(DolmGroup):
    """A :class:`DolmGroup` that runs a default subcommand when none is named.

    When the first argument is neither a subcommand name nor ``-h``/``--help``, the
    arguments are parsed as if ``default_command`` came first: ``dolm-lens PROMPTS ...``
    is ``dolm-lens run PROMPTS ...``. With no arguments at all nothing is inserted.
    Pass ``default_command`` (default ``"run"``) through ``click.group(cls=..., ...)``.
    """

    def __init__(self, *args: Any, default_command: str = "run", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
"""click ``context_settings`` shared by every dolm command: ``-h`` for help, 100 columns."""


def tool(name: str, outputs: tuple[str, ...] = ("output",)) -> Callable[[Callable], click.Command]:
    """Decorator: make ``f(run, ...)`` the ``dolm-<name>`` command.

    ``run`` (a :class:`dolm.formats.Run`) collects provenance. Keyword arguments named in
    ``outputs`` are output paths checked against ``--force`` before ``f`` runs.
    """

    def deco(f: Callable) -> click.Command:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return _invoke(name, outputs, f, args, kwargs)

        return click.command(
            name=f"dolm-{name}", cls=DolmCommand, context_settings=CONTEXT_SETTINGS
        )(wrapper)

    return deco


def _invoke(name: str, outputs: tuple[str, ...], f: Callable, args: Any, kwargs: Any) -> Any:
    from dolm.formats import Run, check_output

    run = Run(tool=name, seed=kwargs.get("seed"))
    run.params = {k: v for k, v in kwargs.items() if k != "model_opts"}
    if "model_opts" in kwargs and kwargs["model_opts"] is not None:
        run.params["model_opts"] = asdict(kwargs["model_opts"])
    from dolm.formats.lock import output_locks

    force = bool(kwargs.get("force", False))
    named = [("--" + key.replace("_", "-"), kwargs.get(key)) for key in outputs]
    named = [(opt, str(value)) for opt, value in named if value]
    for opt, value in named:
        check_output(value, force, option=opt)
    with output_locks(named, run):
        for opt, value in named:  # a run that held the lock may have finished meanwhile
            check_output(value, force, option=opt)
        return f(run, *args, **kwargs)


def tool_group(name: str) -> Callable[[Callable], click.Group]:
    """Decorator for a tool with subcommands (``dolm-<name> SUB ...``)."""

    def deco(f: Callable) -> click.Group:
        return click.group(name=f"dolm-{name}", cls=DolmGroup, context_settings=CONTEXT_SETTINGS)(f)

    return deco


def subcommand(
    group: click.Group, name: str, tool_name: str, outputs: tuple[str, ...] = ("output",)
) -> Callable[[Callable], click.Command]:
    """Decorator: register ``f(run, ...)`` as subcommand ``name`` of a tool group."""

    def deco(f: Callable) -> click.Command:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return _invoke(tool_name, outputs, f, args, kwargs)

        return group.command(name=name, context_settings=CONTEXT_SETTINGS)(wrapper)

    return deco


# --------------------------------------------------------------- common options


def _add_options(options: list[Callable]) -> Callable[[Callable], Callable]:
    def deco(f: Callable) -> Callable:
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


def output_option(
    f: Callable | None = None, *, required: bool = True, help: str | None = None
) -> Any:
    """``-o/--output PATH`` (``-`` = stdout where the format allows) and ``--force``."""

    def deco(g: Callable) -> Callable:
        return _add_options(
            [
                click.option(
                    "-o",
                    "--output",
                    required=required,
                    type=click.Path(dir_okay=False, allow_dash=True),
                    help=help or "Output file ('-' for stdout where the format allows).",
                ),
                click.option("--force", is_flag=True, help="Overwrite existing outputs."),
            ]
        )(g)

    return deco(f) if f is not None else deco


def prompt_selection_options(example: str | None = None) -> Callable[[Callable], Callable]:
    """``--where QUERY`` and ``--limit N``: which prompts of the table a tool runs on
    (applied by :func:`dolm.metrics.select_prompts`). ``example``: a query for the help."""
    where_help = ("Keep only the prompts matching this filter over the prompts columns: "
                  "comparisons (== != < <= > >= in, not in [..]) joined with and/or/not")
    where_help += f", e.g. {example}." if example else "."
    return _add_options([
        click.option("--where", default=None, help=where_help),
        click.option("--limit", type=click.IntRange(min=1), default=None,
                     help="Use only the first N prompts (after --where)."),
    ])


def seed_option(f: Callable) -> Callable:
    """``--seed INT`` (default 0): same inputs + seed = same output."""
    return click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")(f)


@dataclass
class ModelOptions:
    """The model options every model-loading tool shares (DESIGN.md)."""

    model: str = "toy"
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    batch_size: int | str = "auto"
    trust_remote_code: bool = False


def _batch_size(ctx: Any, param: Any, value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(
            f"expected a positive integer or 'auto', found {value!r}"
        ) from None
    if n < 1:
        raise click.BadParameter(f"expected a positive integer or 'auto', found {value!r}")
    return n


_MODEL_KEYS = [f for f in ModelOptions.__dataclass_fields__]


def model_options(f: Callable) -> Callable:
    """Add the shared model options; the function receives them as ``model_opts``."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opts = ModelOptions(**{k: kwargs.pop(k) for k in _MODEL_KEYS})
        return f(*args, model_opts=opts, **kwargs)

    return _add_options(
        [
            click.option(
                "--model",
                default="toy",
                show_default=True,
                help="Model: 'toy' (the embedded model), a local folder, or a hub id.",
            ),
            click.option("--revision", default=None, help="Hub revision (branch, tag or commit)."),
            click.option(
                "--dtype",
                default="auto",
                show_default=True,
                type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
                help="Weights dtype.",
            ),
            click.option(
                "--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto."
            ),
            click.option(
                "--device-map",
                default=None,
                type=click.Choice(["auto"]),
                help="Spread the model over devices with accelerate.",
            ),
            click.option("--load-in-4bit", is_flag=True, help="4-bit weights (bitsandbytes)."),
            click.option("--load-in-8bit", is_flag=True, help="8-bit weights (bitsandbytes)."),
            click.option(
                "--batch-size",
                default="auto",
                show_default=True,
                callback=_batch_size,
                help="Prompts per forward pass; 'auto' halves on out-of-memory.",
            ),
            click.option(
                "--trust-remote-code",
                is_flag=True,
                help="Allow the model's own code (off by default).",
            ),
        ]
    )(wrapper)


MODEL_CACHE: dict[tuple, Any] | None = None
"""Models kept loaded between runs in one process (a Ray worker of :mod:`dolm.executor`
sets it to a dict); None: every run loads its model."""


def load_model(opts: ModelOptions, run: Any = None) -> Any:
    """Load the model named by the shared options and record it in ``run``'s provenance."""
    from dolm.models import load

    key = tuple(v for k, v in asdict(opts).items() if k != "batch_size")
    if MODEL_CACHE is not None and key in MODEL_CACHE:
        lm = MODEL_CACHE[key]
        if run is not None:
            run.set_model(lm.info)
        return lm
    check_device(opts.device)
    try:
        lm = load(
            opts.model,
            revision=opts.revision,
            dtype=opts.dtype,
            device=opts.device,
            device_map=opts.device_map,
            load_in_4bit=opts.load_in_4bit,
            load_in_8bit=opts.load_in_8bit,
            trust_remote_code=opts.trust_remote_code,
        )
    except Exception as exc:
        if "safetensor" not in type(exc).__name__.lower():
            raise
        raise InputError(f"--model {opts.model}: its weights (safetensors) cannot be read, "
                         f"truncated or corrupt: {exc}") from None
    if MODEL_CACHE is not None:
        MODEL_CACHE[key] = lm
    if run is not None:
        run.set_model(lm.info)
    return lm


def check_device(device: str | None, option: str = "--device") -> None:
    """Refuse a device this machine's torch cannot use (``cuda`` on a CPU-only build)."""
    if not device or device == "auto":
        return
    import torch

    kind, _, index = str(device).partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no visible GPU"
            raise InputError(f"{option} {device}: CUDA is not available here (torch "
                             f"{torch.__version__}, {build}); use --device cpu or auto")
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise InputError(f"{option} {device}: expected cuda:N with N below "
                             f"{torch.cuda.device_count()} (the GPUs visible here)")
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError(f"{option} {device}: Apple MPS is not available here; use "
                             "--device cpu or auto")
    else:
        try:
            torch.device(str(device))
        except RuntimeError:
            raise InputError(f"{option} {device}: expected cpu, cuda, cuda:N, mps or "
                             "auto") from None


def check_model_match(
    meta: Any, lm: Any, allow_mismatch: bool, option: str = "--allow-model-mismatch"
) -> None:
    """Refuse a file produced on another model (weights hash differs) unless allowed."""
    recorded = meta.model_entry() if meta is not None else None
    if not recorded or allow_mismatch:
        return
    want = recorded.get("weights_sha256")
    have = lm.info.get("weights_sha256")
    if want and have and want != have:
        raise InputError(
            f"{meta.path}: was made with model {recorded.get('spec')!r} "
            f"(weights {want[:12]}), but the model given is {lm.info.get('spec')!r} "
            f"(weights {have[:12]}); pass {option} to use it anyway"
        )


def check_same_prompts(
    meta: Any, prompts: str, prompts_sha256: str | None, allow: bool,
    option: str = "--allow-other-prompts",
) -> None:
    """Refuse to join a file made from another prompts table (its recorded
    ``prompts_sha256`` differs from the prompts file given) unless allowed.

    Prompt ids survive regenerating prompts with another seed; the rows do not.
    """
    recorded = (getattr(meta, "extra", None) or {}).get("prompts_sha256")
    if allow or not recorded or not prompts_sha256 or recorded == prompts_sha256:
        return
    raise InputError(
        f"{meta.path}: was made from another prompts table than {prompts} (prompts "
        f"sha256 {recorded[:12]} recorded, {prompts_sha256[:12]} given): its rows would be "
        f"joined to the wrong prompts by prompt_id; pass {option} to join them anyway"
    )


def input_sha256(run: Any, path: str) -> str | None:
    """The sha256 ``run`` recorded for the input ``path`` (the latest one read)."""
    for entry in reversed(getattr(run, "inputs", [])):
        if entry.get("path") == str(path):
            return entry.get("sha256")
    return None


# --------------------------------------------------------------- helpers


def progress(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    **kw: Any,
) -> Any:
    """A tqdm progress bar on stderr; silent when stderr is not a terminal.

    ``DOLM_PROGRESS=1`` forces it on, ``DOLM_PROGRESS=0`` off.
    """
    from tqdm.auto import tqdm

    env = os.environ.get("DOLM_PROGRESS")
    disable = (not sys.stderr.isatty()) if env is None else env == "0"
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=disable,
        dynamic_ncols=True,
        **kw,
    )


def log(message: str) -> None:
    """One line of talk on stderr (data goes to stdout/files)."""
    click.echo(message, err=True)


def _parse_list(value: str, option: str, cast: Callable[[str], Any], kind: str,
                expected: str | None = None) -> list:
    out = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(cast(part))
        except ValueError:
            raise InputError(
                f"{option}: expected {expected or f'comma-separated {kind}s'}, found {part!r}"
            ) from None
    if not out:
        raise InputError(f"{option}: expected at least one {kind}")
    return out


def parse_float_list(value: str, option: str) -> list[float]:
    """``"0,0.5,1"`` -> [0.0, 0.5, 1.0]; anything not a number is an error naming the option."""
    return _parse_list(value, option, float, "number")


def parse_int_list(value: str, option: str, expected: str | None = None) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; anything not an integer is an error naming the option
    (and ``expected``, what the option accepts, where given)."""
    return _parse_list(value, option, int, "integer", expected)
