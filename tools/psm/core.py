"""dolm-psm's statistics core: plain functions from prepared units to result tables.

``run_psm(units, options)`` returns :class:`PSMResult` with three pandas tables (pairs,
balance, units) and the summary dict; the CLI only reads, calls and writes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from dolm.errors import InputError
from dolm.formats import json_safe
from dolm_tools.psm import REFUTE_MAX_UNITS
from dolm_tools.psm import balance as bal
from dolm_tools.psm import effects as eff
from dolm_tools.psm import estimators as est_mod
from dolm_tools.psm import sensitivity as sens
from dolm_tools.psm.data import Units
from dolm_tools.psm.matching import common_support, match
from dolm_tools.psm.propensity import fit_propensity, logit

ESTIMANDS = ("ATT", "ATC", "ATE")  # ATO too with --method ipw


@dataclass
class Options:
    method: str = "logistic"  # logistic | gbm
    ratio: int = 1
    replace: bool = False
    caliper: float | None = 0.2  # SDs of the logit propensity; None = no caliper
    common_support: str = "both"  # none | both | treated | control
    estimands: tuple[str, ...] = ESTIMANDS
    se: str = "ai"  # ai | bootstrap
    n_boot: int = 1000
    seed: int = 0
    refute: bool = True
    refute_sims: int = 50
    refute_max_units: int = REFUTE_MAX_UNITS  # larger contrasts: refuters on a subsample; 0 = all
    positivity_eps: float = 0.01
    distance: str = "logit"  # ps | logit | mahalanobis | robust-mahalanobis
    m_order: str | None = None  # largest | smallest | random | data; None = MatchIt's default
    ties: str = "canonical"  # canonical (row-order free) | all | data (MatchIt) | matchit-4.5.1
    exact: tuple[str, ...] = ()  # columns matched exactly
    mahvars: tuple[str, ...] = ()  # Mahalanobis on these within the propensity caliper
    caliper_on: tuple[tuple[str, float], ...] = ()  # (column, SDs of the column)
    pool_short: str = "replace"  # replace | subset | refuse: pool smaller than ratio x focal
    match_method: str = "nearest"  # nearest | optimal | full | exact | cem | subclass
    n_subclass: int = 6
    max_pairs: int = 10_000_000  # optimal/full: budget of the dense distance matrix
    estimator: str = "diff"  # diff | bias-corrected (Abadie-Imbens 2011) | regression
    stabilize: bool = False  # ipw: stabilised ATE weights
    trim: float = 0.0  # ipw: drop propensity outside [trim, 1 - trim]
    learner: str = "linear"  # aipw: linear | gbm
    folds: int = 5  # aipw cross-fitting folds
    balance_terms: tuple[str, ...] = ()  # squares | interactions: extra balance rows


STRATA_METHODS = ("exact", "cem", "subclass")
WEIGHTING_METHODS = ("ipw", "aipw")


@dataclass
class PSMResult:
    pairs: pd.DataFrame
    balance: pd.DataFrame
    units: pd.DataFrame
    summary: dict[str, Any]


@dataclass
class Matched:
    """Propensity, trimming and matches of one binary contrast (unit-local indices)."""

    ps: np.ndarray
    lg: np.ndarray
    keep: np.ndarray
    caliper_width: float | None
    sd_logit: float
    pairs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    unmatched: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    direction_info: dict[str, Any] = field(default_factory=dict)
    subclass: np.ndarray | None = None  # exact / cem / subclass: subclass per unit, -1 none


def model_matrix(X: np.ndarray, names: list[str], drop: list[bool]) -> tuple[np.ndarray, list[str]]:
    """Columns for the propensity model: no reference levels, no constant columns."""
    cols = [j for j in range(X.shape[1]) if not drop[j] and np.ptp(X[:, j]) > 0]
    return X[:, cols], [names[j] for j in cols]


def default_m_order(opt: Options, direction: str) -> str:
    """MatchIt's default: data order for a pure Mahalanobis distance, else the largest
    distance first for the ATT and the smallest first for the ATC."""
    if opt.m_order is not None:
        return opt.m_order
    if opt.distance in ("mahalanobis", "robust-mahalanobis"):
        return "data"
    return "largest" if direction == "ATT" else "smallest"


@dataclass
class Extra:
    """What MatchIt-style options need beyond the propensity model (contrast-local rows)."""

    data_rank: np.ndarray  # input row order (MatchIt's data order)
    X_all: np.ndarray | None = None  # every covariate, all levels (Mahalanobis distance)
    X_mah: np.ndarray | None = None  # --mahvars design
    strata: np.ndarray | None = None  # --exact stratum codes
    strata_names: list[str] | None = None
    cal_cols: np.ndarray | None = None  # --caliper-on columns (n, c)
    label: str = ""
    cov_frame: pd.DataFrame | None = None  # raw covariate columns (exact / cem)


def match_contrast(
    X: np.ndarray, names: list[str], t: np.ndarray, rank: np.ndarray, opt: Options,
    directions: tuple[str, ...], extra: Extra | None = None,
) -> Matched:
    from dolm_tools.psm import nearest

    ps, info = fit_propensity(X, t, names, opt.method, opt.seed)
    lg = logit(ps)
    keep = common_support(ps, t, "none" if opt.match_method in WEIGHTING_METHODS
                          else opt.common_support)
    scalar = ps if opt.distance == "ps" else lg
    # the caliper is in SDs of the distance over the kept units, as MatchIt computes it
    sd = float(np.std(scalar[keep], ddof=1)) if keep.sum() > 1 else 0.0
    width = None if opt.caliper is None else opt.caliper * sd
    m = Matched(ps=ps, lg=lg, keep=keep, caliper_width=width, sd_logit=sd, info=info)
    ex = extra or Extra(data_rank=rank)
    data_ties = opt.ties in ("data", "matchit-4.5.1")
    tie_rank = ex.data_rank if data_ties else rank
    Z = None
    if opt.distance in ("mahalanobis", "robust-mahalanobis") or opt.mahvars:
        base = ex.X_mah if opt.mahvars else ex.X_all
        Z = nearest.mahalanobis_transform(base, t, keep,
                                          robust=opt.distance == "robust-mahalanobis")
    cal_w = None
    if ex.cal_cols is not None and opt.caliper_on:
        cal_w = np.array([c * np.std(ex.cal_cols[keep, j], ddof=1)
                          for j, (_, c) in enumerate(opt.caliper_on)])
    if opt.match_method in WEIGHTING_METHODS:
        return m
    if opt.match_method in STRATA_METHODS:
        from dolm_tools.psm import strata as st

        if opt.match_method == "subclass":
            est = "ATE" if "ATE" in opt.estimands or len(opt.estimands) > 1 else opt.estimands[0]
            m.subclass = st.subclass_strata(ps, t, keep, opt.n_subclass, est)
        else:
            fn = st.exact_strata if opt.match_method == "exact" else st.cem_strata
            sub = np.full(len(t), -1, dtype=np.int64)
            sub[keep] = fn(ex.cov_frame.iloc[np.flatnonzero(keep)],
                           list(ex.cov_frame.columns), t[keep])
            m.subclass = sub
        if not np.any(m.subclass >= 0):
            raise InputError(
                f"--method {opt.match_method}: no stratum of contrast {ex.label!r} holds both "
                "treated and control units; coarsen or drop covariates")
        return m
    tr_all = np.flatnonzero((t == 1) & keep)
    co_all = np.flatnonzero((t == 0) & keep)
    strata = ex.strata if ex.strata is not None else np.zeros(len(t), dtype=np.int64)
    rng = np.random.default_rng([opt.seed, 23])
    for dname in directions:
        focal_all, pool_all = (tr_all, co_all) if dname == "ATT" else (co_all, tr_all)
        replace = opt.replace
        reason = None
        if not replace and len(focal_all) * opt.ratio > len(pool_all):
            who, other = ("treated", "control") if dname == "ATT" else ("control", "treated")
            reason = (f"{len(focal_all)} {who} units x ratio {opt.ratio} > {len(pool_all)} "
                      f"{other} units: without replacement only some {who} units could be "
                      f"matched, which estimates the effect for a subset, not the {dname}")
            if opt.pool_short == "refuse":
                raise InputError(
                    f"contrast {ex.label!r}: {reason}; pass --replace, or --pool-short "
                    "replace (match this direction with replacement) or subset (MatchIt's "
                    "behaviour)")
            if opt.pool_short == "replace":
                replace = True
        e = np.zeros(0, dtype=np.int64)
        fs, ps_, ds, unmatched = [e], [e], [np.zeros(0)], [e]
        for s in np.unique(strata[focal_all]):
            focal = focal_all[strata[focal_all] == s]
            pool = pool_all[strata[pool_all] == s]
            if ex.strata is not None and len(pool) == 0:
                who, other = ("treated", "control") if dname == "ATT" else ("control", "treated")
                raise InputError(
                    f"--exact {','.join(opt.exact)}: stratum {ex.strata_names[s]} of contrast "
                    f"{ex.label!r} has {len(focal)} {who} and no {other} units (after "
                    f"--discard {opt.common_support}), so its {who} units cannot be matched "
                    f"for the {dname}; coarsen or drop an --exact column, or leave out "
                    f"the {dname}")
            plain = (opt.match_method not in ("optimal", "full") and Z is None
                     and not data_ties and cal_w is None
                     and default_m_order(opt, dname) != "random")  # (keeps rng's stream)
            # with replacement the plain matcher ignores the visiting order: skip its sort
            order = None if plain and replace else nearest.focal_order(
                scalar[focal], tie_rank[focal], default_m_order(opt, dname), rng)
            cf = ex.cal_cols[focal] if cal_w is not None else None
            cp = ex.cal_cols[pool] if cal_w is not None else None
            if opt.match_method in ("optimal", "full"):
                res = _optimal(opt, dname, scalar, focal, pool, width, Z)
            elif Z is not None:
                res = nearest.match_matrix(
                    Z[focal], Z[pool], tie_rank[pool], order, opt.ratio, replace,
                    width if (opt.mahvars or opt.caliper is not None) else None,
                    scalar[focal], scalar[pool], cf, cp, cal_w)
            elif data_ties or cal_w is not None:
                res = nearest.match_scalar(scalar[focal], scalar[pool], tie_rank[focal],
                                           tie_rank[pool], order, opt.ratio, replace, width,
                                           cf, cp, cal_w, matchit451=opt.ties == "matchit-4.5.1")
            else:
                res = match(scalar[focal], scalar[pool], rank[focal], rank[pool], opt.ratio,
                            replace, width, order=order, all_ties=opt.ties == "all" and replace)
            fs.append(focal[res.focal])
            ps_.append(pool[res.pool])
            ds.append(res.distance)
            unmatched.append(focal[res.unmatched])
        m.pairs[dname] = (np.concatenate(fs), np.concatenate(ps_), np.concatenate(ds))
        m.unmatched[dname] = np.concatenate(unmatched)
        m.direction_info[dname] = {
            "m_order": default_m_order(opt, dname), "replace": replace,
            "pool_short": reason,
        } if opt.match_method == "nearest" else {"pool_short": reason}
    return m


def _optimal(opt: Options, dname: str, scalar, focal, pool, width, Z):
    """Optimal pair (1:k) or full matching of one stratum, as nearest's Matches."""
    from dolm_tools.psm import optimal as om
    from dolm_tools.psm.matching import Matches

    om._check_budget(len(focal), len(pool), opt.max_pairs, opt.match_method)
    zf, zp = (Z[focal], Z[pool]) if Z is not None else (None, None)
    D = om.distance_matrix(scalar[focal], scalar[pool], width, zf, zp)
    if opt.match_method == "optimal":
        f, p = om.optimal_pairs(D, opt.ratio)
    else:
        f, p = om.full_matching(D)  # symmetric: the same sets for either direction
    got = np.zeros(len(focal), dtype=bool)
    got[f] = True
    o = np.lexsort((p, f))
    return Matches(f[o], p[o], D[f[o], p[o]], np.flatnonzero(~got))


