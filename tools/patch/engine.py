"""The patching engine: exact patching by layer stepping, and attribution patching.

Exact patching (fast by design)
-------------------------------
Every patch variant (a *cell*: one instance, a set of sites, a range of positions) is
one row of a batch. A cell whose first patched site is at layer ``l`` starts from the
base run's cached ``resid_pre.l`` (layers below are unchanged by the patch), so a grid
costs the layer-passes it needs and no more. Cells are sorted by start layer and cut
into batches; inside a batch a cell *joins* at its start layer (its row is appended to
the running hidden states), so rows of every start layer share one batch. After the
last block only the position the metric reads goes through the final norm and the
unembedding. Where the model allows it (``lm.supports_prefix_kv()``), positions before a
batch's first patched position are not recomputed at all: their keys/values come from the
base run (``CachedRuns.kv``) and cells are ordered by first patched position;
:class:`BatchPlan` chooses where batches end (cutting where that position jumps when the
recomputed positions would cost more than the extra layer steps). The clean and the
corrupted cache runs are one set of forwards (:func:`forward_pair`), unembedded only at
the positions the metric reads.

``resid_pre.l`` and ``resid_post.l`` (= ``resid_pre.(l+1)``) patches are written
directly into the running hidden states at the entry of a layer; the sites inside a
block (``resid_mid``, ``attn_out``, ``mlp_out``, ``head.L.H``) are written by one
``lm.trace(write=...)`` per batch whose functions patch only their rows.

Blocks are run with the per-block arguments the model itself computes
(``lm.layer_context``) for one unpadded row of the batch's length: rows are right-padded
and attention is causal, so pad positions never reach a real position and one context
broadcasts over any number of rows.

Attribution patching
--------------------
``(a_source - a_base) . d metric / d a_base`` for every site and position, from one
forward of the source run, one forward of the base run and one backward.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from dolm.engine import entry_layer, entry_site, row_writer, rows_start, run_rows
from dolm.engine import unembed as unembed_at
from dolm.metrics import read_logits


@dataclass
class Cell:
    """One patch variant: instance ``inst``, sites, base positions ``[lo, hi)`` (or an
    explicit tuple ``positions``)."""

    inst: int
    sites: tuple[str, ...]
    lo: int
    hi: int
    start: int = 0
    positions: tuple[int, ...] | None = None  # explicit positions (overrides lo/hi)


@dataclass
class CachedRuns:
    """Cached states of the base and source runs of a group of instances.

    ``base_entry[l]``: ``resid_pre.l`` of the base runs (``l = n_layers``: last block
    output), (n_base, T, d). ``src[key]``: source states; key is ``entry.l`` or an
    in-block site name. Per instance: ``inst_base``/``inst_src`` rows, ``shift`` (source
    position = base position + shift), ``t_base`` (base length), ``ids`` (token ids the
    metric reads, (n_inst, K)). ``kv``: see below.
    """

    base_entry: dict[int, torch.Tensor]
    src: dict[str, torch.Tensor]
    inst_base: torch.Tensor
    inst_src: torch.Tensor
    shift: torch.Tensor
    t_base: torch.Tensor
    ids: torch.Tensor
    contexts: dict[int, object] = field(default_factory=dict)
    #: per layer, the base runs' (keys, values) ((n_base, kv_heads, T, head_dim)), when the
    #: model reuses the unchanged prefix's keys/values (``lm.supports_prefix_kv()``)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def src_key(lm, name: str) -> str:
    e = entry_layer(lm, name)
    return f"entry.{e}" if e is not None else name


def cache_sites(lm, keys) -> list[str]:
    """Site names to read in a run for these source keys / base entry layers."""
    out = []
    for k in keys:
        if isinstance(k, int) or k.startswith("entry."):
            out.append(entry_site(lm, k if isinstance(k, int) else int(k.split(".")[1])))
        else:
            out.append(k)
    return list(dict.fromkeys(out))


def site_for_key(lm, key) -> str:
    return cache_sites(lm, [key])[0]


def _gather_src(lm, runs: CachedRuns, key: str, inst: torch.Tensor, t: int) -> torch.Tensor:
    """Source states of ``key`` for instances ``inst`` in base coordinates: (k, t, d)."""
    src = runs.src[key]
    dev = src.device
    inst_d = inst.to(dev)
    rows = runs.inst_src.to(dev)[inst_d]
    pos = torch.arange(t, device=dev)[None, :] + runs.shift.to(dev)[inst_d][:, None]
    pos = pos.clamp(0, src.shape[1] - 1)
    return src[rows[:, None], pos]


def first_position(c: Cell) -> int:
    """The cell's first patched base position (positions before it are unchanged)."""
    return min(c.positions) if c.positions is not None else c.lo


