"""dolm-mediate interventional: mediation measured by patching a mediator site on a model.

Pairs of prompts (control, treated) and a mediator site at aligned token positions. Four runs
per pair and site, each scored by the teacher-forced target: control C, treated T, C with the
mediator's value from T patched in (C+m1) and T with the value from C patched in (T+m0)::

    acme_control = C+m1 - C      natural indirect effect (NIE)
    ade_control  = T+m0 - C      natural direct effect (NDE)
    acme_treated = T - T+m0      ade_treated = T - C+m1      total = T - C

The outcome of a run is ``target_logprob`` (the target's tokens teacher-forced after the
context, log-probs summed) or ``target_correct`` (1 if every target token is the argmax).
Per-pair values go to an ``effects`` table; means over pairs with bootstrap CIs (pairs
resampled, seeded, the same resamples for every site) to a ``mediation`` table with
``method = interventional``.

Positions: ``last`` (the read position: the context's last token), ``-k`` (k-th from the
end), or a span name from the prompts' ``spans`` (all its tokens). ``anchor='prompt'``
counts ``last``/``-k`` from the end of the ``prompt`` column when the context is longer
(``text_column``: a teacher-forced chain of thought). A position that does not exist in
both prompts of a pair, or a span with different token counts, is an InputError naming the
pair.

Layout: ``make_pairs`` (table -> pairs), ``prepare`` (tokenise, positions),
``run_pairs`` (forwards), ``tables`` (effects/mediation/summary); no click.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from dolm.errors import InputError
from dolm.metrics import is_missing

METRICS = ("target_logprob", "target_correct")
EFFECTS = ("acme_control", "acme_treated", "acme_average", "ade_control", "ade_treated",
           "ade_average", "total", "prop_mediated_control", "prop_mediated_treated",
           "prop_mediated_average")


@dataclass
class Pair:
    pair_id: str
    control_id: str
    treated_id: str
    control: dict  # {"context", "prompt", "target", "spans"}
    treated: dict


@dataclass
class Prepared:
    pairs: list[Pair]
    ids_c: list[list[int]]  # context + target tokens
    ids_t: list[list[int]]
    read_c: list[int]  # position whose logits predict the first target token
    read_t: list[int]
    tgt_c: list[list[int]]
    tgt_t: list[list[int]]
    pos_c: list[list[int]]  # mediator positions per pair (same count in c and t)
    pos_t: list[list[int]]
    position_label: int | None = None
    notes: list[str] = field(default_factory=list)


def _context(row: pd.Series, text_column: str | None, target: str, pid: str) -> str:
    if not text_column:
        return str(row["prompt"])
    text = row[text_column]
    if is_missing(text):
        return str(row["prompt"])
    text = str(text)
    if not text.endswith(target):
        raise InputError(f"--text-column {text_column!r}: prompt {pid}: expected the text to end "
                         f"with the target {target!r}, found ...{text[-30:]!r}")
    return text[: len(text) - len(target)]


def _side(row: pd.Series, text_column: str | None, cf: bool = False) -> dict:
    pid = str(row["prompt_id"])
    has_cf = cf and "cf_target" in row and not is_missing(row["cf_target"])
    tcol = "cf_target" if has_cf else "target"
    target = row.get(tcol)
    if is_missing(target) or not str(target):
        raise InputError(f"prompts: prompt {pid}: column {tcol!r} is empty; the interventional "
                         "analysis scores the teacher-forced target")
    target = str(target)
    if cf:
        prompt = str(row["cf_prompt"])
        context = prompt
        spans = row.get("cf_spans")
    else:
        prompt = str(row["prompt"])
        context = _context(row, text_column, target, pid)
        spans = row.get("spans")
    spans = {} if is_missing(spans) else json.loads(spans)
    return {"prompt": prompt, "context": context, "target": target, "spans": spans}


def _match(v: Any, want: str) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return str(v).lower() == want.lower() or str(int(v)) == want
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        try:
            return float(v) == float(want)
        except ValueError:
            return False
    return str(v) == want


def make_pairs(df: pd.DataFrame, *, treatment: str | None, pair_by: str | None,
               control_value: str | None, treat_value: str | None,
               text_column: str | None, path: str = "prompts") -> tuple[list[Pair], dict]:
    """Pairs from a treatment column + pairing column, or (without --treatment) from
    prompt / cf_prompt of each row. Returns (pairs, description)."""
    cols = list(df.columns)
    if text_column and text_column not in cols:
        raise InputError(f"--text-column: column {text_column!r} not in {path}")
    if treatment is None:
        if "cf_prompt" not in cols or df["cf_prompt"].isna().all():
            raise InputError(f"{path}: no --treatment given and no cf_prompt column with values; "
                             "give --treatment (and --pair-by) or counterfactual prompts")
        bad = df.index[df["cf_prompt"].isna()].tolist()
        if bad:
            raise InputError(f"{path}: cf_prompt is empty for {len(bad)} prompt(s), e.g. "
                             f"{df.loc[bad[0], 'prompt_id']}")
        pairs = [Pair(str(r.prompt_id), str(r.prompt_id), str(r.prompt_id) + ":cf",
                      _side(r, text_column), _side(r, None, cf=True)) for _, r in df.iterrows()]
        return pairs, {"treatment": "cf_prompt", "control_value": "prompt",
                       "treat_value": "cf_prompt", "pair_by": "row"}
    if treatment not in cols:
        raise InputError(f"--treatment: column {treatment!r} not in {path} "
                         f"(columns: {', '.join(map(str, cols[:30]))})")
    if pair_by is None:
        pair_by = next((c for c in ("group_id", "unit_id") if c in cols
                        and df[c].notna().all()), None)
        if pair_by is None:
            raise InputError(f"{path}: --pair-by not given and no group_id/unit_id column "
                             "without gaps to pair the prompts")
    elif pair_by not in cols:
        raise InputError(f"--pair-by: column {pair_by!r} not in {path}")
    if df[pair_by].isna().any():
        raise InputError(f"--pair-by {pair_by!r}: {int(df[pair_by].isna().sum())} empty value(s)")
    vals = df[treatment]
    if vals.isna().any():
        raise InputError(f"--treatment {treatment!r}: {int(vals.isna().sum())} empty value(s)")
    levels = sorted({str(v) for v in vals})
    if pd.api.types.is_bool_dtype(vals):
        levels = ["False", "True"]
    if control_value is None and treat_value is None:
        if len(levels) != 2:
            raise InputError(f"--treatment {treatment!r}: levels {levels}; give --control-value "
                             "and --treat-value naming two of them")
        control_value, treat_value = levels
    elif control_value is None or treat_value is None:
        raise InputError("--control-value and --treat-value go together (or neither, for a "
                         "two-level treatment)")
    is_c = np.array([_match(v, control_value) for v in vals])
    is_t = np.array([_match(v, treat_value) for v in vals])
    if not is_c.any() or not is_t.any():
        raise InputError(f"--treatment {treatment!r}: no rows with value "
                         f"{control_value if not is_c.any() else treat_value!r} "
                         f"(levels: {levels})")
    pairs = []
    sub = df[is_c | is_t].assign(_t=is_t[is_c | is_t])
    for g, rows in sub.groupby(pair_by, sort=True):
        c, t = rows[~rows._t], rows[rows._t]
        if len(c) != 1 or len(t) != 1:
            raise InputError(f"--pair-by {pair_by!r}: pair {g}: expected one control and one "
                             f"treated prompt, found {len(c)} and {len(t)}")
        rc, rt = c.iloc[0], t.iloc[0]
        pairs.append(Pair(str(g), str(rc.prompt_id), str(rt.prompt_id),
                          _side(rc, text_column), _side(rt, text_column)))
    return pairs, {"treatment": treatment, "control_value": str(control_value),
                   "treat_value": str(treat_value), "pair_by": pair_by}


def _parse_position(spec: str) -> tuple[str, Any]:
    """``--position`` in the language of :mod:`dolm.positions`, restricted to one position
    per prompt: ``last``, a negative offset (-1 = last) or a span name (its last token)."""
    from dolm.positions import parse_spec

    msg = "--position: expected last, a negative offset (-1 = last) or a span name"
    try:
        s = parse_spec(str(spec), "--position")
    except InputError:
        raise InputError(f"{msg}, found {spec!r}") from None
    if s.kind == "last":
        return "end", -1
    if s.kind == "ints" and len(s.ints) == 1 and s.text.startswith("-"):
        if s.ints[0] == 0:
            raise InputError(f"{msg}, found 0")
        return "end", s.ints[0]
    if s.kind.startswith("span") and not s.text.startswith("span:") and s.text.isidentifier():
        return "span", s.text
    raise InputError(f"{msg}, found {spec!r}")


def prepare(lm: Any, pairs: list[Pair], position: str, anchor: str = "context") -> Prepared:
    """Tokenise contexts and targets; map the mediator positions in both prompts of a pair."""
    kind, val = _parse_position(position)
    tok = lm.tokenizer
    out = Prepared(pairs, [], [], [], [], [], [], [], [],
                   position_label=val if kind == "end" else None)
    sides = {"c": [p.control for p in pairs], "t": [p.treated for p in pairs]}
    names = {"c": [p.control_id for p in pairs], "t": [p.treated_id for p in pairs]}
    enc_pos: dict[str, list[list[int]]] = {}
    for key in ("c", "t"):
        ids_all, reads, tgts, poss = [], [], [], []
        chunk = 64
        for lo in range(0, len(pairs), chunk):
            ss = sides[key][lo: lo + chunk]
            enc = lm.encode([s["context"] for s in ss], names=names[key][lo: lo + chunk],
                            device="cpu")
            for k, s in enumerate(ss):
                n = int(enc.lengths[k])
                ids = enc.input_ids[k, :n].tolist()
                tgt = list(tok(s["target"], add_special_tokens=False)["input_ids"])
                if not tgt:
                    raise InputError(f"prompt {names[key][lo + k]}: target {s['target']!r} "
                                     "has no tokens")
                end = n - 1
                if anchor == "prompt" and len(s["context"]) > len(s["prompt"]):
                    if not s["context"].startswith(s["prompt"]):
                        raise InputError(f"prompt {names[key][lo + k]}: --anchor prompt needs "
                                         "the prompt to be the start of the scored context")
                    end = enc.span_last_token(k, 0, len(s["prompt"]))
                if kind == "end":
                    p = end + 1 + val
                    lo_ok = int(enc.n_prefix[k]) if hasattr(enc, "n_prefix") else 0
                    if p < lo_ok:
                        pr = pairs[lo + k]
                        raise InputError(
                            f"pair {pr.pair_id} (control {pr.control_id}, treated "
                            f"{pr.treated_id}): position {val} does not exist in prompt "
                            f"{names[key][lo + k]} ({end + 1 - lo_ok} tokens); mediator "
                            "positions must align across the pair")
                    pos = [p]
                else:
                    span = s["spans"].get(val)
                    if span is None:
                        pr = pairs[lo + k]
                        raise InputError(f"pair {pr.pair_id}: prompt {names[key][lo + k]} has "
                                         f"no span {val!r} (spans: {sorted(s['spans'])}); "
                                         "mediator positions must align across the pair")
                    pos = enc.span_to_tokens(k, int(span[0]), int(span[1]))
                ids_all.append(ids + tgt)
                reads.append(n - 1)
                tgts.append(tgt)
                poss.append(pos)
        enc_pos[key] = poss
        if key == "c":
            out.ids_c, out.read_c, out.tgt_c = ids_all, reads, tgts
        else:
            out.ids_t, out.read_t, out.tgt_t = ids_all, reads, tgts
    for i, pr in enumerate(pairs):
        pc, pt = enc_pos["c"][i], enc_pos["t"][i]
        if len(pc) != len(pt) or not pc:
            raise InputError(
                f"pair {pr.pair_id} (control {pr.control_id}, treated {pr.treated_id}): "
                f"position {position!r} covers {len(pc)} token(s) in the control and {len(pt)} "
                "in the treated prompt; mediator positions must align across the pair")
        if max(pc) > out.read_c[i] or max(pt) > out.read_t[i]:
            out.notes.append(f"pair {pr.pair_id}: mediator position after the read position")
    out.pos_c, out.pos_t = enc_pos["c"], enc_pos["t"]
    return out


# ------------------------------------------------------------------------------ forwards
def _score(logits: Any, reads: list[int], tgts: list[list[int]]) -> np.ndarray:
    """(rows, 2): summed target log-prob and all-tokens-argmax correctness."""
    import torch

    out = np.zeros((len(reads), 2))
    for i, (r, tgt) in enumerate(zip(reads, tgts, strict=True)):
        pos = torch.arange(r, r + len(tgt), device=logits.device)
        lg = logits[i, pos].float()
        lp = torch.log_softmax(lg, dim=-1)
        t = torch.tensor(tgt, device=logits.device)
        out[i, 0] = float(lp.gather(1, t[:, None]).sum())
        out[i, 1] = float(bool((lg.argmax(-1) == t).all()))
    return out


def _forward(lm: Any, ids: list[list[int]], read=()):
    from dolm.models import pad_right

    input_ids, mask = pad_right(ids, lm.pad_id, lm.device)
    with lm.trace(read=list(read)) as tr:
        logits = lm.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return logits, {s: tr[s].clone() for s in read}


@dataclass
class _Side:
    """The clean runs of one side (control or treated) of a block of pairs."""

    ids: list[list[int]]
    reads: list[int]
    tgts: list[list[int]]
    pos: list[list[int]]
    vals: dict  # site -> (pairs, T, d) clean activations (mediators and entry states)


def _clean_side(lm: Any, prep: Prepared, key: str, idx: range, sites: list[str]):
    """Clean forward of one side for pairs ``idx``: (scores, _Side)."""
    def pick(xs):
        return [xs[i] for i in idx]

    ids = pick(prep.ids_c if key == "c" else prep.ids_t)
    side = _Side(ids, pick(prep.read_c if key == "c" else prep.read_t),
                 pick(prep.tgt_c if key == "c" else prep.tgt_t),
                 pick(prep.pos_c if key == "c" else prep.pos_t), {})
    logits, side.vals = _forward(lm, ids, read=sites)
    return _score(logits, side.reads, side.tgts), side


def _patched(lm: Any, base: _Side, donor: _Side, rows: list[tuple[int, int]], sites: list[str],
             starts: list[int], contexts: dict) -> np.ndarray:
    """Scores of the rows (site index, pair index in the block), sorted by start layer:
    ``base`` runs with the mediator values of ``donor`` written at the aligned positions.
    Each row starts at its site's layer from ``base``'s cached entry state."""
    import torch
    from dolm.engine import entry_site, row_writer, run_rows, unembed

    t = max(len(base.ids[j]) for _, j in rows)
    writes = {}
    for si in sorted({si for si, _ in rows}):
        mine = [r for r, (sj, _) in enumerate(rows) if sj == si]
        site = sites[si]
        width = base.vals[site].shape[-1]
        value = torch.zeros(len(mine), t, width, dtype=base.vals[site].dtype)
        mask = torch.zeros(len(mine), t, dtype=torch.bool)
        for q, r in enumerate(mine):
            j = rows[r][1]
            value[q, base.pos[j]] = donor.vals[site][j, donor.pos[j]].cpu()
            mask[q, base.pos[j]] = True
        writes[site] = row_writer(mine, mask, value)
    pairs = [j for _, j in rows]

    def entry(layer: int, a: int, z: int):
        return base.vals[entry_site(lm, layer)][pairs[a:z]]

    h = run_rows(lm, [starts[si] for si, _ in rows], entry, t, writes, contexts=contexts)
    reads = [base.reads[j] for j in pairs]
    tgts = [base.tgts[j] for j in pairs]
    width = max(len(g) for g in tgts)
    at = torch.tensor([[min(r + q, t - 1) for q in range(width)] for r in reads])
    return _score(unembed(lm, h, at, writes=writes), [0] * len(rows), tgts)


def run_pairs(lm: Any, prep: Prepared, sites: list[str], batch_size: int | str = "auto",
              progress=None) -> dict[str, np.ndarray]:
    """Returns C, T (pairs, 2) and CM1, TM0 (pairs, sites, 2) outcome arrays
    (last axis: target_logprob, target_correct).

    Pairs go in blocks (``auto``: up to 16, halved on out-of-memory); each patched run
    (site, pair) starts at the site's first layer from the clean run's cached state
    (:func:`dolm.engine.run_rows`). ``progress(total)``: a bar with ``update(k)``.
    """
    import torch
    from dolm.engine import entry_site, start_layer
    from dolm.models.batching import iter_batched

    n, s_n = len(prep.pairs), len(sites)
    starts = [start_layer(lm, s) for s in sites]
    reads = list(dict.fromkeys(list(sites) + [entry_site(lm, x) for x in sorted(set(starts))]))
    order = sorted(range(s_n), key=lambda si: (starts[si], si))
    C, T = np.zeros((n, 2)), np.zeros((n, 2))
    CM1, TM0 = np.zeros((n, s_n, 2)), np.zeros((n, s_n, 2))
    contexts: dict = {}

    @torch.no_grad()
    def block(a: int, z: int):
        idx = range(a, z)
        sc_c, side_c = _clean_side(lm, prep, "c", idx, reads)
        sc_t, side_t = _clean_side(lm, prep, "t", idx, reads)
        rows = [(si, j) for si in order for j in range(z - a)]
        cm1, tm0 = np.zeros((z - a, s_n, 2)), np.zeros((z - a, s_n, 2))
        for r0 in range(0, len(rows), z - a):
            chunk = rows[r0: r0 + z - a]
            for base, donor, dest in ((side_c, side_t, cm1), (side_t, side_c, tm0)):
                sc = _patched(lm, base, donor, chunk, sites, starts, contexts)
                for r, (si, j) in enumerate(chunk):
                    dest[j, si] = sc[r]
        return sc_c, sc_t, cm1, tm0

    bar = progress(n) if progress else None
    for a, z, (sc_c, sc_t, cm1, tm0) in iter_batched(n, block, batch_size, max_batch_size=16):
        C[a:z], T[a:z], CM1[a:z], TM0[a:z] = sc_c, sc_t, cm1, tm0
        if bar is not None:
            bar.update(z - a)
    if bar is not None:
        bar.close()
    return {"C": C, "T": T, "CM1": CM1, "TM0": TM0}


# -------------------------------------------------------------------------------- tables
def per_pair(res: dict[str, np.ndarray], m: int) -> dict[str, np.ndarray]:
    """(pairs, sites) arrays of the per-pair effects for outcome metric index m."""
    C, T = res["C"][:, m][:, None], res["T"][:, m][:, None]
    CM1, TM0 = res["CM1"][..., m], res["TM0"][..., m]
    tot = np.broadcast_to(T - C, CM1.shape)
    return {"acme_control": CM1 - C, "ade_control": TM0 - C, "acme_treated": T - TM0,
            "ade_treated": T - CM1, "total": tot}


def _means(pp: dict[str, np.ndarray], w: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Means over pairs (w: (B, n) resample weights -> (B, sites))."""
    def mean(x):
        return x.mean(0) if w is None else (w @ x) / w.sum(1, keepdims=True)
    out = {k: mean(v) for k, v in pp.items()}
    out["acme_average"] = (out["acme_control"] + out["acme_treated"]) / 2
    out["ade_average"] = (out["ade_control"] + out["ade_treated"]) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in ("control", "treated", "average"):
            out[f"prop_mediated_{k}"] = np.where(out["total"] != 0,
                                                 out[f"acme_{k}"] / out["total"], np.nan)
    return out