def balance_terms(X: np.ndarray, D, terms: tuple[str, ...]) -> list[tuple]:
    """Balance columns (name, values, binary, kind) for squares and pairwise interactions
    of the encoded covariates (cobalt's poly = 2 and int = TRUE); constant products (two
    levels of one categorical) are left out."""
    out = []
    p = X.shape[1]
    if "squares" in terms:
        out += [(f"{D.names[j]}^2", X[:, j] ** 2, False, "continuous")
                for j in range(p) if not D.binary[j]]
    if "interactions" in terms:
        for a in range(p):
            for b in range(a + 1, p):
                if D.source[a] == D.source[b]:
                    continue
                v = X[:, a] * X[:, b]
                if np.ptp(v) == 0:
                    continue
                both = D.binary[a] and D.binary[b]
                out.append((f"{D.names[a]}*{D.names[b]}", v, both,
                            "binary" if both else "continuous"))
    return out


def _directions(estimands: tuple[str, ...]) -> tuple[str, ...]:
    need = set()
    for e in estimands:
        if e == "ATO":
            continue
        need |= {"ATT", "ATC"} if e == "ATE" else {e}
    return tuple(d for d in ("ATT", "ATC") if d in need)


def point_estimate(X, names, t, y, rank, opt: Options, estimand: str) -> float:
    """The matching estimate alone (used by DoWhy's refuters)."""
    dirs = _directions((estimand,))
    # refuters re-run the propensity matching only: no exact strata, Mahalanobis parts or
    # covariate calipers (they would need the extra columns of every resampled table)
    simple = dataclasses.replace(
        opt, exact=(), mahvars=(), caliper_on=(),
        distance=opt.distance if opt.distance in ("ps", "logit") else "logit")
    extra = None
    if opt.match_method in ("exact", "cem"):  # strata on the refuter's (encoded) columns
        extra = Extra(data_rank=rank, cov_frame=pd.DataFrame(X, columns=list(names)))
    m = match_contrast(X, names, t, rank, simple, dirs, extra)
    if opt.match_method == "ipw":
        return float(est_mod.ipw(y, t, X, estimand, stabilize=opt.stabilize,
                                 trim=opt.trim)["estimate"])
    if opt.match_method == "aipw":
        return float(est_mod.aipw(y, t, X, estimand, folds=opt.folds, learner=opt.learner,
                                  seed=opt.seed)["estimate"])
    if m.subclass is not None:
        from dolm_tools.psm.strata import subclass_weights

        w = subclass_weights(m.subclass, t, estimand)
        return float(est_mod.wls_effect(y, t, w, X=X if opt.estimator == "regression" else None,
                                        target=estimand, cluster=None)["estimate"])
    sets = []
    for dname in dirs:
        pf, pm, _ = m.pairs[dname]
        if len(pf):
            s = eff.set_diffs(y, pf, pm, dname == "ATT")
            if opt.estimator == "bias-corrected":  # the run's own estimator, not the plain one
                s = eff.bias_correct(s, X, y, dname == "ATT")
            sets.append(s)
    if not sets:
        return float("nan")
    if opt.estimator == "regression":
        return float(est_mod.wls_effect(y, t, _weights(len(t), sets), X=X, target=estimand,
                                        cluster=None)["estimate"])
    return float(np.concatenate([s.d for s in sets]).mean())