def cell_prefix(runs: CachedRuns, c: Cell) -> int:
    """Positions of the cell whose keys/values come from the base run (0: none)."""
    return first_position(c) if runs.kv is not None else 0


@torch.no_grad()
def run_chunk(lm, runs: CachedRuns, cells: list[Cell]) -> torch.Tensor:
    """Run one batch of cells (sorted by start layer); return ``read_logits`` rows.

    With ``runs.kv`` the positions before the batch's first patched position are taken
    from the base run's keys/values and not recomputed (``run_rows(prefix=...)``).
    """
    inst = torch.tensor([c.inst for c in cells], dtype=torch.long)
    t = int(runs.t_base[inst].max())
    p = min(cell_prefix(runs, c) for c in cells)
    p = min(p, int(runs.t_base[inst].min()) - 1)
    ar = torch.arange(t)
    by_site: dict[str, list[int]] = defaultdict(list)  # site -> rows writing it
    for i, c in enumerate(cells):
        for name in c.sites:
            by_site[name].append(i)
    lo = torch.tensor([c.lo for c in cells])
    hi = torch.tensor([c.hi for c in cells])
    writes = {}
    for name, rows in by_site.items():
        r = torch.tensor(rows, dtype=torch.long)
        src = _gather_src(lm, runs, src_key(lm, name), inst[r], t)
        mask = (ar[None, :] >= lo[r][:, None]) & (ar[None, :] < hi[r][:, None])
        for q, row in enumerate(rows):
            if cells[row].positions is not None:
                mask[q] = False
                mask[q, list(cells[row].positions)] = True
        writes[name] = row_writer(r, mask[:, p:], src[:, p:])
    base_rows = runs.inst_base[inst]

    def entry(layer: int, j: int, k: int) -> torch.Tensor:
        base = runs.base_entry[layer]
        return base[base_rows[j:k].to(base.device)]

    def past(layer: int, k: int):
        keys, values = runs.kv[layer]
        rows = base_rows[:k].to(keys.device)
        return keys[rows, :, :p], values[rows, :, :p]

    h = run_rows(lm, [c.start for c in cells], entry, t, writes, contexts=runs.contexts,
                 prefix=p, past=past if p else None)
    return read_logits(unembed_at(lm, h, runs.t_base[inst] - 1 - p), runs.ids[inst])


def run_cells(lm, runs: CachedRuns, cells: list[Cell], batch_size, progress=None) -> torch.Tensor:
    """All cells, batched (``batch_size`` rows; ``auto`` backs off on out-of-memory)."""
    from dolm.models.batching import iter_batched

    for c in cells:
        c.start = rows_start(lm, c.sites)
    out = torch.empty(len(cells), runs.ids.shape[1] + 2, dtype=torch.float64)
    # cells in order of first patched position, so that a batch's rows share most of
    # their unchanged prefix (the batch reuses the keys/values before its smallest one);
    # inside a batch, rows are sorted by start layer (they join at their own layer)
    order = sorted(range(len(cells)), key=lambda i: (cell_prefix(runs, cells[i]),
                                                      cells[i].start, i))

    def fn(a: int, z: int):
        rows = sorted(order[a:z], key=lambda i: (cells[i].start, i))
        return rows, run_chunk(lm, runs, [cells[i] for i in rows])

    planner = BatchPlan(np.array([cell_prefix(runs, cells[i]) for i in order]),
                        np.array([cells[i].start for i in order]),
                        runs.t_base[torch.tensor([cells[i].inst for i in order],
                                                 dtype=torch.long)].numpy(), lm.n_layers)
    for a, z, (rows, res) in iter_batched(len(order), fn, batch_size, max_batch_size=64,
                                          cut=planner.cut):
        out[torch.tensor(rows)] = res
        if progress is not None:
            progress(z - a)
    return out


