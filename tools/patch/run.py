"""Orchestration: prompts -> instances -> cells -> effects rows and per-prompt summaries."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from dolm.engine import rows_start
from dolm.errors import InputError
from dolm.metrics import ids_matrix, logit_diff, prob_target
from dolm.positions import parse_positions
from dolm_tools.patch import engine
from dolm_tools.patch.prepare import Prompt, check_pairs, span_tokens
from dolm_tools.patch.summary import summarise

GRID_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head")
WINDOW_KINDS = ("attn_out", "mlp_out")


@dataclass
class Options:
    mode: str = "counterfactual"
    direction: str = "denoise"
    method: str = "exact"
    sites: str = "resid_pre"
    positions: str = "all"
    head_positions: str = "all"
    joint: bool = False
    window: int = 1
    align: str = "none"
    span: str = "subject"
    samples: int = 10
    noise_scale: float = 3.0
    metric: str = "logit_diff"
    seed: int = 0
    batch_size: object = "auto"
    group_cells: int = 4096
    first_index: int = 0  # of the first prompt in the whole table (noise seeds; shards)


@dataclass
class GroupResult:
    """What one group of prompts produced: the cells (one per instance and template) and
    the template each belongs to; ``out`` (exact: read rows per cell) or ``est``
    (attribution: estimated change per cell); the clean and corrupted runs' read rows;
    ``cor_map``: (prompt, noise sample) of each corrupted row (= instance)."""

    cells: list
    owners: list[int]
    out: object
    clean_read: object
    cor_read: object
    cor_map: list[tuple[int, int]]
    est: object = None


@dataclass
class Template:
    """A cell of one prompt's grid, before it is copied to each noise sample."""

    prompt: int
    grid: str
    site: str
    layer: int
    head: int | None
    window: int | None
    sites: tuple[str, ...]
    lo: int
    hi: int
    position: int | None
    positions: tuple[int, ...] | None = None
    pos_label: str | None = None


def parse_sites(lm, value: str) -> list[tuple[str, list[str]]]:
    """``--sites`` -> [(grid kind, [site names])] in the order given."""
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    if not items:
        raise InputError("--sites: expected at least one site kind or site")
    grids: dict[str, list[str]] = {}
    for item in items:
        if item in GRID_KINDS:
            pattern = "head.*.*" if item == "head" else f"{item}.*"
        else:
            pattern = item
        kind = pattern.split(".")[0]
        if kind not in GRID_KINDS:
            raise InputError(
                f"--sites: {item!r} cannot be patched by dolm-patch; expected one of "
                f"{', '.join(GRID_KINDS)} (a kind for every layer, or a site/pattern such as "
                "resid_pre.3, mlp_out.*, head.2.*)")
        try:
            names = lm.expand_sites(pattern)
        except InputError as exc:
            raise InputError(f"--sites: {exc}") from None
        lst = grids.setdefault(kind, [])
        for n in names:
            if n not in lst:
                lst.append(n)
    return list(grids.items())