def _weights(n: int, sets: list[eff.SetDiffs]) -> np.ndarray:
    w = np.zeros(n)
    for s in sets:
        w[s.focal] += 1.0
        w += np.bincount(s.pair_match, weights=1.0 / s.size[s.pair_focal], minlength=n)
    return w


def _fmt(v: Any) -> str:
    return str(v)


def _extra(units: Units, sel: np.ndarray, rows: np.ndarray, label: str, opt: Options) -> Extra:
    from dolm_tools.psm.data import encode_covariates

    df = units.df.iloc[sel]
    ex = Extra(data_rank=rows.astype(np.int64), label=label)
    if opt.distance in ("mahalanobis", "robust-mahalanobis"):
        ex.X_all = units.design.X[sel]
    if opt.mahvars:
        ex.X_mah = encode_covariates(df, list(opt.mahvars)).X
    if opt.exact:
        from dolm_tools.psm.strata import _key

        ex.strata = _key(df[list(opt.exact)]).to_numpy()
        first = np.unique(ex.strata, return_index=True)[1]
        names = ", ".join(opt.exact)
        vals = df[list(opt.exact)].astype(str).to_numpy()
        ex.strata_names = [f"({names}) = ({', '.join(vals[i])})" for i in first]
    if opt.caliper_on:
        ex.cal_cols = np.column_stack([df[c].to_numpy(dtype=float) for c, _ in opt.caliper_on])
    if opt.match_method in ("exact", "cem"):
        ex.cov_frame = df[list(units.covariates)]
    return ex


