"""DoWhy's refuters run on dolm-psm's own matching estimator.

The estimator is wrapped as a ``dowhy.causal_estimator.CausalEstimator`` so DoWhy's
placebo-treatment (permuted treatment), random-common-cause and data-subset refuters, and
their significance tests, run unchanged on exactly the estimate that dolm-psm reports.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd


def _estimator_class():
    from dowhy.causal_estimator import CausalEstimate, CausalEstimator

    class DolmMatchingEstimator(CausalEstimator):
        """Propensity-score matching as dolm-psm does it (point estimate only)."""

        def __init__(self, identified_estimand, psm_options=None, estimand="ATT",
                     name_map=None, **kwargs):
            super().__init__(identified_estimand=identified_estimand, **kwargs)
            self.psm_options = psm_options
            self.psm_estimand = estimand
            self.name_map = name_map or {}

        def fit(self, data: pd.DataFrame, effect_modifier_names=None, **_):
            self._set_effect_modifiers(data, effect_modifier_names)
            return self

        def estimate_effect(self, data: pd.DataFrame, treatment_value: Any = 1,
                            control_value: Any = 0, target_units=None, **_):
            from dolm_tools.psm.core import point_estimate

            self._target_units = target_units
            self._treatment_value = treatment_value
            self._control_value = control_value
            tname = self._target_estimand.treatment_variable[0]
            yname = self._target_estimand.outcome_variable[0]
            covs = list(self._target_estimand.get_adjustment_set())
            t = np.asarray(data[tname]).ravel().astype(int)
            X = data[covs].to_numpy(dtype=float)
            names = [self.name_map.get(c, c) for c in covs]
            value = point_estimate(X, names, t, data[yname].to_numpy(dtype=float),
                                   data["_rank"].to_numpy(), self.psm_options, self.psm_estimand)
            est = CausalEstimate(
                data=data, treatment_name=[tname], outcome_name=[yname], estimate=value,
                target_estimand=self._target_estimand, realized_estimand_expr="dolm-psm matching",
                control_value=control_value, treatment_value=treatment_value,
            )
            est.add_estimator(self)
            return est

        def construct_symbolic_estimator(self, estimand):
            return "dolm-psm matching"

    return DolmMatchingEstimator


def refute_sample(t: np.ndarray, max_units: int, seed: int) -> np.ndarray | None:
    """Rows (sorted) of a random subsample of ``max_units`` units, treated and controls in
    their proportions, or None when the contrast has no more units than that (or
    ``max_units`` is 0): the refuters' size-aware default (see ``refute_all``)."""
    n = len(t)
    if not max_units or n <= max_units:
        return None
    rng = np.random.default_rng([seed, 29])
    tr, co = np.flatnonzero(t == 1), np.flatnonzero(t == 0)
    k1 = min(max(int(round(max_units * len(tr) / n)), 2), len(tr))
    k0 = min(max(max_units - k1, 2), len(co))
    return np.sort(np.concatenate([rng.choice(tr, k1, replace=False),
                                   rng.choice(co, k0, replace=False)]))


def refute_all(X, names, t, y, rank, opt, estimand: str, main_value: float) -> dict[str, Any]:
    """Placebo treatment, random common cause, data subset: each with DoWhy's test.

    Each simulation re-runs the propensity fit and the matching, 3 x ``opt.refute_sims``
    times. A contrast with more than ``opt.refute_max_units`` units is refuted on one random
    subsample of that many units (treated and controls in their proportions): the refuters
    check that the estimator returns about 0 for a permuted treatment and is stable to a
    noise covariate and to subsets, which a large random sample shows as well as the whole
    table, and their test compares the simulations with the estimate on the same sample
    (recorded as ``sample``), so it is not tilted by the two sizes."""
    import copy

    n_all = len(t)
    idx = refute_sample(t, opt.refute_max_units, opt.seed)
    if idx is not None:
        X, t, y, rank = X[idx], t[idx], y[idx], rank[idx]

    logging.getLogger("dowhy").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dowhy import CausalModel
        from dowhy.causal_refuters.data_subset_refuter import refute_data_subset
        from dowhy.causal_refuters.placebo_treatment_refuter import (
            PlaceboType,
            refute_placebo_treatment,
        )
        from dowhy.causal_refuters.random_common_cause import refute_random_common_cause

        cols = [f"x{j}" for j in range(X.shape[1])]
        data = pd.DataFrame(X, columns=cols)
        data["_t"] = t.astype(int)
        data["_y"] = y
        data["_rank"] = rank
        model = CausalModel(data=data, treatment="_t", outcome="_y", common_causes=cols)
        ident = model.identify_effect(proceed_when_unidentifiable=True)
        ident.set_identifier_method("backdoor")
        opt = copy.copy(opt)
        opt.refute = False
        cls = _estimator_class()
        estimator = cls(ident, psm_options=opt, estimand=estimand,
                        name_map=dict(zip(cols, names, strict=True)))
        estimator.fit(data)
        estimate = estimator.estimate_effect(data, target_units=estimand.lower())
        if idx is not None:  # the tests compare the simulations with the sample's estimate
            main_value = estimate.value
        sims = opt.refute_sims
        rs = np.random.RandomState(opt.seed)
        out = []
        runs = [
            ("placebo_treatment", "effect of a permuted (placebo) treatment; expected 0",
             lambda: refute_placebo_treatment(data, ident, estimate, ["_t"], num_simulations=sims,
                                              placebo_type=PlaceboType.PERMUTE, random_state=rs)),
            ("random_common_cause", "estimate with an added N(0,1) covariate; expected unchanged",
             lambda: refute_random_common_cause(data, ident, estimate, num_simulations=sims,
                                                random_state=rs)),
            ("data_subset", "estimate on random 80% subsets; expected unchanged",
             lambda: refute_data_subset(data, ident, estimate, subset_fraction=0.8,
                                        num_simulations=sims, random_state=rs)),
        ]
        for name, what, fn in runs:
            try:
                r = fn()
                sig = r.refutation_result or {}
                p = float(sig.get("p_value", np.nan))
                out.append({
                    "refuter": name,
                    "description": what,
                    "estimate": float(main_value),
                    "new_effect": float(r.new_effect),
                    "p_value": p,
                    "passed": bool(not sig.get("is_statistically_significant", False)),
                })
            except Exception as exc:  # a refuter failing must not sink the analysis
                out.append({"refuter": name, "description": what, "error": str(exc)})
    return {
        "estimand": estimand,
        "by": "DoWhy refuters (dowhy.causal_refuters) on dolm-psm's matching estimator",
        "num_simulations": sims,
        "n_units": int(len(t)),
        "sample": None if idx is None else {
            "n_units": int(len(t)), "of_units": int(n_all),
            "max_units": int(opt.refute_max_units), "estimate": float(main_value),
            "why": "the contrast has more units than --refute-max-units: the refuters ran "
                   "on a random subsample of that many units (treated and controls in their "
                   "proportions), and each result's estimate is the estimate on it"},
        "test": "DoWhy test_significance (normal below 100 simulations, else bootstrap); "
        "passed = p > 0.05",
        "results": out,
    }