def window_sites(kind: str, layer: int, window: int, n_layers: int) -> tuple[str, ...]:
    """ROME's window: layers [l - W//2, l + ceil(W/2)) clipped to the model."""
    if kind not in WINDOW_KINDS or window <= 1:
        return (f"{kind}.{layer}",)
    lo = max(0, layer - window // 2)
    hi = min(n_layers, layer - (-window // 2))
    return tuple(f"{kind}.{j}" for j in range(lo, hi))


class Patcher:
    """Runs one dolm-patch job over a list of prompts on a loaded model."""

    def __init__(self, lm, prompts: list[Prompt], opts: Options, progress=None):
        self.lm = lm
        self.prompts = prompts
        self.opts = opts
        self.progress = progress
        self.grids = parse_sites(lm, opts.sites)
        if opts.window < 1:
            raise InputError(f"--window: expected a positive integer, found {opts.window}")
        if opts.mode == "noise" and opts.samples < 1:
            raise InputError(f"--samples: expected a positive integer, found {opts.samples}")
        self.pos_kind, self.pos_arg = parse_positions(opts.positions, allow_span=True)
        self.k_ids = 2 + max((len(p.choice_ids or []) for p in prompts), default=0)
        self._encode()

    # ------------------------------------------------------------------ tokens
    def _encode(self):
        lm, ps = self.lm, self.prompts
        names = [p.prompt_id for p in ps]
        self.enc = lm.encode([p.text for p in ps], names=names, device="cpu")
        self.len_clean = list(self.enc.lengths)
        if self.opts.mode == "counterfactual":
            self.enc_cf = lm.encode([p.cf_text for p in ps], names=names, device="cpu")
            self.len_cf = list(self.enc_cf.lengths)
            check_pairs(ps, self.len_clean, self.len_cf, self.opts.align)
        else:
            self.enc_cf = None
            self.len_cf = None
            self.noise_pos = [
                span_tokens(self.enc, i, p.spans, self.opts.span, p.prompt_id, "--span")
                for i, p in enumerate(ps)
            ]
        self.ids = ids_matrix(ps)

    def _lengths(self, i: int) -> tuple[int, int]:
        """(base length, source length) of prompt i."""
        if self.opts.mode == "noise":
            return self.len_clean[i], self.len_clean[i]
        c, x = self.len_clean[i], self.len_cf[i]
        return (x, c) if self.opts.direction == "denoise" else (c, x)

    # ------------------------------------------------------------------ grid
    def templates(self, i: int) -> list[Template]:
        o, lm, p = self.opts, self.lm, self.prompts[i]
        n_base, n_src = self._lengths(i)
        lo_valid = max(0, n_base - n_src) if o.align == "last" else 0
        aligned = o.align == "last"
        t_clean = self.len_clean[i]
        base_is_clean = o.mode == "noise" or o.direction == "noise"
        if self.pos_kind == "all":
            positions = list(range(lo_valid, n_base))
        elif self.pos_kind == "last":
            positions = [n_base - 1]
        elif self.pos_kind == "span":
            toks = span_tokens(self.enc, i, p.spans, self.pos_arg, p.prompt_id, "--positions span:")
            shift = 0 if (base_is_clean or not aligned) else t_clean - n_base
            positions = sorted({q - shift for q in toks if 0 <= q - shift < n_base})
            positions = [q for q in positions if q >= lo_valid]
            if not positions:
                raise InputError(f"--positions span:{self.pos_arg}: prompt {p.prompt_id}: no "
                                 "token of the span is aligned with the other run")
        else:
            positions = []
            for q in self.pos_arg:
                qq = q + n_base if q < 0 else q
                if not (lo_valid <= qq < n_base):
                    lo_txt = lo_valid - n_base if aligned else lo_valid
                    raise InputError(
                        f"--positions: position {q} is out of range for prompt {p.prompt_id} "
                        f"({n_base} tokens; valid {lo_txt}..{n_base - 1 if not aligned else -1})")
                positions.append(qq)
            positions = sorted(set(positions))
        if self.pos_kind == "all":
            joint_label = "all"
        elif self.pos_kind == "span":
            joint_label = f"span:{self.pos_arg}"
        else:
            joint_label = ",".join(str(q - n_base if aligned else q) for q in positions)
        joint_pos = tuple(positions)
        out = []
        for kind, names in self.grids:
            for name in names:
                s = lm.parse_site(name)
                win = o.window if kind in WINDOW_KINDS else None
                sites = (window_sites(kind, s.layer, o.window, lm.n_layers)
                         if kind in WINDOW_KINDS else (name,))
                if o.joint or (kind == "head" and o.head_positions == "all"):
                    out.append(Template(i, kind, name, s.layer, s.head, win, sites,
                                        min(joint_pos), max(joint_pos) + 1, None,
                                        positions=joint_pos, pos_label=joint_label))
                    continue
                for q in positions:
                    rep = q - n_base if aligned else q
                    out.append(Template(i, kind, name, s.layer, s.head, win, sites, q, q + 1,
                                        rep))
        return out

    # ------------------------------------------------------------------ noise
    def _noise_fn(self, rows: list[tuple[int, int]], t: int):
        """rows: (prompt index, sample) per noised row -> embed_noise(a, z)."""
        import torch

        lm, o = self.lm, self.opts
        d = lm.d_model
        scale = o.noise_scale * self.embed_std

        def fn(a: int, z: int):
            out = torch.zeros(z - a, t, d)
            for r in range(a, z):
                i, s = rows[r]
                pos = self.noise_pos[i]
                g = torch.Generator().manual_seed(
                    (o.seed * 1_000_003 + (o.first_index + i) * 1009 + s * 7919 + 17)
                    % (2**62))
                out[r - a, pos] = torch.randn(len(pos), d, generator=g) * scale
            return out

        return fn

    # ------------------------------------------------------------------ run
    def run(self):
        """All prompts, in groups of about ``group_cells`` cells: (effects rows, summaries)."""
        o, lm = self.opts, self.lm
        if o.mode == "noise":
            w = lm.adapter.embed.weight
            self.embed_std = float(w.detach().float().std())
        tmpl_all = [self.templates(i) for i in range(len(self.prompts))]
        s_count = o.samples if o.mode == "noise" else 1
        total = sum(len(t) for t in tmpl_all) * s_count
        bar = self.progress(total) if self.progress else None
        rows, summaries = [], []
        i = 0
        while i < len(self.prompts):
            j, cells = i, 0
            while j < len(self.prompts) and (j == i or cells + len(tmpl_all[j]) * s_count
                                             <= o.group_cells):
                cells += len(tmpl_all[j]) * s_count
                j += 1
            group = list(range(i, j))
            res = self._run_group(group, [t for g in group for t in tmpl_all[g]],
                                  bar.update if bar else None)
            r, s = self._rows(group, tmpl_all, res)
            rows += r
            summaries += s
            i = j
        if bar is not None:
            bar.close()
        return rows, summaries

    def _run_group(self, group: list[int], templates: list[Template], tick):
        import torch

        o, lm = self.opts, self.lm
        ps = group
        t_clean = max(self.len_clean[i] for i in ps)
        clean_ids = self.enc.input_ids[ps][:, :t_clean]
        clean_len = [self.len_clean[i] for i in ps]
        ids_clean = torch.tensor(self.ids[ps])
        local = {g: k for k, g in enumerate(ps)}
        s_count = o.samples if o.mode == "noise" else 1
        # corrupted rows
        if o.mode == "counterfactual":
            t_cf = max(self.len_cf[i] for i in ps)
            cor_ids = self.enc_cf.input_ids[ps][:, :t_cf]
            cor_len = [self.len_cf[i] for i in ps]
            cor_map = [(g, 0) for g in ps]
            noise = None
        else:
            cor_map = [(g, s) for g in ps for s in range(s_count)]
            cor_ids = clean_ids.repeat_interleave(s_count, dim=0)
            cor_len = [self.len_clean[g] for g, _ in cor_map]
            noise = self._noise_fn(cor_map, t_clean)
        ids_cor = torch.tensor(self.ids[[g for g, _ in cor_map]])
        # instances: one per corrupted row
        n_inst = len(cor_map)
        inst_clean = torch.tensor([local[g] for g, _ in cor_map])
        inst_cor = torch.arange(n_inst)
        denoise = o.direction == "denoise"
        inst_base, inst_src = (inst_cor, inst_clean) if denoise else (inst_clean, inst_cor)
        shift = torch.zeros(n_inst, dtype=torch.long)
        t_base = torch.zeros(n_inst, dtype=torch.long)
        for k, (g, _) in enumerate(cor_map):
            n_base, n_src = self._lengths(g)
            t_base[k] = n_base
            shift[k] = n_src - n_base
        inst_of = instances_by_prompt(cor_map)
        cells = []
        owners = []
        for ti, tp in enumerate(templates):
            for k in inst_of[tp.prompt]:
                cells.append(engine.Cell(k, tp.sites, tp.lo, tp.hi, positions=tp.positions))
                owners.append(ti)
        grid_sites = sorted({s for tp in templates for s in tp.sites})
        if o.method == "exact":
            for c in cells:
                c.start = rows_start(lm, c.sites)
            keys = {engine.src_key(lm, s) for s in grid_sites}
            starts = {c.start for c in cells}
            sites = engine.cache_sites(lm, sorted(keys) + sorted(starts))
            sites = [s for s in sites if s]
            # one set of forwards for both runs; the base run's keys/values, when the model
            # can reuse them for the prefix
            kv_of = ("cor" if denoise else "clean") if lm.supports_prefix_kv() else None
            (clean_cache, clean_read), (cor_cache, cor_read), base_kv = engine.forward_pair(
                lm, (clean_ids, clean_len, ids_clean), (cor_ids, cor_len, ids_cor), sites,
                embed_noise=noise, batch_size=o.batch_size, kv_of=kv_of)
            base_c, src_c = (cor_cache, clean_cache) if denoise else (clean_cache, cor_cache)
            runs = engine.CachedRuns(
                base_entry={lyr: base_c[engine.site_for_key(lm, lyr)] for lyr in starts},
                src={k: src_c[engine.site_for_key(lm, k)] for k in keys},
                inst_base=inst_base, inst_src=inst_src, shift=shift, t_base=t_base,
                ids=ids_cor,  # per instance: its prompt's ids (clean and corrupted share them)
                kv=base_kv,
            )
            out = engine.run_cells(lm, runs, cells, o.batch_size, progress=tick)
            return GroupResult(cells, owners, out, clean_read, cor_read, cor_map)
        # attribution
        base_ids, base_len = (cor_ids, cor_len) if denoise else (clean_ids, clean_len)
        src_ids, src_len = (clean_ids, clean_len) if denoise else (cor_ids, cor_len)
        base_ids_tok = ids_cor if denoise else ids_clean
        base_noise = noise if denoise else None
        src_noise = None if denoise else noise
        acts, grads, b_read = engine.attribution_grads(
            lm, base_ids, base_len, grid_sites, base_ids_tok, o.metric, embed_noise=base_noise,
            batch_size=o.batch_size)
        src_acts, s_read = engine.forward_runs(lm, src_ids, src_len, grid_sites,
                                               embed_noise=src_noise, batch_size=o.batch_size,
                                               ids=ids_clean if denoise else ids_cor)
        clean_read, cor_read = (s_read, b_read) if denoise else (b_read, s_read)
        est = engine.attribution_cells(lm, cells, acts, grads, src_acts, inst_base, inst_src,
                                       shift)
        if tick:
            tick(len(cells))
        return GroupResult(cells, owners, None, clean_read, cor_read, cor_map, est)

    # ------------------------------------------------------------------ rows
    def _metrics(self, read, g: int):
        """Primary metric values, logit diff, prob and choice logits from read rows."""
        k = self.k_ids
        p = self.prompts[g]
        lt, mx = read[:, 0], read[:, k + 1]
        prob = prob_target(read)
        ld = logit_diff(read) if p.foil_id is not None else np.full_like(lt, np.nan)
        if p.choice_ids:
            ch = read[:, 2:2 + len(p.choice_ids)]
        elif p.foil_id is not None:
            ch = read[:, 0:2]
        else:
            ch = np.stack([lt, mx], axis=1)
        return ld, prob, ch

    def _rows(self, group, tmpl_all, res: GroupResult):
        o = self.opts
        cells, owners, out, cor_map, est = res.cells, res.owners, res.out, res.cor_map, res.est
        clean_read = res.clean_read.numpy()
        cor_read = res.cor_read.numpy()
        templates = [t for g in group for t in tmpl_all[g]]
        local = {g: k for k, g in enumerate(group)}
        n_t = len(templates)
        owners = np.asarray(owners)
        counts = np.bincount(owners, minlength=n_t).astype(float)
        inst_prompt = np.array([g for g, _ in cor_map])
        rows, summaries = [], []
        # clean / corrupt per prompt (corrupt: mean over samples)
        clean, corrupt = {}, {}
        for g in group:
            ld, pr, ch = self._metrics(clean_read[[local[g]]], g)
            m = np.where(inst_prompt == g)[0]
            xld, xpr, xch = self._metrics(cor_read[m], g)
            clean[g] = (ld[0], pr[0], ch[0])
            corrupt[g] = (np.mean(xld), np.mean(xpr), xch.mean(axis=0))
        if est is not None:
            patched_primary = np.zeros(n_t)
            # base value per instance + estimate
            base_read = cor_read if o.direction == "denoise" else None
            est = est.numpy()
            for ci, c in enumerate(cells):
                g = inst_prompt[c.inst]
                if o.direction == "denoise":
                    ld, pr, _ = self._metrics(base_read[[c.inst]], g)
                    base_v = ld[0] if o.metric == "logit_diff" else pr[0]
                else:
                    base_v = clean[g][0] if o.metric == "logit_diff" else clean[g][1]
                patched_primary[owners[ci]] += base_v + est[ci]
            patched_primary /= counts
            pld = patched_primary if o.metric == "logit_diff" else np.full(n_t, np.nan)
            ppr = patched_primary if o.metric == "prob_target" else np.full(n_t, np.nan)
            pch = None
        else:
            out = out.numpy()
            pld = np.zeros(n_t)
            ppr = np.zeros(n_t)
            pch_list = [None] * n_t
            # vectorised per prompt
            by_prompt: dict[int, list[int]] = {}
            for ci, c in enumerate(cells):
                by_prompt.setdefault(int(inst_prompt[c.inst]), []).append(ci)
            for g, cis in by_prompt.items():
                ld, pr, ch = self._metrics(out[cis], g)
                own = owners[cis]
                for arr, src in ((pld, ld), (ppr, pr)):
                    np.add.at(arr, own, src)
                for q, ti in enumerate(own):
                    pch_list[ti] = ch[q] if pch_list[ti] is None else pch_list[ti] + ch[q]
            pld /= counts
            ppr /= counts
            pch = [v / counts[ti] for ti, v in enumerate(pch_list)]
        method = "attribution" if est is not None else "exact"
        prefix = "attribution " if est is not None else ""
        for ti, tp in enumerate(templates):
            g = tp.prompt
            p = self.prompts[g]
            c_ld, c_pr, _ = clean[g]
            x_ld, x_pr, _ = corrupt[g]
            pos_txt = tp.pos_label if tp.position is None else str(tp.position)
            win_txt = f" w{tp.window}" if tp.window and tp.window > 1 else ""
            label = f"{prefix}{o.direction} {tp.site}@{pos_txt}{win_txt}"
            base = dict(prompt_id=p.prompt_id, tool="patch", intervention=label, site=tp.site,
                        layer=tp.layer, position=tp.position, head=tp.head, window=tp.window,
                        kind=o.direction, alpha=None, component=None, sample=None)
            metrics = []
            if p.foil_id is not None and not math.isnan(pld[ti]):
                metrics.append(("logit_diff", pld[ti], c_ld, x_ld))
            if not math.isnan(ppr[ti]):
                metrics.append(("prob_target", ppr[ti], c_pr, x_pr))
            prim = (pld[ti], c_ld, x_ld) if o.metric == "logit_diff" else (ppr[ti], c_pr, x_pr)
            metrics.append(("recovery", _recovery(*prim), prim[1], prim[2]))
            for name, v, cv, xv in metrics:
                rows.append({**base, "metric": name, "value": _f(v), "clean_value": _f(cv),
                             "corrupt_value": _f(xv)})
        summaries = summarise(self.prompts, o, templates, pld, ppr, pch, clean, corrupt, method)
        return rows, summaries


def instances_by_prompt(cor_map) -> dict[int, list[int]]:
    """Prompt index -> the instances (corrupted rows) of that prompt."""
    out: dict[int, list[int]] = {}
    for k, (g, _) in enumerate(cor_map):
        out.setdefault(g, []).append(k)
    return out


def _recovery(patched, clean, corrupt):
    den = clean - corrupt
    if not np.isfinite(den) or abs(den) < 1e-12 or not np.isfinite(patched):
        return None
    return (patched - corrupt) / den


def _f(v):
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None