_POP = {"ATT": "treated", "ATC": "control", "ATE": "all",
        "ATO": "overlap (weights e(1 - e))"}


def _clusters(n: int, use: list[eff.SetDiffs]) -> np.ndarray | None:
    """Matched-set id per unit, or None when a unit belongs to several sets (with
    replacement, or the ATE's two directions): then HC1 instead of clusters."""
    cl = np.full(n, -1, dtype=np.int64)
    count = np.zeros(n, dtype=np.int64)
    off = 0
    for s in use:
        ids = off + np.arange(len(s.focal))
        cl[s.focal] = ids
        count[s.focal] += 1
        cl[s.pair_match] = ids[s.pair_focal]
        np.add.at(count, s.pair_match, 1)
        off += len(s.focal)
    return None if count.max(initial=0) > 1 else cl


def _population(est: str, sets: dict, t: np.ndarray, m: Matched) -> dict[str, Any]:
    """Who the estimate is about: the estimand's population and how much of it was matched
    (a focal unit without a match, discarded or outside the caliper, is not covered)."""
    group = {"ATT": "treated", "ATC": "control", "ATE": "all"}[est]
    pop = {"ATT": t == 1, "ATC": t == 0, "ATE": np.ones(len(t), dtype=bool)}[est]
    covered = sum(len(sets[d].focal) for d in _directions((est,)))
    n_pop = int(pop.sum())
    return {"population": group, "n_population": n_pop, "n_focal_matched": int(covered),
            "population_covered": covered / n_pop if n_pop else 0.0}


@dataclass
class Contrast:
    """One treatment level against the reference: its units, outcome and design."""

    label: str
    level: Any
    sel: np.ndarray  # rows of units.df in this contrast
    t: np.ndarray  # 1 = treated (the level), 0 = control (the reference)
    y: np.ndarray
    rows: np.ndarray  # input row numbers
    ids: np.ndarray | None
    rank: np.ndarray  # canonical order
    X_all: np.ndarray  # every encoded covariate
    X_model: np.ndarray  # the propensity model's columns
    model_names: list[str]

    @property
    def n(self) -> int:
        return len(self.t)


@dataclass
class Estimates:
    """Effects per estimand with their sensitivity, and each estimand's unit weights."""

    effects: list[dict]
    sensitivity: dict[str, Any]
    weights: dict[str, np.ndarray]


