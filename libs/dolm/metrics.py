"""Metrics of an intervention, read from next-token logits (shared by dolm-ablate,
dolm-steer, and offered to dolm-patch).

Per prompt, the metrics read the logits after the prompt's last token:

``logit_diff``
    logit(target) - logit(foil) (first tokens; the foil falls back to ``cf_target``
    when it differs from the target). Only for prompts with a foil.
``prob_target``
    P(target's first token) under the full next-token distribution.
``choice_prob_target``, ``accuracy``
    For choice tasks (``choices`` column; not the bayes family): P(target) renormalised
    over the choices' first tokens, and 1.0 when the target is the most probable choice.
``p_x``, ``mae_bayes``, ``order_drift``
    For the bayes family (a ``posterior_x`` column): ``p_x`` is the model's P(first
    symbol) renormalised over the two choices (" X" vs " Y", " A" vs " B" with the symbol
    swap); ``mae_bayes`` is ``|p_x - posterior_x|`` for the prompt, so its mean over
    the prompts of an evidence sweep is the mean absolute error to the exact Bayes
    posterior; ``order_drift`` is ``|p_x - mean p_x of the prompt's group|`` where a
    group (``group_id``) holds the orderings of one multiset of draws in one condition,
    so its mean is the mean absolute deviation across orderings (0 for an exchangeable,
    order-blind predictor such as Bayes). Groups of one prompt give no drift.

The token ids a prompt's metrics read are one row of an (N, K) matrix (:func:`ids_matrix`:
target, foil or target again, then the choices), and :func:`read_logits` reduces
(batch, vocab) logits to those K logits plus the log-sum-exp and the max, so every
metric is computed from (N, K + 2) float64 rows on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dolm.errors import InputError

BASIC_METRICS = ("logit_diff", "prob_target")
CHOICE_METRICS = ("choice_prob_target", "accuracy")
BAYES_METRICS = ("p_x", "mae_bayes", "order_drift")


@dataclass
class Targets:
    """What one prompt's metrics read: first-token ids of target, foil, choices, and the
    bayes truth when the prompt has one."""

    prompt_id: str
    target: str
    target_id: int
    foil_id: int | None = None
    choice_ids: list[int] | None = None
    target_choice: int | None = None  # index of the target among the choices
    posterior: float | None = None  # bayes: exact P(first symbol)
    group: str | None = None  # bayes: orderings of one multiset in one condition


def is_missing(v: object) -> bool:
    """None, a float NaN, pandas NA or NaT: an empty cell of a prompts table."""
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return type(v).__name__ in ("NAType", "NaTType")


def first_token(lm, s: str) -> int:
    """Id of the first token of ``s`` (no special tokens); -1 when it has none."""
    ids = lm.tokenizer(s, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else -1


def prompt_targets(df, lm, path: str) -> list[Targets]:
    """Rows of a prompts table -> :class:`Targets` (InputError naming prompt/column)."""
    for col in ("prompt_id", "prompt", "target"):
        if col not in df.columns:
            raise InputError(f"{path}: missing column {col!r}")
    cols = set(df.columns)
    bayes = "posterior_x" in cols
    out = []
    for row in df.to_dict("records"):
        pid = str(row["prompt_id"])
        target = row.get("target")
        if is_missing(target) or target == "":
            raise InputError(f"{path}: prompt {pid}: column 'target' is empty; the metrics "
                             "need a target continuation")
        target = str(target)
        tid = first_token(lm, target)
        if tid < 0:
            raise InputError(f"{path}: prompt {pid}: target {target!r} has no tokens")
        foil = row.get("foil") if "foil" in cols else None
        if is_missing(foil) and "cf_target" in cols and not is_missing(row.get("cf_target")):
            foil = row["cf_target"] if str(row["cf_target"]) != target else None
        fid = None
        if not is_missing(foil) and str(foil):
            fid = first_token(lm, str(foil))
            if fid == tid:
                fid = None
        cids, tchoice = None, None
        choices = row.get("choices") if "choices" in cols else None
        if choices is not None and not (isinstance(choices, float) and math.isnan(choices)):
            choices = [str(c) for c in list(choices)]
            if choices:
                try:
                    cids = lm.choice_token_ids(choices, first_token=True)
                except InputError as exc:
                    raise InputError(f"{path}: prompt {pid}: column 'choices': {exc}") from None
                tchoice = choices.index(target) if target in choices else None
        post, group = None, None
        if bayes and not is_missing(row.get("posterior_x")):
            post = float(row["posterior_x"])
            if cids is None or len(cids) != 2:
                raise InputError(f"{path}: prompt {pid}: a bayes prompt (posterior_x) needs "
                                 "two choices (first symbol, second symbol)")
            g = row.get("group_id") if "group_id" in cols else None
            group = None if is_missing(g) else str(g)
        out.append(Targets(pid, target, tid, fid, cids, tchoice, post, group))
    return out


def ids_matrix(targets: list[Targets]) -> np.ndarray:
    """(N, K) token ids: target, foil (or target), choices, padded with the target."""
    k = 2 + max((len(t.choice_ids or []) for t in targets), default=0)
    ids = np.zeros((len(targets), k), dtype=np.int64)
    for i, t in enumerate(targets):
        row = [t.target_id, t.foil_id if t.foil_id is not None else t.target_id]
        row += list(t.choice_ids or [])
        ids[i] = row + [t.target_id] * (k - len(row))
    return ids


def read_logits(logits, ids):
    """(B, V) logits -> (B, K + 2) float64 on the CPU: logits at ``ids``, logsumexp, max."""
    import torch

    lf = logits.float()
    got = lf.gather(1, ids.to(lf.device))
    lse = torch.logsumexp(lf, dim=-1, keepdim=True)
    mx = lf.max(dim=-1, keepdim=True).values
    return torch.cat([got, lse, mx], dim=1).double().cpu()


def logit_diff(read: np.ndarray) -> np.ndarray:
    """Target logit minus foil logit of :func:`read_logits` rows (R, K + 2)."""
    return read[:, 0] - read[:, 1]


def prob_target(read: np.ndarray) -> np.ndarray:
    """Softmax probability of the target from :func:`read_logits` rows (R, K + 2)."""
    return np.exp(read[:, 0] - read[:, read.shape[1] - 2])


def prompt_metrics(read: np.ndarray, t: Targets) -> dict[str, np.ndarray]:
    """Per-row metrics of one prompt from its read rows (R, K + 2) (R variants).

    ``order_drift`` is not here (it needs the prompt's group: :func:`add_order_drift`).
    """
    read = np.asarray(read, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    if t.foil_id is not None:
        out["logit_diff"] = logit_diff(read)
    out["prob_target"] = prob_target(read)
    if t.choice_ids:
        ch = read[:, 2:2 + len(t.choice_ids)]
        ch = ch - ch.max(axis=1, keepdims=True)
        p = np.exp(ch)
        p /= p.sum(axis=1, keepdims=True)
        if t.posterior is not None:
            out["p_x"] = p[:, 0]
            out["mae_bayes"] = np.abs(p[:, 0] - t.posterior)
        elif t.target_choice is not None:
            out["choice_prob_target"] = p[:, t.target_choice]
            out["accuracy"] = (p.argmax(axis=1) == t.target_choice).astype(float)
    return out


def order_drift(p: np.ndarray, groups: list) -> np.ndarray:
    """``|p - mean of p over the row's group|``; NaN for rows without a group or alone in it."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    by: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if g is not None:
            by.setdefault(g, []).append(i)
    for rows in by.values():
        if len(rows) < 2:
            continue
        r = np.asarray(rows)
        out[r] = np.abs(p[r] - p[r].mean())
    return out


def metrics_table(read: np.ndarray, targets: list[Targets]) -> dict[str, np.ndarray]:
    """Metrics of N prompts under one intervention: name -> (N,) (NaN where undefined).

    ``read``: (N, K + 2) rows in the order of ``targets``.
    """
    n = len(targets)
    cols: dict[str, np.ndarray] = {}
    for i, t in enumerate(targets):
        for name, v in prompt_metrics(read[i:i + 1], t).items():
            cols.setdefault(name, np.full(n, np.nan))[i] = v[0]
    if "p_x" in cols:
        groups = [t.group if t.posterior is not None else None for t in targets]
        drift = order_drift(np.nan_to_num(cols["p_x"], nan=0.0), groups)
        if np.isfinite(drift).any():
            cols["order_drift"] = drift
    return cols


def metric_order(names) -> list[str]:
    """Metric names in a stable, readable order."""
    order = BASIC_METRICS + CHOICE_METRICS + BAYES_METRICS
    known = [m for m in order if m in names]
    return known + sorted(m for m in names if m not in order)


def effect_frames(prompt_ids, values: dict, clean: dict, fields: dict,
                  extra: dict | None = None) -> list:
    """Effects rows of one intervention, one DataFrame per metric (the order of
    :func:`metric_order`): ``prompt_id``, ``metric``, ``value``, ``clean_value`` per prompt
    whose value is finite, and the intervention's ``fields`` (constant columns). ``extra``:
    per-prompt columns (arrays over all prompts, e.g. generations). Build the table with
    ``dolm.formats.frame(pd.concat(frames), "effects")``."""
    import pandas as pd

    pids = np.asarray(prompt_ids, dtype=object)
    out = []
    for m in metric_order(clean):
        if m not in values:
            continue
        v = np.asarray(values[m])
        keep = np.isfinite(v)
        if not keep.any():
            continue
        d = pd.DataFrame({"prompt_id": pids[keep], "metric": m, "value": v[keep],
                          "clean_value": np.asarray(clean[m])[keep]})
        for k, val in fields.items():
            d[k] = [val] * len(d)
        for k, arr in (extra or {}).items():
            d[k] = np.asarray(arr, dtype=object)[keep]
        out.append(d)
    return out


def select_prompts(df, where: str | None, limit: int | None, path: str):
    """Rows of a prompts table matching ``--where`` (a safe filter over its columns, see
    :mod:`dolm.where`), then the first ``--limit``; InputError naming the option when
    nothing is left."""
    if where:
        from dolm.where import filter_rows

        df = filter_rows(df, where)
        if len(df) == 0:
            raise InputError(f"--where {where!r}: no prompt of {path} matches")
    if limit is not None:
        df = df.iloc[:limit]
    if len(df) == 0:
        raise InputError(f"{path}: no prompts")
    return df.reset_index(drop=True)
