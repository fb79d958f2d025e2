"""The activations file (``schemas/activations``, HDF5): its coordinates and its reader.

One row per (prompt, position) kept by ``dolm-collect-acts``. The coordinate datasets
(:data:`COORDS`) say whose row it is; every other dataset is one site's activations, one
row per coordinate row ((rows, width)). ``dolm-collect-acts`` writes and merges these
files with these names, and the tools that read activations (``dolm-steer fit``) go
through :func:`site_datasets` and :func:`vectors_by_prompt`.
"""

from __future__ import annotations

import fnmatch

import numpy as np

from dolm.errors import InputError

#: the coordinate datasets, in the order they are written
COORDS = ("prompt_id", "prompt_index", "position", "position_label", "token_id")


def site_datasets(fh) -> list[str]:
    """The site datasets of an open activations file (every dataset but the coordinates)."""
    return [k for k in fh.keys() if k not in COORDS]


def match_sites(fh, patterns: str, path: str, option: str = "--sites") -> list[str]:
    """Comma-separated glob patterns -> the site datasets they name, in the order found
    (each pattern must match one; ``option`` names the option in the error)."""
    have = site_datasets(fh)
    out: list[str] = []
    for pat in [p.strip() for p in patterns.split(",") if p.strip()]:
        hit = [h for h in have if fnmatch.fnmatchcase(h, pat)]
        if not hit:
            raise InputError(f"{option} {pat}: {path} has no matching dataset (it has "
                             f"{', '.join(have) or 'none'})")
        out += [h for h in hit if h not in out]
    return out


def text_column(fh, name: str) -> np.ndarray:
    """A text coordinate (``prompt_id``, ``position_label``) as an object array of str."""
    return np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in fh[name][:]],
                      dtype=object)


def vectors_by_prompt(fh, path: str, prompt_ids: list[str], sites: list[str] | None,
                      label: str | None) -> tuple[dict[str, np.ndarray], list[str]]:
    """One row per prompt of ``prompt_ids`` (in that order), the row with position label
    ``label`` (None: the file's only label); returns (site -> (N, width) float64, the
    sites read; ``sites`` None: all). Errors name ``--acts``/``--acts-label``."""
    have = site_datasets(fh)
    if sites is None:
        sites = have
    missing = [s for s in sites if s not in have]
    if missing:
        raise InputError(f"--acts {path}: no dataset for site(s) {', '.join(missing)} (it has "
                         f"{', '.join(have) or 'none'})")
    pids = text_column(fh, "prompt_id")
    labels = text_column(fh, "position_label")
    kinds = sorted(set(labels))
    if label is None:
        if len(kinds) > 1:
            raise InputError(f"--acts {path}: rows have several position labels "
                             f"({', '.join(kinds)}); choose one with --acts-label")
        label = kinds[0] if kinds else "last"
    sel = labels == label
    if not sel.any():
        raise InputError(f"--acts-label {label}: {path} has no rows with this position label "
                         f"(it has {', '.join(kinds)})")
    row_of: dict[str, int] = {}
    for i in np.flatnonzero(sel):
        if pids[i] in row_of:
            raise InputError(f"--acts {path}: prompt {pids[i]} has several rows labelled "
                             f"{label!r} (one vector per prompt is needed; e.g. --positions "
                             "last in dolm-collect-acts)")
        row_of[pids[i]] = int(i)
    absent = [p for p in prompt_ids if p not in row_of]
    if absent:
        raise InputError(f"--acts {path}: no {label!r} row for prompt(s) "
                         f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
    idx = np.asarray([row_of[p] for p in prompt_ids])
    order = np.argsort(idx)
    out = {}
    for s in sites:
        try:
            data = fh[s][np.sort(idx)]  # h5py wants increasing indices
        except (OSError, RuntimeError) as exc:
            raise InputError(f"--acts {path}: dataset {s!r} cannot be read (a corrupt or "
                             f"truncated chunk): {exc}") from None
        back = np.empty_like(data)
        back[order] = data
        bad = np.flatnonzero(~np.isfinite(back).all(axis=1))
        if len(bad):
            raise InputError(f"--acts {path}: dataset {s!r} has NaN/inf activations for "
                             f"{len(bad)} prompt(s) (e.g. {prompt_ids[bad[0]]}); expected "
                             "finite numbers")
        out[s] = back.astype(np.float64)
    return out, sites
