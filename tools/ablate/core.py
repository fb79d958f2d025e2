"""Ablation runs: every (component set x kind x sample) on every prompt is one batch row.

Kinds (what replaces a component's output at the ablated positions):

- ``zero``: zeros.
- ``mean``: the mean over the reference prompts at the same token position (positions
  that no reference prompt reaches get the mean over every reference token). A
  reference set of the prompt itself therefore changes nothing.
- ``resample``: the activation of another reference prompt (not the prompt itself, at
  least as long), drawn with the seed; ``samples`` draws per prompt. One draw replaces
  every component of the set from the same donor.

Positions are matched from the start (``align="start"``: token t of the prompt gets
token t of the reference) or from the end (``align="end"``: the prompt's last token gets
the reference's last token, and so on back), for prompts of different lengths whose
ends line up (e.g. the draws of bayes prompts with and without distractors).

A variant starts at the first layer it ablates, from the cached clean residual stream
(:mod:`dolm.variants`), and only the last position is unembedded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from dolm.engine import row_writer, rows_start, writes_embed
from dolm.errors import InputError
from dolm.metrics import Targets, effect_frames, ids_matrix, metrics_table
from dolm.variants import clean_pass, run_variants
from dolm_tools.ablate.components import KINDS, ComponentSet  # noqa: F401


@dataclass
class Condition:
    """One ablation: a component set, a kind, a resample draw (or None)."""

    cset: ComponentSet
    kind: str
    sample: int | None


def position_mask(enc, spec: tuple[str, list[int] | None], names: list[str],
                  option: str = "--positions") -> torch.Tensor:
    """(N, T) bool: the positions each prompt's ablation covers."""
    kind, items = spec
    n, t = enc.input_ids.shape
    mask = torch.zeros(n, t, dtype=torch.bool)
    for i, length in enumerate(enc.lengths):
        if kind == "all":
            mask[i, :length] = True
        elif kind == "last":
            mask[i, length - 1] = True
        else:
            for q in items:
                qq = q + length if q < 0 else q
                if not 0 <= qq < length:
                    raise InputError(f"{option}: position {q} is out of range for prompt "
                                     f"{names[i]} ({length} tokens; valid {-length}..{length - 1})")
                mask[i, qq] = True
    return mask


