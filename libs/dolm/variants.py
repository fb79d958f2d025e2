"""Many intervention variants of one prompt set, run along the batch dimension.

A *variant* is one row of a batch: a prompt (an index into an :class:`Encoding`) and
whatever intervention the caller attaches to it (ablating a head, adding alpha x a
direction, ...). :func:`clean_pass` runs the prompts once, unchanged, keeping the
metric reads at each prompt's last token, the residual stream at the entry of the layers
variants start at, and any site the caller asks for (e.g. the activations a mean or
resample ablation writes). :func:`run_variants` then runs the variants in batches: each
starts at its first intervened layer from the cached ``resid_pre`` (the layers below are
unchanged by the intervention) through :func:`dolm.engine.run_rows`, the one engine
(rows join the batch at their own start layer), and only the last position is unembedded.

The caller's ``make_writes(rows, t)`` returns ``{site: fn(act, batch_index)}`` for one
batch (``rows``: the variant indices of the batch rows, in order; ``t``: its padded
length), made with :func:`dolm.engine.row_writer`. The write functions must only change
their own rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dolm.engine import entry_site, run_rows, unembed
from dolm.metrics import read_logits


@dataclass
class Clean:
    """The unchanged run of a prompt set (tensors on the CPU)."""

    enc: object  # dolm.models.Encoding (CPU)
    ids: torch.Tensor  # (N, K) token ids the metrics read
    read: np.ndarray  # (N, K + 2) reads at each prompt's last token
    entry: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (N, T, d)
    acts: dict[str, torch.Tensor] = field(default_factory=dict)  # site -> (N, T, w)


@torch.no_grad()
def clean_pass(lm, enc, ids: np.ndarray, starts=(), sites=(), batch_size="auto",
               needs_embed: bool = False) -> Clean:
    """Run the prompts of ``enc`` unchanged; cache entries of ``starts`` and ``sites``.

    ``needs_embed``: variants write the ``embed`` site, so they cannot start from a
    cached residual (they run from the tokens; nothing is cached for them).
    """
    from dolm.models.batching import iter_batched

    ids_t = torch.as_tensor(ids, dtype=torch.long)
    starts = sorted({int(s) for s in starts} - ({0} if needs_embed else set()))
    entry_sites = {lyr: entry_site(lm, lyr) for lyr in starts}
    read_sites = list(dict.fromkeys(list(entry_sites.values()) + list(sites)))
    n = len(enc)
    reads, store = [], {s: [] for s in read_sites}
    t_all = enc.input_ids.shape[1]

    def fn(a: int, z: int):
        with lm.trace(read=read_sites) as tr:
            out = lm.model(input_ids=enc.input_ids[a:z].to(lm.device),
                           attention_mask=enc.attention_mask[a:z].to(lm.device),
                           use_cache=False)
        last = enc.last_index[a:z].to(out.logits.device)
        logits = out.logits[torch.arange(z - a, device=last.device), last]
        vals = {s: tr[s].detach().float().cpu().clone() for s in read_sites}
        return read_logits(logits, ids_t[a:z]), vals

    for _, _, (rd, vals) in iter_batched(n, fn, batch_size, max_batch_size=64):
        reads.append(rd)
        for s, v in vals.items():
            if v.shape[1] < t_all:  # pragma: no cover - batches share enc's padding
                v = torch.nn.functional.pad(v, (0, 0, 0, t_all - v.shape[1]))
            store[s].append(v)
    cat = {s: torch.cat(v, dim=0) for s, v in store.items()}
    clean = Clean(enc=enc, ids=ids_t, read=torch.cat(reads).numpy())
    clean.entry = {lyr: cat[s] for lyr, s in entry_sites.items()}
    clean.acts = {s: cat[s] for s in sites}
    return clean


def run_variants(lm, clean: Clean, prompts: np.ndarray, starts: np.ndarray,
                 make_writes: Callable[[np.ndarray, int], dict], batch_size="auto",
                 progress: Callable[[int], None] | None = None,
                 max_batch_size: int = 64) -> np.ndarray:
    """Metric reads (V, K + 2) of the variants (``prompts[v]``, ``starts[v]``)."""
    from dolm.models.batching import iter_batched

    prompts = np.asarray(prompts, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    v_count = len(prompts)
    order = np.lexsort((prompts, starts))
    out = np.empty((v_count, clean.ids.shape[1] + 2), dtype=np.float64)
    enc = clean.enc
    lengths = np.asarray(enc.lengths)
    contexts: dict = {}

    @torch.no_grad()
    def fn(a: int, z: int):
        rows = order[a:z]
        p = prompts[rows]
        t = int(lengths[p].max())
        writes = make_writes(rows, t)
        tokens = None if 0 in clean.entry else enc.input_ids[p][:, :t]

        def entry(layer: int, j: int, k: int) -> torch.Tensor:
            return clean.entry[layer][p[j:k]]

        h = run_rows(lm, starts[rows].tolist(), entry, t, writes, tokens=tokens,
                     contexts=contexts)
        logits = unembed(lm, h, enc.last_index[p], writes=writes)
        return read_logits(logits, clean.ids[p])

    for a, z, res in iter_batched(v_count, fn, batch_size, max_batch_size=max_batch_size):
        out[order[a:z]] = res.numpy()
        if progress is not None:
            progress(z - a)
    return out
