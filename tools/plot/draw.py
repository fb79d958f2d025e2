"""Drawing planned figures: load files, plan, render, save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dolm.errors import InputError
from dolm_tools.plot import style
from dolm_tools.plot.registry import Plot, Source, label_sources, load_source, plan


def load_sources(paths: list[str] | tuple[str, ...], run: Any = None) -> list[Source]:
    sources = [load_source(str(p), run=run) for p in paths]
    label_sources(sources)
    return sources


def render(plot: Plot) -> Any:
    """Draw one planned figure; returns a matplotlib Figure."""
    style.setup()
    fig = style.new_figure(plot.size)
    plot.spec.draw(fig, plot.inputs, plot.variant)
    integer_ticks(fig)
    return fig


INTEGER_LABELS = ("layer", "head", "token position", "X draws", "prompts")


def integer_ticks(fig: Any) -> None:
    """Whole-number ticks on line/bar axes that count layers, heads, positions or draws."""
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.images:
            continue
        for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
            if label.startswith(INTEGER_LABELS) and "relative" not in label:
                axis.set_major_locator(MaxNLocator(integer=True))


def select(plots: list[Plot], only: tuple[str, ...] | list[str]) -> list[Plot]:
    """Keep the figures named in ``only`` (figure names, e.g. ``trace``); all when empty."""
    if not only:
        return plots
    names = {p.spec.name for p in plots}
    unknown = [o for o in only if o not in names]
    if unknown:
        raise InputError(
            f"--only {', '.join(unknown)}: no such figure for these files; "
            f"available: {', '.join(sorted(names)) or 'none'}"
        )
    return [p for p in plots if p.spec.name in only]


def draw_all(sources: list[Source], out_dir: str | Path, fmt: str, force: bool,
             only: tuple[str, ...] = (), compare_models: bool = True,
             progress: Any = None) -> list[Path]:
    """Plan, check outputs, draw and save every figure; return the written paths."""
    plots = select(plan(sources, compare_models=compare_models), only)
    if not plots:
        names = ", ".join(f"{s.path} ({s.schema})" for s in sources)
        raise InputError(f"no figure applies to {names}: the tables lack the columns the "
                         "figures need (see `dolm-plot list`)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out}: exists and is not a folder")
    targets = [out / p.filename(fmt) for p in plots]
    if not force:
        clash = [str(t) for t in targets if t.exists()]
        if clash:
            more = f" (and {len(clash) - 3} more)" if len(clash) > 3 else ""
            raise InputError(f"--output {out}: {', '.join(clash[:3])}{more} exist; "
                             "pass --force to overwrite")
    if not out.parent.exists():
        raise InputError(f"--output {out}: folder {out.parent} does not exist")
    out.mkdir(exist_ok=True)
    written = []
    it = progress(list(zip(plots, targets, strict=True))) if progress else zip(plots, targets,
                                                                                 strict=True)
    for plot, target in it:
        fig = render(plot)
        style.save(fig, target, fmt, force=True)
        written.append(target)
    return written