@dataclass
class Balance:
    rows: list[dict]
    flagged: dict[str, dict[str, list[str]]]
    counts: dict[str, dict]


def _contrast(units: Units, level: Any) -> Contrast:
    """Select the contrast's units; refuse one with nothing to match on or too few units."""
    df = units.df
    tcol = df[units.treatment]
    sel = np.flatnonzero(((tcol == level) | (tcol == units.reference)).to_numpy())
    label = f"{_fmt(level)} vs {_fmt(units.reference)}"
    t = (tcol.to_numpy()[sel] == level).astype(int)
    D = units.design
    Xall = D.X[sel]
    Xm, mnames = model_matrix(Xall, D.names, D.drop_for_model)
    if Xm.shape[1] == 0:
        raise InputError(
            f"--covariates: every covariate is constant within contrast {label!r}; nothing "
            "to match on"
        )
    n1, n0 = int(t.sum()), int((1 - t).sum())
    if n1 < 2 or n0 < 2:
        raise InputError(
            f"--treatment {units.treatment!r}: contrast {label!r} has {n1} treated and {n0} "
            "control units; expected at least 2 of each"
        )
    return Contrast(
        label=label, level=level, sel=sel, t=t,
        y=df[units.outcome].to_numpy(dtype=float)[sel],
        rows=df["_row"].to_numpy()[sel],
        ids=df[units.id_column].astype(str).to_numpy()[sel] if units.id_column else None,
        rank=sel.astype(np.int64), X_all=Xall, X_model=Xm, model_names=mnames)


def _positivity(c: Contrast, m: Matched, opt: Options) -> dict[str, Any]:
    """Discarded and extreme-score units; refuse a contrast that trimming emptied."""
    t = c.t
    n1, n0 = int(t.sum()), int((1 - t).sum())
    out1 = int(np.sum((t == 1) & ~m.keep))
    out0 = int(np.sum((t == 0) & ~m.keep))
    eps = opt.positivity_eps
    positivity = {
        "common_support": opt.common_support,
        "discarded_treated": out1,
        "discarded_control": out0,
        "extreme_ps_treated": int(np.sum((t == 1) & ((m.ps < eps) | (m.ps > 1 - eps)))),
        "extreme_ps_control": int(np.sum((t == 0) & ((m.ps < eps) | (m.ps > 1 - eps)))),
        "extreme_threshold": eps,
        "ps_range_treated": [float(m.ps[t == 1].min()), float(m.ps[t == 1].max())],
        "ps_range_control": [float(m.ps[t == 0].min()), float(m.ps[t == 0].max())],
    }
    kept1, kept0 = int(np.sum((t == 1) & m.keep)), int(np.sum((t == 0) & m.keep))
    if kept1 == 0 or kept0 == 0:
        raise InputError(
            f"contrast {c.label!r}: no common support: trimming by the propensity score "
            f"({opt.common_support}) discarded {out1} of {n1} treated and {out0} of {n0} control "
            "units, leaving no units to match (a positivity failure: the covariates separate "
            "the groups)"
        )
    if out1 or out0 or positivity["extreme_ps_treated"] or positivity["extreme_ps_control"]:
        positivity["warning"] = (
            f"positivity: {out1} treated and {out0} control units lie outside the common "
            f"support; {positivity['extreme_ps_treated']} treated and "
            f"{positivity['extreme_ps_control']} control units have propensity < {eps} or "
            f"> {1 - eps}"
        )
    return positivity


def _matched_sets(c: Contrast, m: Matched, opt: Options,
                  dirs: tuple[str, ...]) -> dict[str, eff.SetDiffs]:
    """The matched sets of each direction (ATT: treated focal, ATC: control focal)."""
    sets: dict[str, eff.SetDiffs] = {}
    for dname in dirs:
        pf, pm, _ = m.pairs[dname]
        if len(pf) == 0:
            who = "treated" if dname == "ATT" else "control"
            raise InputError(
                f"contrast {c.label!r}: no {who} unit has a match within the caliper "
                f"({opt.caliper} SD of the distance = {m.caliper_width or 0:.4g}) and the "
                "other restrictions (--exact, --caliper-on); widen them or check the overlap"
            )
        sets[dname] = eff.set_diffs(c.y, pf, pm, dname == "ATT")
    return sets