def mediation_table(pp: dict[str, np.ndarray], sites: list[str], lm: Any, position: Any,
                    sims: int, seed: int, fdr: float, level: float = 0.95) -> pd.DataFrame:
    from scipy.stats import norm
    from statsmodels.stats.multitest import multipletests

    n = next(iter(pp.values())).shape[0]
    est = _means(pp)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(sims, n))
    w = np.zeros((sims, n))
    np.add.at(w, (np.repeat(np.arange(sims), n), idx.ravel()), 1.0)
    boot = _means(pp, w)
    a = (1 - level) / 2
    rows = []
    for e in EFFECTS:
        b = boot[e]
        with np.errstate(invalid="ignore"):
            lo = np.nanquantile(b, a, axis=0)
            hi = np.nanquantile(b, 1 - a, axis=0)
            se = np.nanstd(b, axis=0, ddof=1)
            z = np.abs(est[e]) / se
            p = np.where(se > 0, 2 * norm.sf(z), np.where(est[e] == 0, 1.0, 0.0))
            p_emp = np.minimum(1.0, 2 * np.minimum((b > 0).mean(0), (b < 0).mean(0)))
        p = np.where(np.isfinite(est[e]), p, np.nan)
        q = np.full(len(sites), np.nan)
        ok = np.isfinite(p)
        if ok.any() and not e.startswith("prop"):
            q[ok] = multipletests(p[ok], method="fdr_bh")[1]
        for si, s in enumerate(sites):
            site = lm.parse_site(s)
            rows.append({
                "method": "interventional", "mediator": s, "effect": e,
                "estimate": _f(est[e][si]), "ci_low": _f(lo[si]), "ci_high": _f(hi[si]),
                "se": _f(se[si]), "p_value": _f(p[si]),
                "p_value_empirical": _f(p_emp[si]), "q_value": _f(q[si]),
                "significant": bool(np.isfinite(q[si]) and q[si] <= fdr),
                "n_units": int(n), "ci_method": f"bootstrap over pairs ({sims})",
                "mediator_model": None, "outcome_model": None, "site": s,
                "layer": getattr(site, "layer", None), "head": getattr(site, "head", None),
                "position": position,
            })
    return pd.DataFrame(rows)