class BatchPlan:
    """Batch boundaries over cells in run order (first patched position ascending) that
    minimise the layer-steps' cost, at most ``size`` rows a batch.

    A batch steps positions ``p..t-1`` (``p``: its first cell's prefix, ``t``: its
    longest base) for every row that has joined by each layer, so a step costs about
    ``rows x (t - p)`` token passes plus a fixed cost per step (reading the layer's
    weights, ~``STEP_TOKENS`` token passes on a CPU). Cutting where the prefix jumps
    saves recomputed positions; filling batches saves steps. Dynamic programming over
    the cut points (each cell's batch ends at most ``size`` cells later); the plan is
    recomputed from the current cell when the size changes (out-of-memory back-off).
    Boundaries change only which rows share a batch, not any row's result.
    """

    STEP_TOKENS = 40

    def __init__(self, prefix: np.ndarray, start: np.ndarray, t_base: np.ndarray,
                 n_layers: int):
        self.prefix, self.start, self.t_base = prefix, start, t_base
        self.n_layers = n_layers
        self.stops: dict[int, int] = {}
        self.size = None

    def cut(self, i: int, size: int) -> int:
        if size != self.size or i not in self.stops:
            self.size = size
            self.stops = self._plan(i, size)
        return self.stops[i]

    def _plan(self, first: int, size: int) -> dict[int, int]:
        n = len(self.prefix)
        layers = np.arange(self.n_layers)
        best = np.full(n + 1, np.inf)
        best[first] = 0.0
        arg = np.zeros(n + 1, dtype=np.int64)
        for z in range(first + 1, n + 1):
            a0 = max(first, z - size)
            joined = (self.start[a0:z, None] <= layers[None, :]).astype(np.int64)
            rows = np.cumsum(joined[::-1], axis=0)[::-1]  # rows of [a, z) by layer
            t = np.maximum.accumulate(self.t_base[a0:z][::-1])[::-1]
            width = np.maximum(t - self.prefix[a0:z], 1)
            tokens = rows * width[:, None]
            cost = (tokens + self.STEP_TOKENS * (tokens > 0)).sum(axis=1) + best[a0:z]
            k = int(np.argmin(cost))
            best[z], arg[z] = cost[k], a0 + k
        stops, z = {}, n
        while z > first:
            stops[int(arg[z])] = z
            z = int(arg[z])
        return stops


# --------------------------------------------------------------------- cache runs


