"""dolm-psm: propensity score matching on any unit table.

Layout (``dolm_tools.psm``): ``data`` (checks, canonical row order, covariate encoding),
``propensity`` (logistic / gradient boosting), ``matching`` (nearest neighbour on the logit
score, caliper, common support), ``balance`` (MatchIt-style SMD, variance ratio, eCDF),
``effects`` (ATT/ATC/ATE, Abadie-Imbens and paired-bootstrap SEs), ``sensitivity``
(Rosenbaum bounds, E-values), ``dag`` (backdoor set via DoWhy), ``refute`` (DoWhy's
refuters on our estimator), ``core`` (``run_psm``: the pipeline as plain functions),
``cli`` (the click command).
"""

# A contrast with more units than this is refuted on a random subsample of this many: the
# refuters' 3 x 50 refits of the propensity model and the matching (BENCHMARKS.md, dolm-psm)
REFUTE_MAX_UNITS = 20_000
