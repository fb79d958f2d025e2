"""From a prompts table to patching *instances*: tokenised clean/corrupted runs, the
token ids the metric reads, the positions a grid covers, and every check a user's input
can fail (each an InputError naming the prompt, column or option).

An instance is one (prompt, noise sample) pair of runs: the *base* run the patch is
written into and the *source* run the patched states come from. Denoising: base =
corrupted, source = clean; noising: the other way round. Positions are in base-run
coordinates; ``shift`` maps a base position to the source run's (``--align last``
aligns the two sequences at their ends).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dolm.errors import InputError
from dolm.metrics import first_token, is_missing
from dolm.positions import parse_spans
from dolm.readout import intended_choice

MODES = ("counterfactual", "noise")
DIRECTIONS = ("denoise", "noise")
ALIGNS = ("none", "last")
METRICS = ("auto", "logit_diff", "prob_target")


@dataclass
class Prompt:
    """One prompt of the table with what the metric needs."""

    prompt_id: str
    text: str
    cf_text: str | None
    target: str
    foil: str | None
    target_id: int
    foil_id: int | None
    choices: list[str] | None
    choice_ids: list[int] | None
    intended: str | None
    spans: dict[str, tuple[int, int]]
    cf_spans: dict[str, tuple[int, int]]


@dataclass
class Prepared:
    """Everything a run needs about its prompts, before any forward pass."""

    prompts: list[Prompt]
    clean_ids: list[list[int]]
    cf_ids: list[list[int]] | None
    clean_offsets: list | None
    metric: str
    aligned: bool
    notes: list[str] = field(default_factory=list)


def _str_or_none(v) -> str | None:
    if is_missing(v):
        return None
    return str(v)


def _list_or_none(v) -> list | None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    try:
        return [str(x) for x in list(v)]
    except TypeError:
        return None


def read_prompts(df, lm, *, mode: str, metric: str, path: str,
                 notes: list[str] | None = None) -> list[Prompt]:
    """Rows -> :class:`Prompt`; checks the columns the mode needs. Warnings that are
    not errors are appended to ``notes``."""
    notes = notes if notes is not None else []
    need = ["prompt_id", "prompt", "target"]
    if mode == "counterfactual":
        need.append("cf_prompt")
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} "
                         f"(needed by --mode {mode})")
    if len(df) == 0:
        raise InputError(f"{path}: no prompts")
    out = []
    cols = set(df.columns)
    for row in df.to_dict("records"):
        pid = str(row["prompt_id"])
        text = _str_or_none(row["prompt"])
        if not text:
            raise InputError(f"{path}: prompt {pid}: column 'prompt' is empty")
        target = _str_or_none(row.get("target"))
        if target is None or target == "":
            raise InputError(f"{path}: prompt {pid}: column 'target' is empty; the patch "
                             "metrics need a target continuation")
        cf_text = _str_or_none(row.get("cf_prompt")) if "cf_prompt" in cols else None
        if mode == "counterfactual" and not cf_text:
            raise InputError(f"{path}: prompt {pid}: column 'cf_prompt' is empty; --mode "
                             "counterfactual needs a counterfactual prompt for every row "
                             "(use --mode noise for noise tracing)")
        foil = _str_or_none(row.get("foil")) if "foil" in cols else None
        if foil is None and mode == "counterfactual" and "cf_target" in cols:
            cf_t = _str_or_none(row.get("cf_target"))
            if cf_t and cf_t != target:
                foil = cf_t
        choices = _list_or_none(row.get("choices")) if "choices" in cols else None
        tid = first_token(lm, target)
        if tid < 0:
            raise InputError(f"{path}: prompt {pid}: target {target!r} has no tokens")
        fid = None
        if foil is not None:
            fid = first_token(lm, foil)
            if fid == tid:
                if metric == "logit_diff":
                    raise InputError(
                        f"{path}: prompt {pid}: target {target!r} and foil {foil!r} share "
                        "their first token; --metric logit_diff needs distinct first tokens")
                notes.append(f"prompt {pid}: target {target!r} and foil {foil!r} share their "
                             "first token; no logit difference for it")
                foil, fid = None, None
        cids = None
        if choices:
            try:
                cids = lm.choice_token_ids(choices, first_token=True)
            except InputError as exc:
                raise InputError(f"{path}: prompt {pid}: {exc}") from None
        intended = None
        if "intended_option" in cols and not is_missing(row.get("intended_option")):
            value = row["intended_option"]
            intended = intended_choice(value, choices, (target, foil)) or str(value).strip()
        spans, cf_spans = ({} if c not in cols else
                           parse_spans(row.get(c), pid, path, column=c, strict=True)
                           for c in ("spans", "cf_spans"))
        out.append(Prompt(pid, text, cf_text, target, foil, tid, fid, choices, cids,
                          intended, spans, cf_spans))
    ids = [p.prompt_id for p in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"{path}: column 'prompt_id' must be unique, found {dup!r} twice")
    if metric == "logit_diff":
        nofoil = [p.prompt_id for p in out if p.foil_id is None]
        if nofoil:
            raise InputError(f"--metric logit_diff: prompt(s) {', '.join(nofoil[:5])} have no "
                             "foil (nor a cf_target to use as one)")
    return out


def choose_metric(prompts: list[Prompt], metric: str) -> str:
    if metric != "auto":
        return metric
    return "logit_diff" if all(p.foil_id is not None for p in prompts) else "prob_target"


def span_tokens(enc, row: int, spans: dict, name: str, pid: str, option: str) -> list[int]:
    if name not in spans:
        have = ", ".join(sorted(spans)) or "none"
        raise InputError(f"{option} {name}: prompt {pid} has no span {name!r} "
                         f"(its spans: {have})")
    s, e = spans[name]
    try:
        toks = enc.span_to_tokens(row, s, e)
    except InputError as exc:
        raise InputError(f"{option} {name}: {exc}") from None
    if not toks:
        raise InputError(f"{option} {name}: prompt {pid}: span {name!r} [{s}, {e}) covers "
                         "no token")
    return toks


def check_pairs(prompts, clean_len: list[int], cf_len: list[int], align: str) -> None:
    """Unequal token lengths are an error unless ``--align last``."""
    if align == "last":
        return
    bad = [(p.prompt_id, a, b) for p, a, b in zip(prompts, clean_len, cf_len, strict=True)
           if a != b]
    if bad:
        pid, a, b = bad[0]
        more = f" (and {len(bad) - 1} more pair(s))" if len(bad) > 1 else ""
        raise InputError(
            f"prompt {pid}: clean prompt is {a} tokens but cf_prompt is {b} tokens{more}; "
            "counterfactual patching needs pairs of equal token length; pass --align last "
            "to patch only the positions aligned at the end")