def _f(v) -> float | None:
    v = float(v)
    return v if np.isfinite(v) else None


def effects_table(prep: Prepared, res: dict[str, np.ndarray], sites: list[str],
                  lm: Any) -> pd.DataFrame:
    """Per pair x site x outcome metric: the two patched runs. value = the patched run,
    clean_value = control run C, corrupt_value = treated run T; kind 'nie' (C+m1: value -
    clean_value = NIE) or 'nde' (T+m0: value - clean_value = NDE)."""
    rows = []
    parsed = [lm.parse_site(s) for s in sites]
    for i, pr in enumerate(prep.pairs):
        pos = prep.position_label if prep.position_label is not None else prep.pos_c[i][0]
        for si, s in enumerate(sites):
            for m, metric in enumerate(METRICS):
                for kind, arr, desc in (("nie", res["CM1"], "treated {s} into control"),
                                        ("nde", res["TM0"], "control {s} into treated")):
                    rows.append({
                        "prompt_id": pr.control_id, "tool": "mediate",
                        "intervention": desc.format(s=s), "site": s,
                        "layer": getattr(parsed[si], "layer", None),
                        "position": int(pos), "head": getattr(parsed[si], "head", None),
                        "kind": kind, "metric": metric, "value": float(arr[i, si, m]),
                        "clean_value": float(res["C"][i, m]),
                        "corrupt_value": float(res["T"][i, m]),
                    })
    from dolm.formats import frame

    return frame(rows, "effects", columns=list(rows[0]) if rows else None)