def _estimate_one(c: Contrast, m: Matched, sets: dict[str, eff.SetDiffs], opt: Options,
                  est: str, sigma2, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """One estimand's effect (the --method's estimator) and the unit weights behind it."""
    y, t, n, Xm = c.y, c.t, c.n, c.X_model
    if opt.match_method in WEIGHTING_METHODS:
        w = est_mod.ipw_weights(np.clip(m.ps, 1e-6, 1 - 1e-6), t, est, opt.stabilize)
        if opt.match_method == "ipw":
            r = est_mod.ipw(y, t, Xm, est, stabilize=opt.stabilize, trim=opt.trim)
        else:
            r = est_mod.aipw(y, t, Xm, est, folds=opt.folds, learner=opt.learner,
                             seed=opt.seed)
        pop = {"ATT": t == 1, "ATC": t == 0}.get(est, np.ones(n, dtype=bool))
        r = {"estimand": est, **r, "population": _POP[est], "n_population": int(pop.sum()),
             "n_focal_matched": int(r["n_sets"]),
             "population_covered": float(r["n_sets"]) / n}
    elif m.subclass is not None:
        from dolm_tools.psm.strata import subclass_weights

        w = subclass_weights(m.subclass, t, est)
        # robust (HC1), not clustered: a handful of subclasses is too few clusters
        # (CR1 on 6 subclasses covered 84% in benchmarks/psm_coverage.py)
        r = est_mod.wls_effect(y, t, w, X=Xm if opt.estimator == "regression" else None,
                               target=est, cluster=None)
        pop = {"ATT": t == 1, "ATC": t == 0}.get(est, np.ones(n, dtype=bool))
        cov = int(np.sum(pop & (w > 0)))
        r = {"estimand": est, **r, "population": _POP[est], "n_population": int(pop.sum()),
             "n_focal_matched": cov, "population_covered": cov / max(int(pop.sum()), 1)}
    else:
        use = [sets[d] for d in _directions((est,))]
        w = _weights(n, use)
        if opt.estimator == "regression":
            r = est_mod.wls_effect(y, t, w, X=Xm, target=est, cluster=_clusters(n, use))
            r["n_sets"] = int(sum(len(u.focal) for u in use))
        else:
            if opt.estimator == "bias-corrected":
                use = [eff.bias_correct(sets[d], Xm, y, d == "ATT")
                       for d in _directions((est,))]
            r = eff.estimate(use, n, sigma2, opt.se, opt.n_boot, rng)
            if opt.estimator == "bias-corrected":
                r["se_method"] += "; Abadie-Imbens (2011) regression bias correction"
        r = {"estimand": est, **r, **_population(est, sets, t, m)}
    return r, w


def _estimates(c: Contrast, m: Matched, sets: dict[str, eff.SetDiffs], opt: Options,
               outcome_binary: bool) -> Estimates:
    """Every estimand's effect with its E-value (and Rosenbaum bounds for matched ATT/ATC),
    then the naive difference."""
    y, t = c.y, c.t
    rng = np.random.default_rng([opt.seed, 17])
    sigma2 = None
    if opt.se == "ai" and m.subclass is None:
        def sigma2(need: np.ndarray, _lg=m.lg) -> np.ndarray:
            return eff.cond_var(_lg, y, t, need=need)
    effects = []
    sensitivity: dict[str, Any] = {}
    sd_y = float(np.std(y, ddof=1))
    weights: dict[str, np.ndarray] = {}
    for est in opt.estimands:
        r, w = _estimate_one(c, m, sets, opt, est, sigma2, rng)
        effects.append(r)
        weights[est] = w
        p0 = bal.wmean(y[t == 0], w[t == 0]) if np.any(w[t == 0] > 0) else float("nan")
        s: dict[str, Any] = {
            "e_value": sens.e_value(r["estimate"], r["ci_low"], r["ci_high"],
                                    outcome_binary, p0, sd_y)
        }
        if est in ("ATT", "ATC") and est in sets:
            s["rosenbaum"] = sens.rosenbaum(sets[est].d)
        sensitivity[est] = s
    effects.append({"estimand": "naive", **eff.naive(y, t)})
    return Estimates(effects, sensitivity, weights)


def _balance(c: Contrast, m: Matched, weights: dict[str, np.ndarray], opt: Options,
             D) -> Balance:
    """MatchIt's summary shape: per estimand x covariate, before (all units) and after
    (the estimand's weights), with cobalt's flags and the sample sizes."""
    t, n, Xall = c.t, c.n, c.X_all
    bal_rows = []
    cols = [("distance", m.ps, False, "distance")] + [
        (nm, Xall[:, j], D.binary[j], "binary" if D.binary[j] else "continuous")
        for j, nm in enumerate(D.names)
    ]
    cols += balance_terms(Xall, D, opt.balance_terms)
    ones = np.ones(n)
    counts = {}
    flagged: dict[str, dict[str, list[str]]] = {}
    orders: dict[int, bal.SortedColumn | None] = {}
    sds: dict[int, tuple[float, float]] = {}
    before: dict[int, dict] = {}
    for est in opt.estimands:
        w = weights[est]
        for j, (name, x, binary, kind) in enumerate(cols):
            if j not in orders:  # sorted once per column, reused by every estimand
                orders[j] = None if binary else bal.SortedColumn.of(x, t)
                sds[j] = bal.group_sds(x, t)
            sd = bal.scale_from(*sds[j], est)
            for sample, ww in (("all", ones), ("matched", w)):
                if sample == "all":  # the same for every estimand but the SMD's scale
                    if j not in before:
                        before[j] = bal.balance_row(x, t, ww, binary, 1.0, orders[j])
                    row = dict(before[j])
                    diff = row["mean_treated"] - row["mean_control"]
                    row["smd"] = float(diff / sd) if sd and np.isfinite(sd) and sd > 0 else (
                        0.0 if diff == 0 else float("nan"))
                else:
                    row = bal.balance_row(x, t, ww, binary, sd, orders[j])
                bal_rows.append({
                    "contrast": c.label, "estimand": est, "variable": name, "type": kind,
                    "sample": sample, **row, **bal.flags(row, kind),
                })
        after = [r for r in bal_rows if r["estimand"] == est and r["sample"] == "matched"]
        flagged[est] = {
            "smd_over_0.1": [r["variable"] for r in after if r["smd_flag"]],
            "var_ratio_outside_0.5_2": [r["variable"] for r in after if r["var_ratio_flag"]],
        }
        cnt = {}
        for g, gname in ((0, "control"), (1, "treated")):
            mg = t == g
            cnt[gname] = {
                "all": int(mg.sum()),
                "matched_ess": bal.ess(w[mg]),
                "matched": int(np.sum(mg & (w > 0))),
                "unmatched": int(np.sum(mg & m.keep & (w == 0))),
                "discarded": int(np.sum(mg & ~m.keep)),
            }
        counts[est] = cnt
    return Balance(bal_rows, flagged, counts)


def _pair_rows(c: Contrast, m: Matched, sets: dict[str, eff.SetDiffs],
               dirs: tuple[str, ...]) -> list[pd.DataFrame]:
    """One row per (focal, match) pair of each direction."""
    pair_rows = []
    rows, ids, y = c.rows, c.ids, c.y
    for dname in dirs:
        pf, pm, dist = m.pairs[dname]
        s = sets[dname]
        tr, co = (pf, pm) if dname == "ATT" else (pm, pf)
        set_id = np.searchsorted(s.focal, pf)
        pair_rows.append(pd.DataFrame({
            "contrast": c.label,
            "estimand": dname,
            "set_id": set_id.astype(np.int64),
            "treated_row": rows[tr].astype(np.int64),
            "control_row": rows[co].astype(np.int64),
            "treated_id": ids[tr] if ids is not None else None,
            "control_id": ids[co] if ids is not None else None,
            "treated_ps": m.ps[tr],
            "control_ps": m.ps[co],
            "distance": dist,
            "weight": 1.0 / s.size[set_id],
            "treated_outcome": y[tr],
            "control_outcome": y[co],
        }))
    return pair_rows


def _unit_frame(c: Contrast, units: Units, m: Matched, weights: dict[str, np.ndarray],
                D) -> pd.DataFrame:
    """Per unit: propensity, discarded, each estimand's weight, subclass, covariates."""
    n = c.n
    tcol = units.df[units.treatment]
    return pd.DataFrame({
        "contrast": c.label,
        "row": c.rows.astype(np.int64),
        "id": c.ids if c.ids is not None else None,
        "level": tcol.iloc[c.sel].astype(str).to_numpy(),
        "treated": c.t.astype(bool),
        "propensity": m.ps,
        "logit_propensity": m.lg,
        "discarded": ~m.keep,
        "weight_att": weights.get("ATT", np.full(n, np.nan)),
        "weight_atc": weights.get("ATC", np.full(n, np.nan)),
        "weight_ate": weights.get("ATE", np.full(n, np.nan)),
        **({"weight_ato": weights["ATO"]} if "ATO" in weights else {}),
        "subclass": pd.array([int(v) if v >= 0 else None for v in m.subclass]
                             if m.subclass is not None else [None] * n, dtype="Int64"),
        # the covariates as the balance table names them, for per-covariate distributions
        **{f"x.{nm}": c.X_all[:, j] for j, nm in enumerate(D.names)},
    })


def _matching_info(opt: Options, m: Matched) -> dict[str, Any]:
    return {
        "method": opt.match_method,
        "estimator": opt.estimator,
        "n_subclass": int(m.subclass.max() + 1) if m.subclass is not None else None,
        "distance": _DISTANCE[opt.distance] + (
            f"; Mahalanobis on {', '.join(opt.mahvars)} within the caliper"
            if opt.mahvars else ""),
        "ratio": opt.ratio,
        "replace": opt.replace,
        "ties": opt.ties,
        "exact": list(opt.exact),
        "directions": m.direction_info,
        "caliper_sd": opt.caliper,
        "caliper_width": m.caliper_width,
        "sd_distance": m.sd_logit,
        "caliper_on": {c: w for c, w in opt.caliper_on},
    }


def run_contrast(units: Units, level: Any, opt: Options) -> tuple[dict, list, list, list]:
    """One contrast end to end: select, match, check positivity, estimate, balance, tables."""
    c = _contrast(units, level)
    dirs = _directions(opt.estimands)
    m = match_contrast(c.X_model, c.model_names, c.t, c.rank, opt, dirs,
                       _extra(units, c.sel, c.rows, c.label, opt))
    positivity = _positivity(c, m, opt)
    if m.subclass is not None or opt.match_method in WEIGHTING_METHODS:
        dirs = ()
    sets = _matched_sets(c, m, opt, dirs)
    e = _estimates(c, m, sets, opt, units.outcome_binary)
    b = _balance(c, m, e.weights, opt, units.design)
    summary = {
        "contrast": c.label,
        "treated_level": _fmt(level),
        "control_level": _fmt(units.reference),
        "n_treated": int(c.t.sum()),
        "n_control": int((1 - c.t).sum()),
        "propensity": m.info,
        "matching": _matching_info(opt, m),
        "positivity": positivity,
        "counts": b.counts,
        "balance_flags": b.flagged,
        "effects": e.effects,
        "sensitivity": e.sensitivity,
    }
    if opt.refute:
        from dolm_tools.psm.refute import refute_all

        est = opt.estimands[0]
        main = next(x["estimate"] for x in e.effects if x["estimand"] == est)
        summary["refutation"] = refute_all(c.X_model, c.model_names, c.t, c.y, c.rank, opt,
                                           est, main)
    return (summary, _pair_rows(c, m, sets, dirs), b.rows,
            [_unit_frame(c, units, m, e.weights, units.design)])


_DISTANCE = {
    "ps": "propensity score",
    "logit": "logit of the propensity score",
    "mahalanobis": "Mahalanobis distance on the covariates",
    "robust-mahalanobis": "rank-based robust Mahalanobis distance on the covariates",
}

PAIR_COLS = ["contrast", "estimand", "set_id", "treated_row", "control_row", "treated_id",
             "control_id", "treated_ps", "control_ps", "distance", "weight", "treated_outcome",
             "control_outcome"]


def _no_pairs() -> pd.DataFrame:
    """The pairs table of a run without matched pairs (weighting, strata), typed as the
    schema asks (an untyped empty frame writes null columns)."""
    ints = {"set_id", "treated_row", "control_row"}
    text = {"contrast", "estimand", "treated_id", "control_id"}
    return pd.DataFrame({c: pd.Series([], dtype="int64" if c in ints else "string" if c in text
                                      else "float64") for c in PAIR_COLS})


def run_psm(units: Units, opt: Options) -> PSMResult:
    if opt.caliper is not None and not opt.caliper > 0:
        raise InputError(f"--caliper: expected a positive number of SDs, found {opt.caliper}")
    if opt.ratio < 1:
        raise InputError(f"--ratio: expected an integer >= 1, found {opt.ratio}")
    contrasts, pairs, bal_rows, unit_dfs = [], [], [], []
    for level in units.levels[1:]:
        s, p, b, u = run_contrast(units, level, opt)
        contrasts.append(s)
        pairs += p
        bal_rows += b
        unit_dfs += u
    pairs_df = pd.concat(pairs, ignore_index=True) if pairs else _no_pairs()
    for c in ("treated_id", "control_id"):
        pairs_df[c] = pairs_df[c].astype("string")
    units_df = pd.concat(unit_dfs, ignore_index=True)
    units_df["id"] = units_df["id"].astype("string")
    summary = {
        "treatment": units.treatment,
        "outcome": units.outcome,
        "covariates": units.covariates,
        "reference_level": _fmt(units.reference),
        "levels": [_fmt(v) for v in units.levels],
        "n_units": int(len(units.df)),
        "dropped_missing": units.dropped_na or {"rows": 0},
        "outcome_binary": units.outcome_binary,
        "options": {
            "method": opt.match_method, "estimator": opt.estimator,
            "stabilize": opt.stabilize, "trim": opt.trim, "learner": opt.learner,
            "folds": opt.folds,
            "n_subclass": opt.n_subclass, "max_pairs": opt.max_pairs,
            "propensity": opt.method, "ratio": opt.ratio, "replace": opt.replace,
            "distance": opt.distance, "m_order": opt.m_order, "ties": opt.ties,
            "exact": list(opt.exact), "mahvars": list(opt.mahvars),
            "caliper_on": {c: w for c, w in opt.caliper_on}, "pool_short": opt.pool_short,
            "caliper": opt.caliper, "common_support": opt.common_support,
            "estimands": list(opt.estimands), "se": opt.se, "n_boot": opt.n_boot,
            "seed": opt.seed, "refute": opt.refute, "refute_sims": opt.refute_sims,
            "refute_max_units": opt.refute_max_units,
        },
        "contrasts": contrasts,
    }
    return PSMResult(pairs=pairs_df, balance=pd.DataFrame(bal_rows), units=units_df,
                     summary=json_safe(summary))
