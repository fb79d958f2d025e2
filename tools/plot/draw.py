"""Drawing planned figures: load files, plan, render, save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dolm.errors import InputError
from dolm.formats import atomic_path
from dolm_tools.plot import style
from dolm_tools.plot.registry import Plot, Source, label_sources, load_source, plan


def load_sources(paths: list[str] | tuple[str, ...], run: Any = None) -> list[Source]:
    sources = [load_source(str(p), run=run) for p in paths]
    label_sources(sources)
    return sources


class DegenerateFigure(InputError):
    """A figure that would show nothing: a line plot over one x value, an axis with no data.

    dolm-plot refuses to draw it (exit 3 when the user asked for exactly that figure); the
    report skips it and says why.
    """

    def __init__(self, plot: Plot, reason: str) -> None:
        self.plot = plot
        self.reason = reason
        super().__init__(f"figure {plot.stem!r} ({plot.spec.name}) not drawn: {reason}")


def render(plot: Plot) -> Any:
    """Draw one planned figure; returns a matplotlib Figure.

    Raises ``DegenerateFigure`` when the drawing would show nothing (see ``degenerate``).
    """
    style.setup()
    fig = style.new_figure(plot.size)
    plot.spec.draw(fig, plot.inputs, plot.variant)
    reason = degenerate(fig)
    if reason:
        raise DegenerateFigure(plot, reason)
    integer_ticks(fig)
    return fig


def _data_lines(ax: Any) -> list:
    """Lines drawn in data coordinates (not axhline/axvline, which span the axes)."""
    return [ln for ln in ax.lines if ln.get_transform() is ax.transData]


def _has_data(ax: Any) -> bool:
    import numpy as np

    if ax.images or ax.patches or ax.tables:
        return True
    for c in ax.collections:
        offs = c.get_offsets() if hasattr(c, "get_offsets") else []
        if len(offs) or (hasattr(c, "get_paths") and c.get_paths()):
            return True
    for ln in _data_lines(ax):
        x, y = (np.asarray(v, dtype=float) for v in ln.get_data())
        if np.isfinite(x).any() and np.isfinite(y).any():
            return True
    return False


def degenerate(fig: Any) -> str | None:
    """Why ``fig`` shows nothing worth a figure (None when it is fine).

    An axis (panel) with no data, or a line plot whose lines together take a single x value
    (e.g. a per-layer curve of effects that all sit at one layer).
    """
    import numpy as np

    for ax in fig.axes:
        if not ax.get_visible() or hasattr(ax, "_colorbar"):
            continue
        title = ax.get_title()
        if not _has_data(ax):
            return f"panel {title!r} has no data" if title else "an axis with no data"
        name = f"panel {title!r} is " if title else ""
        lines = _data_lines(ax)
        if lines and not (ax.patches or ax.images):
            xs: set[float] = set()
            for ln in lines:
                x, y = (np.asarray(v, dtype=float) for v in ln.get_data())
                xs.update(x[np.isfinite(x) & np.isfinite(y)].tolist())
            for c in ax.collections:  # scatter points count; fill_between bands follow lines
                if type(c).__name__ == "PathCollection":
                    xs.update(np.asarray(c.get_offsets(), dtype=float)[:, 0].tolist())
            label = ax.get_xlabel() or "x"
            if len(xs) == 1:
                return (f"{name}a line plot with a single {label} value "
                        f"({next(iter(xs)):g}): no curve to show")
    return None


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
             progress: Any = None, on_skip: Any = None) -> list[Path]:
    """Plan, check outputs, draw and save every figure; return the written paths.

    A degenerate figure (see ``degenerate``) is skipped, with ``on_skip(DegenerateFigure)``
    called, unless it was asked for by name in ``only``: then nothing is written and the
    ``DegenerateFigure`` error (exit 3) says why.
    """
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
    pairs = list(zip(plots, targets, strict=True))
    drawn: list[tuple[Any, Path]] = []
    skipped: list[DegenerateFigure] = []
    for plot, target in (progress(pairs) if progress else pairs):
        try:
            drawn.append((style.figure_bytes(render(plot), fmt), target))
        except DegenerateFigure as exc:
            if only:  # asked for by name: refuse before anything is written
                raise
            skipped.append(exc)
            if on_skip:
                on_skip(exc)
    if not drawn:
        raise InputError("no figure drawn: every figure for these files is degenerate: "
                         + "; ".join(str(e) for e in skipped[:3]))
    out.mkdir(exist_ok=True)
    written = []
    for data, target in drawn:
        with atomic_path(target, True) as tmp:
            tmp.write_bytes(data)
        written.append(target)
    return written