def positional_sums(acts: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over rows at each position (rows where ``mask``), (T, w), and the counts (T, 1),
    in float64: a shard's part of :func:`positional_mean` (sums of shards add up)."""
    m = mask[..., None].to(torch.float64)
    return (acts.to(torch.float64) * m).sum(0), m.sum(0)


def add_sums(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums and counts of several row blocks (of any lengths) added up by position."""
    t = max(total.shape[0] for total, _ in parts)
    total = torch.zeros((t, parts[0][0].shape[1]), dtype=torch.float64)
    count = torch.zeros((t, 1), dtype=torch.float64)
    for tt, cc in parts:
        total[: tt.shape[0]] += tt
        count[: cc.shape[0]] += cc
    return total, count


def mean_from_sums(total: torch.Tensor, count: torch.Tensor, t: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-position means (t, w) from :func:`positional_sums`; positions no row reaches
    get the mean over every counted token."""
    overall = total.sum(0) / count.sum().clamp(min=1)
    mean = torch.where(count > 0, total / count.clamp(min=1), overall)
    if mean.shape[0] < t:
        mean = torch.cat([mean, overall.expand(t - mean.shape[0], -1)], dim=0)
    return mean[:t].to(dtype)


def positional_mean(acts: torch.Tensor, mask: torch.Tensor, t: int) -> torch.Tensor:
    """Mean over rows at each position (rows where ``mask``), (t, w); positions no row
    reaches get the mean over every masked token."""
    return mean_from_sums(*positional_sums(acts, mask), t, dtype=acts.dtype)


def reference_acts(lm, enc, sites: list[str], align: str, batch_size="auto",
                   acts: dict | None = None) -> dict[str, torch.Tensor]:
    """Activations of the reference prompts ``enc`` at ``sites`` (a clean pass unless
    ``acts`` has them), positions counted back from the last token for ``align`` end."""
    if acts is None:
        ids = np.zeros((len(enc.lengths), 1), dtype=np.int64)
        acts = clean_pass(lm, enc, ids, sites=sites, batch_size=batch_size).acts
    if align == "end":
        ref_len = torch.as_tensor(enc.lengths)
        t_ref = enc.attention_mask.shape[1]
        back = (ref_len[:, None] - 1 - torch.arange(t_ref)[None, :]).clamp(min=0)
        acts = {k: v.gather(1, back[..., None].expand_as(v)) for k, v in acts.items()}
    return acts


def reference_sums(lm, texts: list[str], names: list[str], sites: list[str], align: str,
                   batch_size="auto") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Phase 1 of a sharded mean ablation: per site, the sums and counts by position of
    these reference prompts' activations (:func:`positional_sums`)."""
    enc = lm.encode(texts, names=names, device="cpu")
    acts = reference_acts(lm, enc, sites, align, batch_size)
    mask = enc.attention_mask.bool()
    return {s: positional_sums(acts[s], mask) for s in sites}


def draw_donors(names: list[str], lengths: list[int], ref_names: list[str],
                ref_lengths: list[int], samples: int, seed: int) -> np.ndarray:
    """(N, samples) reference rows: another prompt at least as long, drawn with the seed."""
    rng = np.random.default_rng(seed)
    ref_len = np.asarray(ref_lengths)
    ref_ids = np.asarray(ref_names, dtype=object)
    out = np.zeros((len(names), samples), dtype=np.int64)
    for i, (pid, length) in enumerate(zip(names, lengths, strict=True)):
        ok = np.flatnonzero((ref_len >= length) & (ref_ids != pid))
        if len(ok) == 0:
            raise InputError(f"--kind resample: prompt {pid} ({length} tokens) has no other "
                             "reference prompt at least as long to resample from")
        out[i] = ok[rng.integers(len(ok), size=samples)]
    return out


def save_sums(sums: dict[str, tuple[torch.Tensor, torch.Tensor]], dest: str) -> None:
    """Write :func:`reference_sums` (or their reduction) to a safetensors file."""
    from dolm.formats import atomic_path
    from safetensors.torch import save_file

    tensors = {}
    for s, (total, count) in sums.items():
        tensors[f"total.{s}"], tensors[f"count.{s}"] = total.contiguous(), count.contiguous()
    with atomic_path(dest) as tmp:
        save_file(tensors, str(tmp))


def load_sums(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The sums and counts :func:`save_sums` wrote, by site."""
    from safetensors.torch import load_file

    t = load_file(path)
    return {k[len("total."):]: (v, t["count." + k[len("total."):]])
            for k, v in t.items() if k.startswith("total.")}


def reduce_sums(partials: list[str], dest: str) -> None:
    """Phase 1's reduction: the shards' sums and counts added up by site and position."""
    parts = [load_sums(p) for p in partials]
    sites = list(dict.fromkeys(s for part in parts for s in part))
    save_sums({s: add_sums([part[s] for part in parts if s in part]) for s in sites}, dest)


class Ablator:
    """Runs a list of conditions over a prompt set on a loaded model."""

    def __init__(self, lm, targets: list[Targets], texts: list[str], conditions: list[Condition],
                 positions=("all", None), ref_texts: list[str] | None = None,
                 ref_names: list[str] | None = None, seed: int = 0, batch_size="auto",
                 progress=None, align: str = "start",
                 mean_sums: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.lm = lm
        self.targets = targets
        self.names = [t.prompt_id for t in targets]
        self.conditions = conditions
        self.seed = seed
        self.batch_size = batch_size
        self.progress = progress
        self.enc = lm.encode(texts, names=self.names, device="cpu")
        self.pos_mask = position_mask(self.enc, positions, self.names)
        self.ref_texts = ref_texts
        self.ref_names = ref_names
        self.align = align
        self.mean_sums = mean_sums  # --kind mean over shards: the reduced sums and counts

    def run(self) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
        """Clean metrics, and metrics per condition (name -> (N,) arrays)."""
        lm, conds = self.lm, self.conditions
        n = len(self.targets)
        sites = list(dict.fromkeys(s for c in conds for s in c.cset.sites))
        cond_start = [rows_start(lm, c.cset.sites) for c in conds]
        kinds = {c.kind for c in conds}
        need_vals = sites if "resample" in kinds or ("mean" in kinds
                                                     and self.mean_sums is None) else []
        own_ref = self.ref_texts is None
        ids = ids_matrix(self.targets)
        clean = clean_pass(lm, self.enc, ids, starts=set(cond_start),
                           sites=need_vals if own_ref else [], batch_size=self.batch_size,
                           needs_embed=writes_embed(lm, sites))
        t_max = self.enc.input_ids.shape[1]
        lengths = torch.as_tensor(self.enc.lengths)
        steps = torch.arange(t_max)
        if self.align == "end":  # index j counts back from each prompt's last token
            gidx = (lengths[:, None] - 1 - steps[None, :]).clamp(min=0)
        else:
            gidx = steps[None, :].expand(len(lengths), t_max)
        means, refs, donors = {}, {}, None
        if self.mean_sums is not None:
            means = {s: mean_from_sums(*self.mean_sums[s], t_max) for s in sites}
        if need_vals:
            if own_ref:
                ref_enc, ref_names = self.enc, self.names
                ref_acts = reference_acts(lm, ref_enc, sites, self.align, acts=clean.acts)
            else:
                ref_enc = lm.encode(self.ref_texts, names=self.ref_names, device="cpu")
                ref_acts = reference_acts(lm, ref_enc, need_vals, self.align, self.batch_size)
                ref_names = self.ref_names
            ref_mask = ref_enc.attention_mask.bool()
            if "mean" in kinds and self.mean_sums is None:
                means = {s: positional_mean(ref_acts[s], ref_mask, t_max) for s in sites}
            pad = max(0, t_max - ref_enc.input_ids.shape[1])
            refs = ({s: torch.nn.functional.pad(ref_acts[s], (0, 0, 0, pad)) for s in sites}
                    if "resample" in kinds else {})
            n_samples = 1 + max((c.sample or 0) for c in conds)
            donors = (draw_donors(self.names, self.enc.lengths, ref_names, ref_enc.lengths,
                                  n_samples, self.seed) if "resample" in kinds else None)
        # variants: condition-major
        v_cond = np.repeat(np.arange(len(conds)), n)
        v_prompt = np.tile(np.arange(n), len(conds))
        v_start = np.asarray(cond_start, dtype=np.int64)[v_cond]
        v_kind = np.asarray([c.kind for c in conds], dtype=object)[v_cond]
        sample = np.asarray([c.sample or 0 for c in conds])[v_cond]
        site_sets = [set(c.cset.sites) for c in conds]
        in_site = {s: np.asarray([s in ss for ss in site_sets]) for s in sites}
        pos_mask = self.pos_mask

        def make_writes(rows: np.ndarray, t: int) -> dict:
            writes = {}
            rc = v_cond[rows]
            for s in sites:
                hit = in_site[s][rc]
                if not hit.any():
                    continue

                def value_fn(act_rows, sel, s=s):
                    vr = rows[sel.numpy()]
                    new = torch.zeros_like(act_rows, dtype=torch.float32)
                    kind = v_kind[vr]
                    tt = act_rows.shape[1]
                    m = np.flatnonzero(kind == "mean")
                    if len(m):
                        new[m] = means[s][gidx[v_prompt[vr[m]], :tt]]
                    r = np.flatnonzero(kind == "resample")
                    if len(r):
                        p = v_prompt[vr[r]]
                        d = torch.as_tensor(donors[p, sample[vr[r]]])
                        new[r] = refs[s][d[:, None], gidx[p, :tt]]
                    return new

                writes[s] = row_writer(np.flatnonzero(hit), pos_mask[v_prompt[rows[hit]]][:, :t],
                                       value_fn)
            return writes

        bar = self.progress(len(v_cond)) if self.progress else None
        reads = run_variants(lm, clean, v_prompt, v_start, make_writes, self.batch_size,
                             progress=bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        clean_m = metrics_table(clean.read, self.targets)
        per = [metrics_table(reads[v_cond == c], self.targets) for c in range(len(conds))]
        return clean_m, per


def effects_rows(lm, targets: list[Targets], conds: list[Condition], clean: dict,
                 per: list[dict], positions_label: str):
    """The tidy effects table: baseline rows, then one block per condition."""
    import pandas as pd
    from dolm.formats import frame

    pids = [t.prompt_id for t in targets]
    frames = effect_frames(pids, clean, clean, dict(tool="ablate", intervention="baseline",
                                                    kind="none"))
    for c, vals in zip(conds, per, strict=True):
        at = "" if positions_label == "all" else f"@{positions_label}"
        sample_txt = f" #{c.sample}" if c.sample is not None else ""
        fields = dict(tool="ablate", intervention=f"{c.kind} {c.cset.name}{at}{sample_txt}",
                      site=c.cset.site, layer=c.cset.layer(lm), head=c.cset.head(lm),
                      kind=c.kind, component=c.cset.label, sample=c.sample)
        frames += effect_frames(pids, vals, clean, fields)
    return frame(pd.concat(frames, ignore_index=True) if frames else [], "effects")