class _SitesOf:
    """Layer and head of each site as an effects table records them (``parse_site`` for
    :func:`mediation_table` where no model is loaded: the Ray driver's merge)."""

    def __init__(self, eff: pd.DataFrame) -> None:
        from types import SimpleNamespace

        first = eff.drop_duplicates("site")
        self.sites = [str(x) for x in first["site"]]
        self._at = {str(r.site): SimpleNamespace(layer=None if pd.isna(r.layer) else int(r.layer),
                                                 head=None if pd.isna(r.head) else int(r.head))
                    for r in first.itertuples()}

    def parse_site(self, site: str) -> Any:
        return self._at[site]


def res_from_effects(eff: pd.DataFrame) -> tuple[dict[str, np.ndarray], _SitesOf]:
    """The :func:`run_pairs` arrays back from an :func:`effects_table` (rows pair x site x
    metric x (nie, nde), in that order), and its sites: the per-pair values are all there,
    so shards' effects tables concatenated give the whole run's mediation table."""
    sites = _SitesOf(eff)
    s_n, m_n = len(sites.sites), len(METRICS)
    n = len(eff) // (s_n * m_n * 2)
    if n * s_n * m_n * 2 != len(eff):
        raise InputError(f"effects table: {len(eff)} rows is not pairs x {s_n} sites x "
                         f"{m_n} metrics x 2 runs")
    shape = (n, s_n, m_n, 2)
    v = eff["value"].to_numpy(dtype=np.float64).reshape(shape)
    c = eff["clean_value"].to_numpy(dtype=np.float64).reshape(shape)
    t = eff["corrupt_value"].to_numpy(dtype=np.float64).reshape(shape)
    return {"C": c[:, 0, :, 0].copy(), "T": t[:, 0, :, 0].copy(),
            "CM1": v[..., 0].copy(), "TM0": v[..., 1].copy()}, sites


