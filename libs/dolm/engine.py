"""The one intervention engine: batches of variant rows stepped through the layers.

A *variant row* is a prompt run with writes: it has a **start layer** (the first layer
whose computation the writes change; the layers below are taken from a cached clean run),
writes at the **entry** of a layer (``resid_pre.l`` and ``resid_post.(l-1)``: changes to
the hidden states before block ``l``) and writes **inside** blocks (``attn_out``,
``mlp_out``, ``resid_mid``, ``head``, ``embed``, ``final_norm``, ``logits``: hooks of
``lm.trace``). Tools describe rows; only this module steps layers.

:func:`run_rows` is the scheduler. Rows are sorted by start layer; the batch begins with
the rows of the lowest start and every other row *joins* at its own start layer (its
cached entry state is appended to the running hidden states), so rows of every start
layer share one batch and each row costs exactly the layers it needs. Blocks run through
``LoadedModel.run_layers`` with the per-block arguments the model computes for one
unpadded row of the batch's length: rows are right-padded and attention is causal, so pad
positions never reach a real position and one context broadcasts over any number of rows.

Prefix KV reuse: rows that change no position before ``p`` need not recompute those
positions in any layer; their keys/values come from the clean run (``lm.forward_kv``) and
only positions ``p..`` are stepped (``run_rows(prefix=p, past=...)``), for every model
whose blocks take a KV cache (``lm.supports_prefix_kv()``, checked against the full
recompute; others keep ``prefix=0``). Rows are right-padded, so a prefix shorter than
every row's patched position holds only real tokens.

The one start-layer rule is :func:`start_layer`; :func:`entry_site` names the cached
state a row starting at a layer joins with; :func:`row_writer` is the one write function
(rows of the batch, a position mask, new values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack

import torch

#: site kinds written into the hidden states at a layer's entry (not by a hook)
ENTRY_KINDS = ("resid_pre", "resid_post")
#: site kinds that see every position of the unembedding's input
OUTPUT_KINDS = ("final_norm", "logits")


def entry_layer(lm, site: str) -> int | None:
    """Layer at whose entry a residual-stream site is written (None: written by a hook)."""
    s = lm.parse_site(site)
    if s.kind == "resid_pre":
        return int(s.layer)
    if s.kind == "resid_post":
        return int(s.layer) + 1
    return None


def start_layer(lm, site: str) -> int:
    """First layer a run writing ``site`` has to compute (the one start-layer rule).

    ``resid_pre.l`` -> l; ``resid_post.l`` -> l + 1 (both written at that layer's
    entry); a site inside block l -> l; ``embed`` -> 0 (the row runs from its tokens);
    ``final_norm``/``logits`` -> n_layers (no block is recomputed).
    """
    e = entry_layer(lm, site)
    if e is not None:
        return e
    s = lm.parse_site(site)
    if s.kind == "embed":
        return 0
    if s.kind in OUTPUT_KINDS:
        return lm.n_layers
    return int(s.layer)


def rows_start(lm, sites: Sequence[str]) -> int:
    """Start layer of a row writing all of ``sites`` (n_layers when there are none)."""
    return min((start_layer(lm, s) for s in sites), default=lm.n_layers)


def entry_site(lm, layer: int) -> str:
    """The site holding the hidden states at the entry of ``layer`` (n_layers: the last
    block's output)."""
    return f"resid_pre.{layer}" if layer < lm.n_layers else f"resid_post.{lm.n_layers - 1}"


def writes_embed(lm, sites) -> bool:
    return any(lm.parse_site(s).kind == "embed" for s in sites)


def row_writer(rows, mask: torch.Tensor | None, value) -> Callable:
    """A write ``fn(act, batch_index)`` changing only batch rows ``rows``.

    ``mask``: (len(rows), T) bool of the positions to change, or None (all positions);
    ``value``: a tensor shaped like ``act[rows]`` (its first T positions are used) or a
    function ``value(act_rows, rows) -> new values``. Used for hooks and entry writes.
    """
    sel = torch.as_tensor(rows, dtype=torch.long)

    def fn(act, batch_index=None):
        if len(sel) == 0:
            return act
        r = sel.to(act.device)
        old = act[r]
        new = value(old, sel) if callable(value) else value
        if act.dim() == 3 and new.dim() == 3:
            new = new[:, : act.shape[1]]
        new = new.to(device=act.device, dtype=act.dtype)
        if mask is not None and act.dim() == 3:
            m = mask[:, : act.shape[1]].to(act.device)[..., None]
            new = torch.where(m, new, old)
        out = act.clone()
        out[r] = new
        return out

    return fn


def split_writes(lm, writes: dict) -> tuple[dict[int, list[Callable]], dict]:
    """``{site: fn}`` -> (entry layer -> [fn], in-block ``{site: fn}`` for ``lm.trace``)."""
    entry: dict[int, list[Callable]] = {}
    block = {}
    for site, fn in (writes or {}).items():
        e = entry_layer(lm, site)
        if e is None:
            block[site] = fn
        else:
            entry.setdefault(e, []).append(fn)
    return entry, block


def context_for(lm, t: int, cache: dict | None = None, prefix: int = 0):
    """Per-block arguments for one unpadded row of length ``t`` whose positions before
    ``prefix`` come from cached keys/values (cached in ``cache``)."""
    ctx = cache.get((t, prefix)) if cache is not None else None
    if ctx is None:
        ctx = lm.layer_context(torch.ones(1, t, dtype=torch.long, device=lm.device),
                               prefix=prefix)
        if cache is not None:
            cache[(t, prefix)] = ctx
    return ctx


def run_rows(lm, starts: Sequence[int], entry: Callable[[int, int, int], torch.Tensor], t: int,
             writes: dict | None = None, *, tokens: torch.Tensor | None = None,
             contexts: dict | None = None, prefix: int = 0,
             past: Callable[[int, int], tuple] | None = None) -> torch.Tensor:
    """Step one batch of rows through the layers; return the last block's output.

    ``starts``: each row's start layer, non-decreasing. ``entry(layer, a, z)``: the
    cached hidden states at the entry of ``layer`` for rows ``a..z`` ((z - a, >= t, d)).
    ``writes``: ``{site: fn(act, batch_index)}`` (see :func:`row_writer`); each function
    only touches rows whose start is at or below its site's layer. ``tokens``: (B, t) ids
    of the rows that write ``embed`` (they start at 0 and run from their tokens).

    KV reuse: with ``prefix = p > 0`` no row changes a position before ``p``, so those
    positions are not recomputed: their keys/values in every layer come from the clean
    run, ``past(layer, k) -> (keys, values)`` of rows ``0..k`` at positions ``< p``
    ((k, kv_heads, >= p, head_dim), e.g. from ``lm.forward_kv``). Only positions
    ``p..t-1`` are stepped: writes and the result (B, t - p, d) are in those coordinates
    (position ``q`` is index ``q - p``). Needs ``lm.supports_prefix_kv()``.
    """
    n, b = lm.n_layers, len(starts)
    if prefix and (past is None or tokens is not None):
        raise ValueError("run_rows: a prefix needs past keys/values and no embed rows")
    entry_writes, block_writes = split_writes(lm, writes)
    ctx = context_for(lm, t, contexts, prefix)
    dev = lm.device
    h = None
    j = 0
    with ExitStack() as stack:
        if block_writes:
            stack.enter_context(lm.trace(write=block_writes))
        for lyr in range(int(starts[0]), n + 1):
            k = j
            while k < b and starts[k] == lyr:
                k += 1
            if k > j:
                if lyr == 0 and tokens is not None:
                    new = lm.embed_resid(tokens[j:k].to(dev))
                else:
                    new = entry(lyr, j, k)[:, prefix:t].to(device=dev, dtype=lm.dtype)
                h = new if h is None else torch.cat([h.to(new.device), new], dim=0)
                j = k
            for fn in entry_writes.get(lyr, ()):
                h = fn(h, None)
            if lyr < n:
                kv = _prefix_past(past, j, prefix) if prefix else None
                h = lm.run_layers(h, lyr, lyr + 1, ctx, past=kv)
    return h


def _prefix_past(past, k: int, prefix: int) -> Callable[[int], tuple]:
    """``past`` for the ``k`` rows in the batch, cut to the prefix positions."""

    def kv(layer: int):
        keys, values = past(layer, k)
        return keys[..., :prefix, :], values[..., :prefix, :]

    return kv


def unembed(lm, h: torch.Tensor, positions: torch.Tensor | None = None, *,
            writes: dict | None = None) -> torch.Tensor:
    """Logits of the last block's output ``h`` (B, t, d) at ``positions``.

    ``positions``: (B,) -> (B, vocab); (B, k) -> (B, k, vocab); None -> every position.
    Writes at ``final_norm``/``logits`` (if any) see every position, as in a full forward.
    The model's logit multipliers / soft-caps (Cohere, Granite, Gemma 2) are applied.
    """
    out_writes = {s: f for s, f in (writes or {}).items()
                  if lm.parse_site(s).kind in OUTPUT_KINDS}
    if out_writes:
        with lm.trace(write=out_writes):
            logits = lm.adapter.logits_from_final_norm(lm.adapter.final_norm(h))
        return _select(logits, positions)
    return lm.adapter.logits_from_final_norm(lm.adapter.final_norm(_select(h, positions)))


def _select(x: torch.Tensor, positions) -> torch.Tensor:
    if positions is None:
        return x
    positions = torch.as_tensor(positions, device=x.device)
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, positions] if positions.dim() == 1 else x[rows[:, None], positions]
