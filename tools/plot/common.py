"""Helpers the figure functions share: titles, aggregation over prompts, heatmaps, bars."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from dolm_tools.plot import style


def title(fig: Any, what: str, models: str | Sequence[str], key: str = "model") -> None:
    """Figure title: what is shown, and on which model(s) (``key="files"`` names files)."""
    if not isinstance(models, str):
        models = ", ".join(dict.fromkeys(models))
    fig.suptitle(f"{what}\n{key}: {style.short(models, 90)}")


def n_prompts(df: Any) -> int:
    return int(df["prompt_id"].nunique()) if "prompt_id" in df.columns else len(df)


def mean_sem(df: Any, by: list[str], value: str = "value") -> Any:
    """Mean, SEM and count of ``value`` over prompts per group (prompts averaged first)."""
    import pandas as pd

    d = df.dropna(subset=[value])
    if "prompt_id" in d.columns:
        d = d.groupby([*by, "prompt_id"], dropna=False)[value].mean().reset_index()
    g = d.groupby(by, dropna=False)[value]
    out = pd.DataFrame({"mean": g.mean(), "sem": g.sem(ddof=1), "n": g.count()}).reset_index()
    out["sem"] = out["sem"].fillna(0.0)
    return out


def site_family(site: Any) -> str:
    """``resid_pre.3`` -> ``resid_pre``; ``head.2.1`` -> ``head``; null -> ``''``."""
    if site is None or (isinstance(site, float) and np.isnan(site)):
        return ""
    return str(site).split(".")[0]


def heatmap(ax: Any, grid: Any, xlabels: Sequence, ylabels: Sequence, cmap: str, norm: Any,
            annotate: bool | None = None, fmt: str | None = None) -> Any:
    """Draw ``grid`` (rows = y) with layer 0 at the bottom; NaN cells are left blank.

    Cells are annotated with ``fmt``; by default with as many decimals as it takes to tell
    the grid's extremes apart (at most 4), so a grid of 0.019 to 0.041 does not read 0.02.
    """
    arr = np.ma.masked_invalid(np.asarray(grid, dtype=float))
    ax.set_facecolor("#EEEEEE")
    im = ax.imshow(arr, aspect="auto", origin="lower", cmap=cmap, norm=norm,
                   interpolation="nearest")
    _ticks(ax.set_xticks, ax.set_xticklabels, xlabels)
    _ticks(ax.set_yticks, ax.set_yticklabels, ylabels)
    ny, nx = arr.shape
    if annotate is None:
        annotate = nx * ny <= 144
    if annotate and fmt is None:
        fmt = f"{{:.{cell_decimals(arr.compressed())}f}}"
    if annotate:
        for i in range(ny):
            for j in range(nx):
                if arr.mask[i, j] if np.ndim(arr.mask) else False:
                    continue
                v = float(arr[i, j])
                rgba = im.cmap(im.norm(v))
                lum = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="black" if lum > 0.5 else "white")
    return im


def cell_decimals(values: Any, most: int = 4) -> int:
    """Decimals (2 to ``most``) that show the spread of ``values`` with two digits."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2 or v.max() == v.min():
        return 2
    return int(np.clip(1 - np.floor(np.log10(v.max() - v.min())), 2, most))


def _ticks(set_ticks: Any, set_labels: Any, labels: Sequence, max_ticks: int = 24) -> None:
    n = len(labels)
    step = max(1, int(np.ceil(n / max_ticks)))
    idx = list(range(0, n, step))
    set_ticks(idx)
    set_labels([str(labels[i]) for i in idx])


def pivot(agg: Any, index: str, columns: str, value: str = "mean") -> Any:
    """A full grid (sorted index x columns) with NaN where no data."""
    return agg.pivot_table(index=index, columns=columns, values=value, aggfunc="mean").sort_index(
        axis=0).sort_index(axis=1)


def sem_band(ax: Any, x: Any, mean: Any, sem: Any, colour: str, label: str, **kw: Any) -> None:
    x, mean, sem = (np.asarray(a, dtype=float) for a in (x, mean, sem))
    ax.plot(x, mean, marker="o", ms=3.5, color=colour, label=label, **kw)
    if np.any(sem > 0):
        ax.fill_between(x, mean - sem, mean + sem, color=colour, alpha=0.18, linewidth=0)


def mark_peak(ax: Any, x: Any, y: Any, colour: str = "black", text: str | None = None) -> int:
    """Mark the largest |y| with a star and a label; return its index."""
    y = np.asarray(y, dtype=float)
    if y.size == 0 or not np.isfinite(y).any():
        return -1
    i = int(np.nanargmax(np.abs(y)))
    ax.plot([x[i]], [y[i]], marker="*", ms=14, color=colour, markeredgecolor="white", zorder=5)
    if text != "":
        ax.annotate(text or f"peak {x[i]}", (x[i], y[i]), xytext=(6, 6),
                    textcoords="offset points", fontsize=8, color=colour)
    return i


def no_data(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def panel_grid(fig: Any, n: int, max_cols: int = 3, **kw: Any) -> list[Any]:
    """``n`` axes in rows of at most ``max_cols``; returns a flat list of exactly ``n`` axes."""
    cols = min(n, max_cols)
    rows = int(np.ceil(n / cols))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, **kw)).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def panels_size(n: int, height: float = 4.6, per: float = style.PANEL_WIDTH, max_cols: int = 3,
                extra: float = 0.8) -> tuple[float, float]:
    cols = min(max(n, 1), max_cols)
    rows = int(np.ceil(max(n, 1) / cols))
    return (per * cols + extra, height * rows + 0.6)


def metrics(df: Any) -> list[str]:
    """Metrics in a table, in order of first appearance."""
    return list(dict.fromkeys(df["metric"].astype(str))) if "metric" in df.columns else []


def has(df: Any, *cols: str) -> bool:
    return all(c in df.columns and df[c].notna().any() for c in cols)


def model_layers(src: Any, df: Any | None = None) -> int | None:
    """Number of layers of a source's model (provenance if recorded, else the data)."""
    m = src.model or {}
    for key in ("n_layers", "num_layers", "n_layer"):
        if m.get(key):
            return int(m[key])
    if df is not None and "layer" in df.columns and df["layer"].notna().any():
        return int(df["layer"].max()) + 1
    return None


def integer_axis(ax: Any, which: str = "x") -> None:
    """Integer ticks (layers, heads, positions)."""
    from matplotlib.ticker import MaxNLocator

    (ax.xaxis if which == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def how_many(srcs: Sequence[Any]) -> str:
    """``"3 models"`` when the files come from different models, else ``"3 files"``."""
    models = {s.model_label for s in srcs if s.model}
    return f"{len(srcs)} models" if len(models) == len(srcs) else f"{len(srcs)} files"


def legend_unique(ax: Any, **kw: Any) -> None:
    """A legend with one entry per label (artists drawn in a loop repeat their label)."""
    handles, names = ax.get_legend_handles_labels()
    seen = dict(zip(names, handles, strict=True))
    ax.legend(list(seen.values()), list(seen.keys()), frameon=False, fontsize=8, **kw)


def mean_ci(values: Any, level: float = 0.95) -> tuple[float, float, float, int]:
    """Mean and t interval of finite ``values``: (mean, low, high, n)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return (np.nan, np.nan, np.nan, 0)
    m = float(v.mean())
    if n < 2:
        return (m, np.nan, np.nan, n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / np.sqrt(n))
    return (m, m - half, m + half, n)


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float, float]:
    """A proportion and its Wilson score interval."""
    if n == 0:
        return (np.nan, np.nan, np.nan)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (p, mid - half, mid + half)
