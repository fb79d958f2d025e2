"""dolm-mediate: causal mediation analysis.

Layout (``dolm_tools.mediate``):

* ``statistical.py``: the Imai-Keele-Tingley estimator on arrays (model fits, vectorised
  quasi-Bayesian and bootstrap simulation, rho sensitivity): no I/O, no click.
* ``joint.py``: several mediators as one set (``--joint``): the set's effects, each
  mediator's interventional path and the mutual remainder (Vansteelandt & Daniel 2017).
* ``core.py``: unit table -> arrays (checks, encoding, errors naming the column), one
  analysis per mediator, Benjamini-Hochberg, the summary dict.
* ``cli.py``: the ``dolm-mediate`` click group; subcommand ``statistical``.

The interventional analysis (paired prompts, a model, mediator sites) is meant to live in
``interventional.py`` with a subcommand ``interventional`` on the same group. It writes
the same ``mediation`` table with ``method = "interventional"`` and the same effect names:
with control run C, treated run T, C with the mediator's treated value patched in (C+m1)
and T with the control value patched in (T+m0): acme_control = C+m1 - C (the natural
indirect effect), ade_control = T+m0 - C (the natural direct effect), acme_treated = T -
T+m0, ade_treated = T - C+m1, total = T - C; per-pair values go to an ``effects`` table.
Statistical and interventional rows for the same units then concatenate into one table
(and ``dolm-plot`` draws them side by side).
"""
