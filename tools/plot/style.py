"""One look for every dolm figure: sizes, fonts, colour maps, deterministic saving.

Figures are drawn on the Agg backend with constrained layout at a fixed size (never
``bbox_inches="tight"``), so an image's pixel size is known from its kind alone and the
same inputs give the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

DPI = 110
#: figure sizes in inches, by name; pixel size = inches * DPI
SIZES: dict[str, tuple[float, float]] = {
    "single": (8.0, 5.0),
    "wide": (12.0, 5.0),
    "tall": (8.0, 8.0),
    "square": (7.0, 7.0),
}
PANEL_WIDTH = 5.0  # inches per model panel in side-by-side comparisons
FORMATS = ("png", "svg", "pdf")

#: categorical colours (colour-blind safe: Okabe-Ito)
PALETTE = [
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#F0E442",
    "#000000",
]
ROLE_COLOURS = {
    "treatment": "#0072B2",
    "outcome": "#D55E00",
    "mediator": "#009E73",
    "confounder": "#E69F00",
    "instrument": "#CC79A7",
    "other": "#DDDDDD",
}
DIVERGING = "RdBu_r"
SEQUENTIAL = "viridis"

RC = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "figure.titlesize": 12,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "image.cmap": SEQUENTIAL,
    "svg.hashsalt": "dolm",
    "svg.fonttype": "path",
    "pdf.fonttype": 42,
    "path.simplify": True,
}


def setup() -> None:
    """Select the Agg backend and dolm's rc settings (call before drawing)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    matplotlib.rcParams.update(RC)
    matplotlib.rcParams["axes.prop_cycle"] = matplotlib.cycler(color=PALETTE)


def size_of(name: str | tuple[float, float]) -> tuple[float, float]:
    return SIZES[name] if isinstance(name, str) else (float(name[0]), float(name[1]))


def pixels(size: str | tuple[float, float]) -> tuple[int, int]:
    """(width, height) in pixels of a saved PNG of this size."""
    w, h = size_of(size)
    return round(w * DPI), round(h * DPI)


def new_figure(size: str | tuple[float, float]) -> Any:
    """An empty Figure (not managed by pyplot) with constrained layout."""
    from matplotlib.figure import Figure

    return Figure(figsize=size_of(size), dpi=DPI, layout="constrained")


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def signed_norm(values: Any) -> tuple[str, Any]:
    """(cmap, norm) for values: diverging centred at 0 when any value is negative,
    else sequential from 0 (or the minimum) to the maximum."""
    import numpy as np
    from matplotlib.colors import Normalize, TwoSlopeNorm

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return SEQUENTIAL, Normalize(0, 1)
    lo, hi = float(v.min()), float(v.max())
    if lo < 0:
        m = max(abs(lo), abs(hi)) or 1.0
        return DIVERGING, TwoSlopeNorm(vcenter=0.0, vmin=-m, vmax=m)
    if hi == lo:
        hi = lo + 1.0
    return SEQUENTIAL, Normalize(lo, hi)


def figure_bytes(fig: Any, fmt: str = "png") -> bytes:
    """Render to bytes deterministically (no dates in SVG/PDF metadata)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI, metadata=_metadata(fmt))
    return buf.getvalue()


def save(fig: Any, path: str | Path, fmt: str, force: bool) -> Path:
    """Write ``fig`` to ``path`` atomically (temporary name, then rename)."""
    from dolm.formats import atomic_path

    data = figure_bytes(fig, fmt)
    with atomic_path(path, force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def _metadata(fmt: str) -> dict[str, Any]:
    if fmt == "png":
        return {"Software": "dolm-plot"}
    if fmt == "svg":
        return {"Date": None, "Creator": "dolm-plot"}
    if fmt == "pdf":
        return {"CreationDate": None, "ModDate": None, "Creator": "dolm-plot", "Producer": None}
    return {}


def short(text: str, n: int = 40) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"
