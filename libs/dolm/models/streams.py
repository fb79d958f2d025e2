"""Receiver inputs: per-head q/k/v input streams and the MLP's input, for edge-level work.

In a block the attention reads ``ln1(x)`` (``x`` the block's input) and computes every
head's query, key and value from it; the MLP reads ``ln2`` of the residual. Edge-level
interventions (edge patching, path patching, EAP) give each head and each of its
channels (q, k, v) *its own* input stream, and the MLP its own input, without changing
the residual stream itself. :class:`ReceiverInputs` (``lm.receiver_inputs(heads=...,
mlp=...)``) does that on the model's own modules, through the adapter's description of
the block (``ln1``, ``attn``, ``ln2``), so it serves every architecture whose attention
goes through transformers' attention interface (GPT-2, llama/mistral/qwen2 with
grouped-query attention and rotary, gpt_neox with its parallel residual, ...):

- ``heads(layer, x) -> {(head, channel): stream} | None`` is called at the pre-hook of
  ``ln1`` with the block input ``x`` (B, T, d); a stream is (B, T, d), or ``(rows,
  values)`` when only batch rows ``rows`` get their own input (``values`` (len(rows), T,
  d); the other rows keep the ordinary one). For the returned head-channels the
  attention module is run again on ``ln1(stream)`` (all streams stacked along the batch;
  the model's own projections, rotary embedding, q/k norms) up to its attention function,
  where their queries, keys and values are captured; the real attention call then uses,
  for head ``h``, the query from stream ``(h, "q")``, the key from ``(h, "k")`` and the
  value from ``(h, "v")`` (other heads and channels: the ordinary ones).
  Grouped-query attention: a query head's key and value inputs are its own; the key/value
  head computed from its stream serves that query head alone (keys and values are
  expanded to one per query head for that call).
- ``mlp(layer, x) -> new input | None`` is called at the pre-hook of the MLP's norm
  (``ln2``) with its input (the residual the MLP reads) and replaces it.

Both are gradient-transparent (a stream may carry a zero tensor that requires grad, for
attribution patching). The trace switches the model to dolm's eager attention (as q/k/v
sites do) and restores it on exit; build layer contexts inside it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dolm.errors import InputError
from dolm.models.hooks import (
    _HANDLERS,
    ATTN_IMPL,
    _input_of,
    _with_input,
    register_attention,
    release,
)

CHANNELS = ("q", "k", "v")


class _Captured(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, qkv):
        super().__init__()
        self.qkv = qkv


class _Ungrouped:
    """The attention module as the eager function sees it, with one key/value head per
    query head (keys and values were expanded per query head)."""

    def __init__(self, module):
        object.__setattr__(self, "_m", module)

    def __getattr__(self, name):
        if name == "num_key_value_groups":
            return 1
        return getattr(self._m, name)


def receiver_problem(lm) -> str | None:
    """Why per-head input streams cannot be served on ``lm`` (None: they can)."""
    ad = lm.adapter
    spec = ad.spec
    if spec.attn is None or spec.mixer:
        return f"{ad.name} blocks have no attention heads"
    for kind in ("q", "head"):
        if kind in ad.unavailable:
            return ad.unavailable[kind]
    if spec.ln1 is None:
        return f"{ad.name} blocks have no norm before the attention to give each head its input"
    return None


def _expand(x, b: int, rows: torch.Tensor):
    """Batch-``b`` tensors (in tuples/lists too) taken at batch rows ``rows`` (the stacked
    streams' rows); tensors of batch 1 broadcast and stay."""
    if isinstance(x, torch.Tensor):
        if b > 1 and x.dim() > 0 and x.shape[0] == b:
            return x[rows.to(x.device)]
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_expand(v, b, rows) for v in x)
    return x


