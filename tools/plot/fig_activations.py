"""Figures for ``activations`` HDF5 files: activation norms by layer per site family."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import compare, figure, unique_labels

SITE_RE = re.compile(r"^(?P<fam>resid_pre|resid_mid|resid_post|attn_out|mlp_out)\.(?P<L>\d+)$")
BLOCK = 4096


def site_norms(path: str) -> dict[str, dict[int, tuple[float, float]]]:
    """family -> layer -> (mean, SD) of the rows' L2 norms, read block by block."""
    import h5py

    out: dict[str, dict[int, tuple[float, float]]] = {}
    with h5py.File(path, "r") as fh:
        for name in sorted(fh.keys()):
            m = SITE_RE.match(name)
            if not m:
                continue
            ds = fh[name]
            norms = []
            for i in range(0, ds.shape[0], BLOCK):
                block = np.asarray(ds[i : i + BLOCK], dtype=np.float64)
                norms.append(np.linalg.norm(block, axis=1))
            v = np.concatenate(norms) if norms else np.zeros(0)
            out.setdefault(m["fam"], {})[int(m["L"])] = (
                (float(v.mean()), float(v.std())) if v.size else (np.nan, np.nan))
    return out


def _has_sites(src: Any) -> bool:
    import h5py

    with h5py.File(src.data, "r") as fh:
        return any(SITE_RE.match(k) for k in fh.keys())


@figure("activations", "norms", "mean activation norm by layer per site family",
        when=_has_sites)
def draw_norms(fig: Any, src: Any, _v: Any) -> None:
    ax = fig.subplots()
    norms = site_norms(src.data)
    for i, (fam, by_layer) in enumerate(sorted(norms.items())):
        layers = sorted(by_layer)
        mean = np.array([by_layer[lay][0] for lay in layers])
        sd = np.array([by_layer[lay][1] for lay in layers])
        C.sem_band(ax, layers, mean, sd, style.colour(i), fam)
    ax.set_xlabel("layer")
    ax.set_ylabel("L2 norm of the activation (mean ± SD over rows)")
    ax.legend(frameon=False, title="site")
    C.title(fig, "Activation norms by layer", src.model_label)


@compare("activations", "norms", "residual-stream norms of several models overlaid",
         when=_has_sites)
def compare_norms(fig: Any, srcs: list, _v: Any) -> None:
    ax = fig.subplots()
    labels = unique_labels(srcs)
    for i, src in enumerate(srcs):
        norms = site_norms(src.data)
        fam = next((f for f in ("resid_post", "resid_pre", "resid_mid") if f in norms),
                   sorted(norms)[0])
        layers = sorted(norms[fam])
        mean = np.array([norms[fam][lay][0] for lay in layers])
        sd = np.array([norms[fam][lay][1] for lay in layers])
        C.sem_band(ax, layers, mean, sd, style.colour(i), f"{labels[i]} ({fam})")
    ax.set_xlabel("layer")
    ax.set_ylabel("L2 norm (mean ± SD over rows)")
    ax.legend(frameon=False)
    C.title(fig, "Activation norms by layer", labels)
