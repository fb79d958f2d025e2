"""Per-prompt summaries of a patching grid (the ``patch_summary`` table)."""

from __future__ import annotations

import math

import numpy as np


def gini(values) -> float | None:
    """Gini coefficient of non-negative values (0 = equal, -> 1 = one cell has it all)."""
    x = np.sort(np.asarray(values, dtype=float))
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return None
    total = x.sum()
    if total <= 0:
        return 0.0
    idx = np.arange(1, n + 1)
    g = (2.0 * np.sum(idx * x)) / (n * total) - (n + 1.0) / n
    return float(min(max(g, 0.0), 1.0))


def top_k_share(values, k: int = 5) -> float | None:
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return None
    total = x.sum()
    if total <= 0:
        return 0.0
    return float(min(np.sort(x)[::-1][:k].sum() / total, 1.0))


def _num(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def choice_label(p, idx: int) -> str | None:
    """The text of prompt ``p``'s choice ``idx`` (choices, else target/foil)."""
    if p.choices:
        return p.choices[idx]
    if p.foil is not None:
        return [p.target, p.foil][idx]
    return p.target if idx == 0 else None


def summarise(prompts, o, templates, pld, ppr, pch, clean, corrupt, method):
    """One row per prompt x grid (site kind, window): ``prompts`` by index, ``o`` the
    patch options, ``pld``/``ppr``/``pch`` per template (logit diff, prob, choice logits),
    ``clean``/``corrupt`` per prompt (logit diff, prob, choice logits)."""
    primary = pld if o.metric == "logit_diff" else ppr
    by: dict[tuple, list[int]] = {}
    for ti, tp in enumerate(templates):
        by.setdefault((tp.prompt, tp.grid, tp.window), []).append(ti)
    rows = []
    for (g, grid, window), tis in by.items():
        p = prompts[g]
        c_ld, c_pr, c_ch = clean[g]
        x_ld, x_pr, x_ch = corrupt[g]
        c_val, x_val = (c_ld, x_ld) if o.metric == "logit_diff" else (c_pr, x_pr)
        denoise = o.direction == "denoise"
        base_val = x_val if denoise else c_val
        vals = primary[tis]
        effect = vals - base_val
        sign = np.sign(c_val - x_val) if denoise else np.sign(x_val - c_val)
        if not np.isfinite(sign) or sign == 0:
            sign = 1.0
        score = np.where(np.isfinite(effect), effect * sign, -np.inf)
        peak = int(np.argmax(score)) if len(score) else None
        den = c_val - x_val
        rec = (vals[peak] - x_val) / den if peak is not None and abs(den) > 1e-12 else None
        tp_peak = templates[tis[peak]] if peak is not None else None
        # choice flips
        if pch is not None:
            base_choice = int(np.argmax(x_ch if denoise else c_ch))
            flips = int(sum(int(np.argmax(pch[ti])) != base_choice for ti in tis))
        elif o.metric == "logit_diff":
            base_sign = np.sign(base_val)
            flips = int(np.sum(np.sign(vals) != base_sign))
        else:
            flips = None
        c_idx = int(np.argmax(c_ch))
        clean_choice = choice_label(p, c_idx)
        has_set = bool(p.choices) or p.foil is not None
        intended = p.intended if p.intended is not None else p.target
        if has_set:
            chose = clean_choice == intended
        else:
            chose = (c_idx == 0) if p.intended is None or p.intended == p.target else None
        absx = np.abs(effect)
        rows.append({
            "prompt_id": p.prompt_id,
            "grid": grid,
            "window": window if window and window > 1 else None,
            "kind": o.direction,
            "mode": o.mode,
            "method": method,
            "metric": o.metric,
            "clean_value": _num(c_val),
            "corrupt_value": _num(x_val),
            "n_cells": len(tis),
            "peak_layer": tp_peak.layer if tp_peak else None,
            "peak_position": tp_peak.position if tp_peak else None,
            "peak_head": tp_peak.head if tp_peak else None,
            "peak_value": _num(rec),
            "peak_effect": _num(effect[peak]) if peak is not None else None,
            "num_choice_flips": flips,
            "gini_coefficient": gini(absx),
            "top5_concentration": top_k_share(absx, 5),
            "clean_choice": clean_choice,
            "clean_chose_intended": chose,
        })
    return rows
