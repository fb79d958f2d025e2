"""Directions at model sites: difference of means, linear probes per site, PCA of paired
differences, or a vector from a file.

Activations are one vector per prompt and site: the last prompt token (``last``) or the
mean over the prompt's tokens (``mean``), computed with the model or read from a
``dolm-collect-acts`` activations file (rows with one ``position_label``).

Every direction is stored unit-norm (``normalisation: unit``); the raw norm, and the
mean and standard deviation of the training activations projected on the unit
direction (``proj_mean``, ``proj_std``: the natural scale of a steering strength), are
kept in the file's metadata.

Probes (the localisation step): one per site, scored by fitting on a training split and
predicting a held-out split (grouped by ``group_id`` when the prompts have groups, so
permutations of one multiset never straddle the split); the saved direction is the same
probe refitted on every prompt (scikit-learn's score-then-refit). ``logistic`` (scikit-learn
``LogisticRegression`` on standardised features) for a binary label, scored by accuracy
and ROC AUC; ``ridge`` (``Ridge`` on standardised features) for a continuous label such
as ``posterior_x``, scored by R^2 and Pearson r. A continuous label can instead be
binarised with ``--threshold T`` (label = value > T) for a logistic probe. The probe's
direction is its weight vector mapped back to activation space (coef / feature scale):
the direction along which the predicted label (its log-odds, or its value) grows.
Difference-of-means directions get the same held-out treatment (see :func:`diff_means`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
from dolm.errors import InputError

METHODS = ("diffmeans", "probe", "pca", "file")


@dataclass
class Fitted:
    """Directions per site and what is known about them."""

    directions: dict[str, np.ndarray]  # site -> unit vector (float32)
    norms: dict[str, float]
    proj_mean: dict[str, float] = field(default_factory=dict)
    proj_std: dict[str, float] = field(default_factory=dict)
    scores: list[dict] = field(default_factory=list)  # probe score rows
    best_site: str | None = None


def unit(v: np.ndarray, what: str) -> tuple[np.ndarray, float]:
    v = np.asarray(v, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        raise InputError(f"{what}: the direction is zero (the two sets have the same mean, "
                         "or the label does not vary)")
    return (v / norm).astype(np.float32), norm


def data_hash(prompt_ids, labels) -> str:
    """sha256 of the training rows: prompt ids and their labels, in order."""
    payload = json.dumps({"prompt_id": [str(p) for p in prompt_ids],
                          "label": [None if x is None else float(x) for x in labels]})
    return hashlib.sha256(payload.encode()).hexdigest()


def _proj_stats(fit: Fitted, site: str, acts: np.ndarray) -> None:
    proj = np.asarray(acts, dtype=np.float64) @ fit.directions[site].astype(np.float64)
    fit.proj_mean[site] = float(proj.mean())
    fit.proj_std[site] = float(proj.std())


# ------------------------------------------------------------------ methods


def diff_means(acts: dict[str, np.ndarray], pos: np.ndarray, groups=None,
               test_fraction: float = 0.25, seed: int = 0) -> Fitted:
    """mean(acts[pos]) - mean(acts[~pos]) per site over every prompt, unit-normalised.

    Held-out score (when there are at least 8 prompts, 2 per set): the direction from a
    training split, and the accuracy on the held-out split of classifying by the
    projection on it, thresholded midway between the two training means; the best site
    is the one with the highest held-out accuracy.
    """
    pos = np.asarray(pos, dtype=bool)
    if pos.all() or not pos.any():
        raise InputError("diffmeans: need prompts in both sets (positive and negative); found "
                         f"{int(pos.sum())} positive and {int((~pos).sum())} negative")
    fit = Fitted({}, {})
    split = None
    if len(pos) >= 8 and min(pos.sum(), (~pos).sum()) >= 2:
        split = split_rows(len(pos), groups, pos.astype(int), test_fraction, seed, True)
    best, best_score = None, -np.inf
    for site, x in acts.items():
        x = np.asarray(x, dtype=np.float64)
        fit.directions[site], fit.norms[site] = unit(x[pos].mean(0) - x[~pos].mean(0),
                                                     f"diffmeans at {site}")
        _proj_stats(fit, site, x)
        if split is None:
            continue
        tr, te = split
        ptr = pos[tr]
        if ptr.all() or not ptr.any():
            continue
        m1, m0 = x[tr][ptr].mean(0), x[tr][~ptr].mean(0)
        d = m1 - m0
        cut = 0.5 * (m1 + m0) @ d
        acc = float(((x[te] @ d > cut) == pos[te]).mean())
        fit.scores.append({"site": site, "metric": "accuracy", "value": acc,
                           "n_train": len(tr), "n_test": len(te)})
        if acc > best_score:
            best, best_score = site, acc
    fit.best_site = best
    return fit


def pca_pairs(acts: dict[str, np.ndarray], cf_acts: dict[str, np.ndarray]) -> Fitted:
    """First principal axis of the paired differences acts - cf_acts, uncentred (as with
    random pair-order flips), its sign chosen so the mean difference projects positively.
    ``proj_*`` are of the differences. Score: the variance share of the axis."""
    fit = Fitted({}, {})
    for site, x in acts.items():
        d = np.asarray(x, dtype=np.float64) - np.asarray(cf_acts[site], dtype=np.float64)
        if not np.isfinite(d).all() or not np.abs(d).sum():
            raise InputError(f"pca at {site}: the paired differences are all zero")
        _, s, vt = np.linalg.svd(d, full_matrices=False)
        v = vt[0]
        if float(d.mean(0) @ v) < 0:
            v = -v
        fit.directions[site], _ = unit(v, f"pca at {site}")
        fit.norms[site] = float(s[0] / np.sqrt(len(d)))
        _proj_stats(fit, site, d)
        fit.scores.append({"site": site, "metric": "explained_variance",
                           "value": float(s[0] ** 2 / (s ** 2).sum()), "n_train": len(d),
                           "n_test": 0})
    return fit


def split_rows(n: int, groups, y, test_fraction: float, seed: int, classify: bool):
    """Train/test row indices; grouped by ``groups`` when there are enough groups."""
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    idx = np.arange(n)
    if groups is not None:
        g = np.asarray([str(x) for x in groups])
        if len(set(g)) >= 4:
            gss = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
            tr, te = next(gss.split(idx, groups=g))
            if not classify or (len(set(y[tr])) == 2 and len(set(y[te])) >= 1):
                return tr, te
    strat = y if classify and min(np.bincount(y.astype(int))) >= 2 else None
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=strat)
    return tr, te


def probes(acts: dict[str, np.ndarray], y: np.ndarray, kind: str, groups=None,
           test_fraction: float = 0.25, seed: int = 0, c: float = 1.0) -> Fitted:
    """One probe per site; held-out scores; the best site by held-out accuracy / R^2."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import r2_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(y, dtype=np.float64)
    classify = kind == "logistic"
    if classify:
        vals = set(np.unique(y))
        if not vals <= {0.0, 1.0} or len(vals) < 2:
            raise InputError(f"--probe logistic: the label must take both values 0 and 1, "
                             f"found {sorted(vals)[:5]} (binarise a continuous label with "
                             "--threshold, or use --probe ridge)")
        y = y.astype(int)
    elif len(np.unique(y)) < 2:
        raise InputError("--probe ridge: the label does not vary")
    n = len(y)
    if n < 8:
        raise InputError(f"probe: {n} prompts is too few for a held-out split (need >= 8)")
    tr, te = split_rows(n, groups, y, test_fraction, seed, classify)
    fit = Fitted({}, {})
    best, best_score = None, -np.inf
    for site, x in acts.items():
        x = np.asarray(x, dtype=np.float64)
        if classify:
            model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
        else:
            model = make_pipeline(StandardScaler(), Ridge(alpha=1.0 / c))
        model.fit(x[tr], y[tr])
        pred = model.predict(x[te])
        rows = []
        if classify:
            acc = float((pred == y[te]).mean())
            rows.append(("accuracy", acc))
            rows.append(("train_accuracy", float((model.predict(x[tr]) == y[tr]).mean())))
            if len(set(y[te])) == 2:
                rows.append(("auc", float(roc_auc_score(y[te], model.decision_function(x[te])))))
            score = acc
        else:
            r2 = float(r2_score(y[te], pred))
            r = float(np.corrcoef(pred, y[te])[0, 1]) if np.std(pred) > 0 else float("nan")
            rows += [("r2", r2), ("pearson_r", r),
                     ("train_r2", float(r2_score(y[tr], model.predict(x[tr]))))]
            score = r2
        # the saved direction: the same probe refitted on every prompt
        from sklearn.base import clone

        full = clone(model).fit(x, y)
        scaler, est = full[0], full[-1]
        scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
        coef = np.ravel(est.coef_) / scale
        fit.directions[site], fit.norms[site] = unit(coef, f"probe at {site}")
        _proj_stats(fit, site, x)
        for metric, value in rows:
            fit.scores.append({"site": site, "metric": metric, "value": value,
                               "n_train": len(tr), "n_test": len(te)})
        if score > best_score:
            best, best_score = site, score
    fit.best_site = best
    return fit