class ReceiverInputs:
    """Context manager giving heads per-channel input streams and the MLP a new input
    (see the module doc)."""

    def __init__(self, lm, heads: Callable | None = None, mlp: Callable | None = None):
        why = receiver_problem(lm)
        if why:
            raise InputError(f"--model: per-head q/k/v inputs are not available: {why}")
        if mlp is not None and lm.adapter.spec.ln2 is None:
            raise InputError(f"--model: {lm.adapter.name} has no separate norm before the MLP "
                             "(it shares the attention's), so the MLP's input cannot be "
                             "given alone")
        self.lm, self.heads, self.mlp = lm, heads, mlp
        self._handles: list = []
        self._modules: list[int] = []
        self._saved_impl = None
        self._streams: dict[int, dict] = {}
        self._calls: dict[int, tuple] = {}
        self._capturing = False

    # ---------------------------------------------------------------- hooks
    def _ln1_hook(self, layer):
        def hook(module, args, kwargs):
            if self._capturing:
                return None
            got = self.heads(layer, _input_of(args, kwargs))
            if got:
                bad = [k for k in got if k[1] not in CHANNELS
                       or not 0 <= int(k[0]) < self.lm.n_heads]
                if bad:
                    raise InputError(f"receiver inputs: layer {layer}: no head channel {bad[0]}")
                self._streams[layer] = got
            else:
                self._streams.pop(layer, None)
            return None
        return hook

    def _attn_pre_hook(self, layer):
        def hook(module, args, kwargs):
            if not self._capturing:
                self._calls[layer] = (args, kwargs)
            return None
        return hook

    def _ln2_hook(self, layer):
        def hook(module, args, kwargs):
            new = self.mlp(layer, _input_of(args, kwargs))
            return None if new is None else _with_input(args, kwargs, new)
        return hook

    def _capture(self, layer: int, ln1, x: torch.Tensor, rows: torch.Tensor, b: int):
        """q, k, v of the attention module run on ``ln1(x)`` (x: stacked streams, row i
        a stream of batch row ``rows[i]``): its own projections and position code,
        stopped at the attention function."""
        ad = self.lm.adapter
        args, kwargs = self._calls[layer]
        if any(kwargs.get(k) is not None for k in ("past_key_values", "layer_past",
                                                   "past_key_value")):
            raise InputError("receiver inputs: the blocks were called with a KV cache; "
                             "per-head input streams need the full recompute")
        args = tuple(_expand(a, b, rows) for a in args[1:])
        kwargs = {k: _expand(v, b, rows) for k, v in kwargs.items() if k != "hidden_states"}
        if self._calls[layer][0]:
            args = (None, *args)
        self._capturing = True
        try:
            args, kwargs = _with_input(args, kwargs, ln1(x))
            ad.block_module(layer, "attn")(*args, **kwargs)
        except _Captured as got:
            return got.qkv
        finally:
            self._capturing = False
        raise InputError(f"receiver inputs: layer {layer}: the attention module did "
                         "not reach its attention function")  # pragma: no cover

    def _handler(self, layer):
        ln1 = self.lm.adapter.block_module(layer, "ln1")

        def handler(eager, module, query, key, value, attention_mask, **kwargs):
            if self._capturing:
                raise _Captured((query, key, value))
            streams = self._streams.pop(layer, None)
            if not streams:
                return eager(module, query, key, value, attention_mask, **kwargs)
            b = query.shape[0]
            parts = []  # (head, channel, batch rows or None, stream rows)
            for (h, c), val in streams.items():
                rows, xs = val if isinstance(val, tuple) else (None, val)
                parts.append((int(h), c, rows, xs))
            every = torch.arange(b)
            rows = torch.cat([every if r is None else torch.as_tensor(r).cpu()
                              for _, _, r, _ in parts])
            x = torch.cat([xs.to(query.device) for *_, xs in parts], dim=0)
            qs, ks, vs = self._capture(layer, ln1, x, rows, b)
            group = query.shape[1] // key.shape[1]
            q = query.clone()
            k = key.repeat_interleave(group, dim=1) if group > 1 else key.clone()
            v = value.repeat_interleave(group, dim=1) if group > 1 else value.clone()
            at = 0
            for h, c, r, xs in parts:
                src = slice(at, at + xs.shape[0])
                at += xs.shape[0]
                dst = slice(None) if r is None else torch.as_tensor(r).to(query.device)
                if c == "q":
                    q[dst, h] = qs[src, h]
                elif c == "k":
                    k[dst, h] = ks[src, h // group]
                else:
                    v[dst, h] = vs[src, h // group]
            mod = _Ungrouped(module) if group > 1 else module
            return eager(mod, q, k, v, attention_mask, **kwargs)

        return handler

    # ---------------------------------------------------------------- context
    def __enter__(self):
        lm, ad = self.lm, self.lm.adapter
        try:
            if self.heads is not None:
                cur = lm.model.config._attn_implementation
                if cur != ATTN_IMPL:
                    register_attention()
                    self._saved_impl = cur
                    lm.model.set_attn_implementation(ATTN_IMPL)
            for layer in range(lm.n_layers):
                if self.heads is not None:
                    attn = ad.block_module(layer, "attn")
                    handler = self._handler(layer)
                    for m in attn.modules():
                        if id(m) in _HANDLERS:
                            raise InputError("receiver inputs cannot be combined with q/k/v/"
                                             f"pattern sites of layer {layer} in one trace")
                        _HANDLERS[id(m)] = handler
                        self._modules.append(id(m))
                    self._handles.append(ad.block_module(layer, "ln1").register_forward_pre_hook(
                        self._ln1_hook(layer), with_kwargs=True))
                    self._handles.append(attn.register_forward_pre_hook(
                        self._attn_pre_hook(layer), with_kwargs=True))
                if self.mlp is not None:
                    self._handles.append(ad.block_module(layer, "ln2").register_forward_pre_hook(
                        self._ln2_hook(layer), with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self):
        release(self.lm, self._handles, self._modules, self._saved_impl)
        self._saved_impl = None
        self._streams.clear()
        self._calls.clear()

    def __exit__(self, exc_type, exc, tb):
        self._remove()
        return False


# --------------------------------------------------------------------------- projections
#: child names of an attention module and how their outputs split into (channel, head):
#: "sep" one module per channel (its output: heads x d_head), "c,h" fused (3, heads,
#: d_head) (GPT-2's c_attn), "h,c" fused (heads, 3, d_head) (GPT-NeoX), "q|k|v" fused
#: [q heads | k heads | v heads] (Phi-3)
_PROJ_LAYOUTS = (
    (("q_proj", "k_proj", "v_proj"), "sep"),
    (("c_attn",), "c,h"),
    (("query_key_value",), "h,c"),
    (("qkv_proj",), "q|k|v"),
)


def qkv_projections(lm, layer: int):
    """The q/k/v projection modules of ``layer``'s attention and their output layout
    (``(modules, layout)``; see :data:`_PROJ_LAYOUTS`), or None when dolm does not know
    them (callers then use :class:`ReceiverInputs`, which needs no layout). A layout is a
    claim: callers verify what they compute with it against the stacked streams."""
    attn = lm.adapter.block_module(layer, "attn")
    for names, layout in _PROJ_LAYOUTS:
        mods = [getattr(attn, n, None) for n in names]
        if all(m is not None for m in mods):
            return mods, layout
    return None


def split_heads(outs: list[torch.Tensor], layout: str, n_heads: int, n_kv: int,
                d_head: int) -> list[torch.Tensor]:
    """Projection outputs (..., width) -> [q (..., H, dh), k (..., Hkv, dh), v (...)]."""
    if layout == "sep":
        return [o.reshape(*o.shape[:-1], -1, d_head) for o in outs]
    o = outs[0]
    lead = o.shape[:-1]
    if layout == "c,h":
        x = o.reshape(*lead, 3, n_heads, d_head)
        return [x[..., c, :, :] for c in range(3)]
    if layout == "h,c":
        x = o.reshape(*lead, n_heads, 3, d_head)
        return [x[..., :, c, :] for c in range(3)]
    q, k, v = o.split([n_heads * d_head, n_kv * d_head, n_kv * d_head], dim=-1)
    return [t.reshape(*lead, -1, d_head) for t in (q, k, v)]