def forward_runs(lm, input_ids: torch.Tensor, lengths: list[int], sites: list[str],
                 embed_noise=None, batch_size="auto", ids: torch.Tensor | None = None,
                 kv: list | None = None, kv_rows: slice | None = None):
    """Full forwards of padded ``input_ids`` reading ``sites``.

    ``embed_noise(a, z)``: optional (z - a, T, d) tensor added to the ``embed`` output of
    rows a..z. Returns (dict site -> (N, T, d) on the model's device, read rows (N, K+2)
    at each row's last position when ``ids`` is given; only those positions are
    unembedded where the model takes ``logits_to_keep``). ``kv``: a list that receives
    every layer's (keys, values) (``lm.forward_kv``) of the rows ``kv_rows`` (all rows
    when None).
    """
    from dolm.models.batching import iter_batched

    n, t = input_ids.shape
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    store: dict[str, list[torch.Tensor]] = defaultdict(list)
    reads: list[torch.Tensor] = []
    kv_parts: list[list] = []
    keep_ok = ids is not None and lm.accepts("logits_to_keep")
    kv_lo, kv_hi = (0, n) if kv_rows is None else (kv_rows.start or 0, kv_rows.stop)

    @torch.no_grad()
    def fn(a: int, z: int):
        write = None
        if embed_noise is not None:
            noise = embed_noise(a, z)

            def add(act, bi, noise=noise):
                return act + noise.to(device=act.device, dtype=act.dtype)

            write = {"embed": add}
        ids_a, mask_a = input_ids[a:z].to(lm.device), mask[a:z].to(lm.device)
        last = torch.tensor([x - 1 for x in lengths[a:z]])
        kwargs, col = {}, last
        if keep_ok:  # unembed only the positions read (the rows' last ones)
            keep, col = torch.unique(last, return_inverse=True)
            kwargs["logits_to_keep"] = keep.to(lm.device)
        layer_kv = None
        with lm.trace(read=sites, write=write) as tr:
            if kv is None or z <= kv_lo or a >= kv_hi:
                out = lm.model(input_ids=ids_a, attention_mask=mask_a, use_cache=False,
                               **kwargs)
            else:
                out, layer_kv = lm.forward_kv(ids_a, mask_a, **kwargs)
                r0, r1 = max(kv_lo, a) - a, min(kv_hi, z) - a
                layer_kv = [(k[r0:r1], v[r0:r1]) for k, v in layer_kv]
        vals = {s: tr[s].clone() for s in sites}
        if layer_kv is not None:
            vals["kv"] = layer_kv
        rd = None
        if ids is not None:
            if out.logits.shape[1] != (len(kwargs["logits_to_keep"]) if kwargs else t):
                col = last  # a model that took logits_to_keep but kept every position
            logits = out.logits[torch.arange(z - a), col.to(out.logits.device)]
            rd = read_logits(logits, ids[a:z])
        return vals, rd

    for _, _, (vals, rd) in iter_batched(n, fn, batch_size, max_batch_size=64):
        if "kv" in vals:
            kv_parts.append(vals.pop("kv"))
        for s, v in vals.items():
            store[s].append(v)
        if rd is not None:
            reads.append(rd)
    cat = {s: torch.cat(v, dim=0) for s, v in store.items()}
    if kv is not None:
        kv[:] = [(torch.cat([part[i][0] for part in kv_parts]),
                  torch.cat([part[i][1] for part in kv_parts])) for i in range(lm.n_layers)]
    return cat, (torch.cat(reads, dim=0) if reads else None)


def forward_pair(lm, clean: tuple, cor: tuple, sites: list[str], embed_noise=None,
                 batch_size="auto", kv_of: str | None = None):
    """The clean and the corrupted runs as one set of forwards (rows share the weight
    reads), split back into two :func:`forward_runs` results.

    ``clean``/``cor``: (input_ids (N, T), lengths, read ids (N, K)); ``embed_noise``
    applies to the corrupted rows only; ``kv_of`` ("clean" / "cor" / None): whose keys
    and values to return as a third item (list per layer, cut to that run's T).
    """
    (c_ids, c_len, c_read_ids), (x_ids, x_len, x_read_ids) = clean, cor
    n_c, t_c, t_x = c_ids.shape[0], c_ids.shape[1], x_ids.shape[1]
    t = max(t_c, t_x)

    def pad(x):
        return torch.nn.functional.pad(x, (0, t - x.shape[1]))

    input_ids = torch.cat([pad(c_ids), pad(x_ids)])
    noise_all = None
    if embed_noise is not None:
        def noise_all(a: int, z: int):
            out = torch.zeros(z - a, t, lm.d_model)
            lo, hi = max(a, n_c), max(z, n_c)
            if hi > lo:
                part = embed_noise(lo - n_c, hi - n_c)
                out[lo - a:hi - a, :part.shape[1]] = part
            return out

    kv = [] if kv_of else None
    rows = slice(0, n_c) if kv_of == "clean" else slice(n_c, input_ids.shape[0])
    cache, read = forward_runs(lm, input_ids, list(c_len) + list(x_len), sites,
                               embed_noise=noise_all, batch_size=batch_size,
                               ids=torch.cat([c_read_ids, x_read_ids]), kv=kv,
                               kv_rows=rows if kv_of else None)
    clean_out = ({s: v[:n_c, :t_c] for s, v in cache.items()}, read[:n_c])
    cor_out = ({s: v[n_c:, :t_x] for s, v in cache.items()}, read[n_c:])
    if kv is not None:
        t_kv = t_c if kv_of == "clean" else t_x
        kv = [(k[:, :, :t_kv], v[:, :, :t_kv]) for k, v in kv]
    return clean_out, cor_out, kv