def from_vector(vec: np.ndarray, site: str, width: int, path: str) -> Fitted:
    v = np.asarray(vec, dtype=np.float64).ravel()
    if v.shape[0] != width:
        raise InputError(f"--vector {path}: has {v.shape[0]} values, expected {width} (the "
                         f"width of {site})")
    fit = Fitted({}, {})
    fit.directions[site], fit.norms[site] = unit(v, f"--vector {path}")
    return fit


def read_vector(path: str) -> np.ndarray:
    """A vector from .npy, .pt/.pth, .safetensors (the only / first tensor) or text."""
    import os

    if not os.path.exists(path):
        raise InputError(f"--vector {path}: no such file")
    low = path.lower()
    try:
        if low.endswith(".npy"):
            return np.load(path)
        if low.endswith((".pt", ".pth")):
            import torch

            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = next(iter(obj.values()))
            return obj.float().numpy()
        if low.endswith(".safetensors"):
            from safetensors.numpy import load_file

            tensors = load_file(path)
            return next(iter(tensors.values()))
        return np.loadtxt(path, delimiter=None, ndmin=1)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's input
        raise InputError(f"--vector {path}: cannot read a vector ({type(exc).__name__}: "
                         f"{exc})") from None


# ------------------------------------------------------------------ activations


def model_acts(lm, texts: list[str], names: list[str], sites: list[str], position: str,
               batch_size="auto") -> dict[str, np.ndarray]:
    """(N, width) per site: the last token's activation or the mean over the prompt."""
    import torch
    from dolm.models.batching import iter_batched

    enc = lm.encode(texts, names=names, device="cpu")
    store: dict[str, list] = {s: [] for s in sites}

    @torch.no_grad()
    def fn(a: int, z: int):
        with lm.trace(read=sites) as tr:
            lm.model(input_ids=enc.input_ids[a:z].to(lm.device),
                     attention_mask=enc.attention_mask[a:z].to(lm.device), use_cache=False)
        out = {}
        rows = torch.arange(z - a)
        for s in sites:
            v = tr[s].float()
            if position == "last":
                out[s] = v[rows.to(v.device), enc.last_index[a:z].to(v.device)].cpu()
            else:
                m = enc.attention_mask[a:z].to(v.device)[..., None].float()
                out[s] = ((v * m).sum(1) / m.sum(1)).cpu()
        return out

    for _, _, res in iter_batched(len(texts), fn, batch_size, max_batch_size=64):
        for s, v in res.items():
            store[s].append(v)
    return {s: torch.cat(v).numpy().astype(np.float64) for s, v in store.items()}