_ATTN_NAME = re.compile(r"^attn_to\.[^.]+\.L(\d+)\.H(\d+)$")


def statistical_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Statistical rows of a mediation table, with site/layer/head filled where the mediator
    names a head (``attn_to.<span>.L<l>.H<h>``) or is a site name."""
    st = df[df["method"] == "statistical"].copy()
    sites, layers, heads = [], [], []
    for name in st["mediator"].astype(str):
        m = _ATTN_NAME.match(name)
        if m:
            sites.append(f"head.{m.group(1)}.{m.group(2)}")
            layers.append(int(m.group(1)))
            heads.append(int(m.group(2)))
        else:
            sites.append(None)
            layers.append(None)
            heads.append(None)
    if "site" not in st.columns or st["site"].isna().all():
        st["site"] = sites
        st["layer"] = pd.array(layers, dtype="Int64")
        st["head"] = pd.array(heads, dtype="Int64")
    return st


def comparison(inter: pd.DataFrame, stat: pd.DataFrame) -> list[dict]:
    """Per interventional site with a statistical counterpart: the two indirect and total
    effects side by side."""
    out = []
    iv = inter.set_index(["site", "effect"])
    for site in inter["site"].unique():
        s = stat[stat["site"] == site]
        if s.empty:
            continue
        for med, g in s.groupby("mediator"):
            e = g.set_index("effect")
            item = {"site": site, "statistical_mediator": med}
            for eff in ("acme_average", "acme_control", "ade_average", "total"):
                item[f"interventional_{eff}"] = iv.loc[(site, eff), "estimate"]
                item[f"statistical_{eff}"] = (e.loc[eff, "estimate"] if eff in e.index
                                              else None)
            item["interventional_ci"] = [iv.loc[(site, "acme_average"), "ci_low"],
                                         iv.loc[(site, "acme_average"), "ci_high"]]
            item["statistical_ci"] = ([e.loc["acme_average", "ci_low"],
                                       e.loc["acme_average", "ci_high"]]
                                      if "acme_average" in e.index else None)
            out.append(item)
    return out