# --------------------------------------------------------------------- attribution


def attribution_grads(lm, input_ids, lengths, sites, ids, metric: str, embed_noise=None,
                      batch_size="auto"):
    """Base-run activations and metric gradients at ``sites``.

    Returns (acts, grads, reads): dicts site -> (N, T, d) and the read rows.
    The metric summed over rows is differentiated once (rows are independent).
    """
    from dolm.models.batching import iter_batched

    n, t = input_ids.shape
    mask = torch.zeros(n, t, dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    acts: dict[str, list] = defaultdict(list)
    grads: dict[str, list] = defaultdict(list)
    reads = []
    params = [p for p in lm.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)

    def fn(a: int, z: int):
        zs: dict[str, torch.Tensor] = {}
        seen: dict[str, torch.Tensor] = {}

        def adder(name):
            def add(act, bi):
                zero = torch.zeros_like(act, requires_grad=True)
                zs[name] = zero
                seen[name] = act.detach()
                return act + zero

            return add

        write = {s: adder(s) for s in sites}
        if embed_noise is not None:
            noise = embed_noise(a, z)

            def add_noise(act, bi, noise=noise):
                return act + noise.to(device=act.device, dtype=act.dtype)

            write["embed"] = add_noise
        with torch.enable_grad(), lm.trace(write=write):
            out = lm.model(input_ids=input_ids[a:z].to(lm.device),
                           attention_mask=mask[a:z].to(lm.device), use_cache=False)
            last = torch.tensor([x - 1 for x in lengths[a:z]], device=out.logits.device)
            logits = out.logits[torch.arange(z - a, device=last.device), last].float()
            rid = ids[a:z].to(logits.device)
            if metric == "logit_diff":
                m = logits.gather(1, rid[:, :1]) - logits.gather(1, rid[:, 1:2])
            else:
                m = torch.softmax(logits, dim=-1).gather(1, rid[:, :1])
            names = list(zs)
            gs = torch.autograd.grad(m.sum(), [zs[k] for k in names], allow_unused=True)
        res_a = {k: seen[k] for k in names}
        res_g = {k: (g if g is not None else torch.zeros_like(seen[k])) for k, g in
                 zip(names, gs, strict=True)}
        return res_a, res_g, read_logits(logits.detach(), ids[a:z])

    try:
        for _, _, (ra, rg, rd) in iter_batched(n, fn, batch_size, max_batch_size=64):
            for k in ra:
                acts[k].append(ra[k])
                grads[k].append(rg[k])
            reads.append(rd)
    finally:
        for p in params:
            p.requires_grad_(True)
    return ({k: torch.cat(v) for k, v in acts.items()},
            {k: torch.cat(v) for k, v in grads.items()}, torch.cat(reads))


def attribution_cells(lm, cells: list[Cell], base_acts, grads, src_acts, inst_base, inst_src,
                      shift) -> torch.Tensor:
    """First-order metric change of each cell: sum over its sites and positions of
    ``(a_src - a_base) . grad``. Returns (n_cells,) float64."""
    contrib: dict[str, torch.Tensor] = {}
    for name in base_acts:
        a = base_acts[name].float()
        g = grads[name].float()
        s = src_acts[name].float()
        n_inst = inst_base.shape[0]
        t = a.shape[1]
        pos = torch.arange(t)[None, :] + shift[:, None]
        pos = pos.clamp(0, s.shape[1] - 1)
        s_al = s[inst_src[:, None], pos]  # (n_inst, t, d)
        a_i = a[inst_base]
        g_i = g[inst_base]
        contrib[name] = ((s_al - a_i) * g_i).sum(-1).double()  # (n_inst, t)
        del n_inst
    out = torch.zeros(len(cells), dtype=torch.float64)
    for i, c in enumerate(cells):
        tot = 0.0
        for name in c.sites:
            if c.positions is not None:
                tot += float(contrib[name][c.inst, list(c.positions)].sum())
            else:
                tot += float(contrib[name][c.inst, c.lo:c.hi].sum())
        out[i] = tot
    return out
