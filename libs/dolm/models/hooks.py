"""Reading and writing sites with plain PyTorch forward hooks / pre-hooks.

:class:`Trace` is what ``LoadedModel.trace(read=..., write=...)`` returns. It registers
at most one hook per HF module that carries a requested site (grouped by module, so
``head.3.*`` is one pre-hook on layer 3's output projection), and removes every hook on
exit, exceptions included. Hooks sit on the modules as loaded, so quantized
(bitsandbytes) and ``device_map`` models work unchanged.

Write functions are ``fn(act, batch_index) -> act`` (same shape); ``batch_index`` is
a LongTensor of the rows' indices (``trace(batch_index=...)``, default ``arange(batch)``).
A returned tensor is cast to the activation's dtype and device.

Order inside one module: at the attention module ``attn_out.L`` is written first, then
``resid_mid.L`` (by adjusting ``attn_out.L`` to ``new_mid - resid_pre``). A read value
is the value *after* any write at the same site (what flows downstream). Reads are
copies taken at hook time (detached unless ``detach=False``): a model that later edits
the tensor in place (Falcon adds the attention output into the MLP output with ``+=``)
does not change what was read.

``q``/``k``/``v``/``pattern`` sites run inside the attention function: the trace switches
the model to ``dolm_eager`` (registered with transformers' attention and mask interfaces),
which calls the model's own eager attention function with the trace's reads and writes
applied to its inputs and probabilities, and restores the implementation on exit.

transformers 5 quirks handled here: blocks return a tensor for most architectures but a
tuple for some (GPT-J); attention modules return ``(out, weights)`` with ``weights``
``None`` unless the eager implementation runs; hidden states may be passed
positionally or as ``hidden_states=``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from dolm.errors import DolmRuntimeError, InputError
from dolm.models.adapters import apply_ops, invert_ops
from dolm.models.sites import READ_ONLY_KINDS

QKV_KINDS = ("q", "k", "v", "pattern")
ATTN_IMPL = "dolm_eager"
"""The attention implementation a trace with q/k/v/pattern sites switches to: the model's
own eager attention function, called through :func:`_dolm_attention`."""
_HANDLERS: dict[int, object] = {}  # id(attention module) -> handler of the active trace
_REGISTERED = False


def eager_function(module):
    """The eager attention function of ``module``'s modeling file, or None."""
    import sys

    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _dolm_attention(module, query, key, value, attention_mask, **kwargs):
    eager = eager_function(module)
    handler = _HANDLERS.get(id(module))
    if handler is None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    return handler(eager, module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    """Register :data:`ATTN_IMPL` with transformers (eager masks, :func:`_dolm_attention`)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPL, _dolm_attention)
    AttentionMaskInterface.register(ATTN_IMPL, eager_mask)
    _REGISTERED = True


def release(lm, handles: list, fn_modules: list, saved_impl) -> None:
    """Remove hooks and attention-function handlers (emptying both lists) and restore the
    attention implementation ``saved_impl`` (None: it was not switched)."""
    for h in handles:
        h.remove()
    handles.clear()
    for key in fn_modules:
        _HANDLERS.pop(key, None)
    fn_modules.clear()
    if saved_impl is not None:
        lm.model.set_attn_implementation(saved_impl)


def _first(output):
    """The tensor a module contributes (item 0 of a tuple/list)."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


def _replace_first(output, new):
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    out = list(output)
    out[0] = new
    return out


def _input_of(args, kwargs):
    if args:
        return args[0]
    return kwargs["hidden_states"]


def _with_input(args, kwargs, new):
    if args:
        return (new,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = new
    return args, kwargs


class Trace:
    """Context manager that reads and writes sites during forward passes.

    ``tr[site]`` gives a read value after the forward; ``tr.values`` is a dict of all
    of them. Several forwards inside one trace overwrite the values (last wins).
    Head reads keep one (batch, seq, heads, d_head) view per layer and slice it on
    access, so reading ``head.*.*`` costs one store per layer in the forward.
    """

    def __init__(self, lm, read=(), write=None, batch_index=None, detach=True):
        self.lm = lm
        space = lm.sites
        read_names = lm.expand_sites(read) if read else []
        write_items: list[tuple[str, object]] = []
        for pattern, fn in (write or {}).items():
            if not callable(fn):
                raise InputError(f"write function for site {pattern!r} is not callable")
            for name in lm.expand_sites(pattern):
                write_items.append((name, fn))
        self.read_names = read_names
        self.write_names = [n for n, _ in write_items]
        self.detach = detach
        self.batch_index = batch_index
        self._bidx_cache = None
        self._values: dict[str, torch.Tensor] = {}
        self._head_views: dict[int, torch.Tensor] = {}
        self._head_names: dict[str, tuple[int, int]] = {}
        self._handles: list = []
        self._resid_pre: dict[int, torch.Tensor] = {}
        self._saved_attn_impl = None

        reads = [space.parse(n) for n in read_names]
        writes = [(space.parse(n), fn) for n, fn in write_items]
        for site, _ in writes:
            if site.kind in READ_ONLY_KINDS:
                what = "router logits: routing is decided inside the MoE block" \
                    if site.kind == "router" else "attention pattern; write pattern.L.H"
                raise InputError(
                    f"site {site.name!r} is read-only ({what}); write attn_out.L, "
                    "resid_mid.L, mlp_out.L or head.L.H instead"
                )
        self.needs_eager = any(s.kind == "attn" for s in reads)
        self.needs_fn = any(s.kind in QKV_KINDS for s in reads + [w for w, _ in writes])
        self._fn_modules: list[int] = []
        # group by module: key -> {"read": [...], "write": [...]}
        plan: dict[tuple, dict[str, list]] = defaultdict(lambda: {"read": [], "write": []})
        for site in reads:
            plan[self._group(site)]["read"].append(site)
        for site, fn in writes:
            plan[self._group(site)]["write"].append((site, fn))
        # resid_mid needs the block input
        for site in reads + [s for s, _ in writes]:
            if site.kind == "resid_mid":
                plan[("block_pre", site.layer)]  # noqa: B018 - ensure the group exists
        self.plan = dict(plan)
        self.plan_keys = set(self.plan)

    @staticmethod
    def _group(site):
        kind = site.kind
        if kind in ("embed", "final_norm", "logits"):
            return (kind,)
        if kind == "resid_pre":
            return ("block_pre", site.layer)
        if kind == "resid_post":
            return ("block", site.layer)
        if kind in ("attn_out", "resid_mid"):
            return ("attn", site.layer)
        if kind == "attn":
            return ("attn_pat", site.layer)
        if kind == "mlp_out":
            return ("mlp", site.layer)
        if kind == "mixer_out":
            return ("mixer", site.layer)
        if kind == "router":
            return ("router", site.layer)
        if kind == "expert":
            return ("experts", site.layer)
        if kind == "head":
            return ("attn_o", site.layer)
        if kind in QKV_KINDS:
            return ("attn_fn", site.layer)
        raise AssertionError(kind)

    def _contribution_maps(self, part: str):
        """(to_site, from_site) between a block part's output (``part`` is ``attn``,
        ``mlp`` or ``mixer``) and what the block adds to the residual (residual
        multipliers, a residual added inside the module), or ``(None, None)`` when they
        are the same tensor."""
        ad = self.lm.adapter
        scale = ad.residual_scale
        inside = part in ad.spec.residual_inside
        if scale is None and not inside:
            return None, None

        def residual(args, kwargs):
            return args[1] if len(args) > 1 else kwargs["residual"]

        def to_site(t, args, kwargs):
            if inside:
                t = t - residual(args, kwargs)
            return t * scale if scale is not None else t

        def from_site(t, args, kwargs):
            if scale is not None:
                t = t / scale
            return t + residual(args, kwargs) if inside else t

        return to_site, from_site

    # ---------------------------------------------------------------- helpers
    def _bidx(self, n: int, device) -> torch.Tensor:
        if self.batch_index is not None:
            bi = self.batch_index
            if not isinstance(bi, torch.Tensor):
                bi = torch.as_tensor(bi, dtype=torch.long)
                self.batch_index = bi
            if bi.shape[0] != n:
                raise InputError(
                    f"trace batch_index has {bi.shape[0]} rows but the batch has {n}"
                )
            if bi.device != device:
                bi = bi.to(device)
                self.batch_index = bi
            return bi
        cached = self._bidx_cache
        if cached is None or cached.shape[0] != n or cached.device != device:
            cached = torch.arange(n, device=device)
            self._bidx_cache = cached
        return cached

    def _apply(self, name, fn, act):
        new = fn(act, self._bidx(act.shape[0], act.device))
        if not isinstance(new, torch.Tensor):
            raise InputError(f"write function for site {name!r} returned {type(new).__name__}, "
                             "expected a tensor")
        if new.shape != act.shape:
            raise InputError(
                f"write function for site {name!r} returned shape {tuple(new.shape)}, "
                f"expected {tuple(act.shape)}"
            )
        if new.dtype != act.dtype or new.device != act.device:
            new = new.to(device=act.device, dtype=act.dtype)
        return new

    def _store(self, name, t):
        # a copy: the model may edit this tensor in place after the hook (falcon's
        # ``mlp_output += attention_output``); the read is the value at hook time
        self._values[name] = (t.detach() if self.detach else t).clone()

    # ---------------------------------------------------------------- hook makers
    def _simple_forward_hook(self, reads, writes, to_site=None, from_site=None):
        """Forward hook (``with_kwargs``) for modules whose (first) output is the site,
        up to an invertible map ``to_site(t, args, kwargs)`` / ``from_site``."""
        read_names = [s.name for s in reads]
        write_fns = [(s.name, fn) for s, fn in writes]
        apply, store = self._apply, self._store

        def hook(module, args, kwargs, output):
            act = _first(output)
            if to_site is not None:
                act = to_site(act, args, kwargs)
            if write_fns:
                for name, fn in write_fns:
                    act = apply(name, fn, act)
            for name in read_names:
                store(name, act)
            if write_fns:
                if from_site is not None:
                    act = from_site(act, args, kwargs)
                return _replace_first(output, act)
            return None

        return hook

    def _block_pre_hook(self, layer, reads, writes):
        read_names = [s.name for s in reads]
        needs_copy = ("attn", layer) in self.plan_keys  # resid_mid uses it after the block ran
        write_fns = [(s.name, fn) for s, fn in writes]
        apply, store, saved = self._apply, self._store, self._resid_pre

        def hook(module, args, kwargs):
            act = _input_of(args, kwargs)
            if write_fns:
                for name, fn in write_fns:
                    act = apply(name, fn, act)
            saved[layer] = act.clone() if needs_copy else act
            for name in read_names:
                store(name, act)
            if write_fns:
                return _with_input(args, kwargs, act)
            return None

        return hook

    def _attn_hook(self, layer, reads, writes):
        out_reads = [s.name for s in reads if s.kind == "attn_out"]
        mid_reads = [s.name for s in reads if s.kind == "resid_mid"]
        out_writes = [(s.name, fn) for s, fn in writes if s.kind == "attn_out"]
        mid_writes = [(s.name, fn) for s, fn in writes if s.kind == "resid_mid"]
        apply, store, saved = self._apply, self._store, self._resid_pre
        changed = bool(out_writes or mid_writes)
        to_site, from_site = self._contribution_maps("attn")

        def hook(module, args, kwargs, output):
            act = _first(output)
            if to_site is not None:
                act = to_site(act, args, kwargs)
            for name, fn in out_writes:
                act = apply(name, fn, act)
            if mid_reads or mid_writes:
                pre = saved[layer]
                if pre.device != act.device:
                    pre = pre.to(act.device)
                mid = pre + act
                if mid_writes:
                    for name, fn in mid_writes:
                        mid = apply(name, fn, mid)
                    act = mid - pre
                for name in mid_reads:
                    store(name, mid)
            for name in out_reads:
                store(name, act)
            if changed:
                if from_site is not None:
                    act = from_site(act, args, kwargs)
                return _replace_first(output, act)
            return None

        return hook

    def _pattern_hook(self, layer, reads):
        names = [s.name for s in reads]
        store = self._store

        def hook(module, args, output):
            pattern = None if isinstance(output, torch.Tensor) or len(output) < 2 else output[1]
            if pattern is None:
                raise DolmRuntimeError(
                    f"layer {layer}: the attention module returned no attention pattern; "
                    "it needs the eager attention implementation"
                )
            for name in names:
                store(name, pattern)

        return hook

    def _experts_hook(self, layer, reads, writes):
        """Forward hook on a MoE block's experts module: expert E's term is the module run
        again with every other expert's routing weight zeroed; a write replaces that term
        in the module's output."""
        want = sorted({s.head for s in reads} | {s.head for s, _ in writes})
        read_names = {s.head: s.name for s in reads}
        write_fns = {s.head: (s.name, fn) for s, fn in writes}
        apply, store = self._apply, self._store
        to_site, from_site = self._unflatten_maps(layer)
        names = ("hidden_states", "top_k_index", "top_k_weights")

        def hook(module, args, kwargs, output):
            given = dict(zip(names, args))
            given.update({k: v for k, v in kwargs.items() if k in names})
            x, idx, w = (given[k] for k in names)
            out = output
            for e in want:
                old = module.forward(x, idx, w * (idx == e).to(w.dtype))
                act = to_site(old, args, kwargs)
                if e in write_fns:
                    act = apply(write_fns[e][0], write_fns[e][1], act)
                    out = out + (from_site(act, args, kwargs) - old).to(out.dtype)
                if e in read_names:
                    store(read_names[e], act)
            return out if write_fns else None

        return hook

    def _unflatten_maps(self, layer):
        """OPT-style blocks run the MLP on (batch * seq, d): the site is reshaped to the
        block input's (batch, seq, d), recorded by a pre-hook on the block."""
        shapes: dict[int, torch.Size] = {}

        def record(module, args, kwargs):
            shapes[layer] = _input_of(args, kwargs).shape

        self._handles.append(self.lm.adapter.block(layer).register_forward_pre_hook(
            record, with_kwargs=True))

        def to_site(t, args, kwargs):
            return t.reshape(*shapes[layer][:-1], t.shape[-1]) if t.dim() == 2 else t

        def from_site(t, args, kwargs):
            return t.reshape(-1, t.shape[-1]) if _first(args).dim() == 2 else t

        return to_site, from_site

    def _attn_fn_handler(self, layer, reads, writes):
        """Handler run by :func:`_dolm_attention` for layer ``layer``: q/k/v reads and
        writes on the attention function's inputs, pattern reads and writes on its
        probabilities (a pattern write adds ``(new - old) @ V`` to the output: the
        output is linear in the probabilities)."""
        apply, store = self._apply, self._store
        qkv_writes = [(s, fn) for s, fn in writes if s.kind != "pattern"]
        pat_writes = [(s, fn) for s, fn in writes if s.kind == "pattern"]
        qkv_reads = [s for s in reads if s.kind != "pattern"]
        pat_reads = [s for s in reads if s.kind == "pattern"]

        def handler(eager, module, query, key, value, attention_mask, **kwargs):
            group = query.shape[1] // key.shape[1]
            ts = {"q": query, "k": key, "v": value}
            for kind in {s.kind for s, _ in qkv_writes}:
                ts[kind] = ts[kind].clone()
            for site, fn in qkv_writes:
                t = ts[site.kind]
                idx = site.head if site.kind == "q" else site.head // group
                t[:, idx] = apply(site.name, fn, t[:, idx])
            for site in qkv_reads:
                idx = site.head if site.kind == "q" else site.head // group
                store(site.name, ts[site.kind][:, idx])
            out, weights = eager(module, ts["q"], ts["k"], ts["v"], attention_mask, **kwargs)
            if pat_writes:
                new = weights.clone()
                for site, fn in pat_writes:
                    new[:, site.head] = apply(site.name, fn, new[:, site.head])
                vrep = ts["v"].repeat_interleave(group, dim=1) if group > 1 else ts["v"]
                delta = (new - weights).to(vrep.dtype) @ vrep  # (B, H, q, d)
                out = out + delta.transpose(1, 2).to(out.dtype)
                weights = new
            for site in pat_reads:
                store(site.name, weights[:, site.head])
            return out, weights

        return handler

    def _attn_o_pre_hook(self, layer, reads, writes):
        n_heads = self.lm.n_heads
        for s in reads:
            self._head_names[s.name] = (layer, s.head)
        has_reads = bool(reads)
        write_items = [(s.name, s.head, fn) for s, fn in writes]
        apply, views, detach = self._apply, self._head_views, self.detach

        def hook(module, args, kwargs):
            x = _input_of(args, kwargs)
            if write_items:
                x = x.clone(memory_format=torch.contiguous_format)
            xv = x.reshape(*x.shape[:-1], n_heads, x.shape[-1] // n_heads)  # a view
            for name, head, fn in write_items:
                xv[..., head, :] = apply(name, fn, xv[..., head, :])
            if has_reads:
                views[layer] = (xv.detach() if detach else xv).clone()
            if write_items:
                return _with_input(args, kwargs, x)
            return None

        return hook

    # ---------------------------------------------------------------- context
    def __enter__(self):
        ad = self.lm.adapter
        model = self.lm.model
        try:
            want = ATTN_IMPL if self.needs_fn else ("eager" if self.needs_eager else None)
            if want is not None:
                cur = model.config._attn_implementation
                if cur != want:
                    if want == ATTN_IMPL:
                        register_attention()
                    self._saved_attn_impl = cur
                    model.set_attn_implementation(want)
            logit_ops = ad.logit_ops
            for key, group in self.plan.items():
                reads, writes = group["read"], group["write"]
                kind = key[0]
                fwd = dict(with_kwargs=True)
                if kind == "embed":
                    h = ad.embed.register_forward_hook(
                        self._simple_forward_hook(reads, writes), **fwd)
                elif kind == "final_norm":
                    h = ad.final_norm.register_forward_hook(
                        self._simple_forward_hook(reads, writes), **fwd)
                elif kind == "logits":
                    maps = (None, None) if not logit_ops else (
                        lambda t, a, k: apply_ops(t, logit_ops),
                        lambda t, a, k: invert_ops(t, logit_ops))
                    h = ad.unembed.register_forward_hook(
                        self._simple_forward_hook(reads, writes, *maps), **fwd)
                elif kind == "block_pre":
                    h = ad.block(key[1]).register_forward_pre_hook(
                        self._block_pre_hook(key[1], reads, writes), with_kwargs=True
                    )
                elif kind == "block":
                    h = ad.block(key[1]).register_forward_hook(
                        self._simple_forward_hook(reads, writes), **fwd)
                elif kind == "attn":
                    h = ad.attn_out_module(key[1]).register_forward_hook(
                        self._attn_hook(key[1], reads, writes), **fwd)
                elif kind == "attn_pat":
                    h = ad.block_module(key[1], "attn").register_forward_hook(
                        self._pattern_hook(key[1], reads))
                elif kind == "mlp":
                    maps = self._contribution_maps("mlp")
                    if maps == (None, None):
                        maps = self._unflatten_maps(key[1])
                    h = ad.mlp_out_module(key[1]).register_forward_hook(
                        self._simple_forward_hook(reads, writes, *maps), **fwd)
                elif kind == "router":
                    to_site, _ = self._unflatten_maps(key[1])
                    h = ad.block_module(key[1], "router").register_forward_hook(
                        self._simple_forward_hook(reads, [], to_site), **fwd)
                elif kind == "experts":
                    experts = ad.experts_module(key[1])
                    if experts is None:
                        raise InputError(f"layer {key[1]} has no experts (a dense MLP): "
                                         f"expert.{key[1]}.E does not exist; read mlp_out."
                                         f"{key[1]}")
                    h = experts.register_forward_hook(
                        self._experts_hook(key[1], reads, writes), **fwd)
                elif kind == "mixer":
                    h = ad.block_module(key[1], "mixer").register_forward_hook(
                        self._simple_forward_hook(reads, writes,
                                                  *self._contribution_maps("mixer")), **fwd)
                elif kind == "attn_fn":
                    handler = self._attn_fn_handler(key[1], reads, writes)
                    for m in ad.block_module(key[1], "attn").modules():
                        _HANDLERS[id(m)] = handler
                        self._fn_modules.append(id(m))
                    continue
                elif kind == "attn_o":
                    h = ad.block_module(key[1], "attn_o").register_forward_pre_hook(
                        self._attn_o_pre_hook(key[1], reads, writes), with_kwargs=True
                    )
                else:  # pragma: no cover
                    raise AssertionError(kind)
                self._handles.append(h)
        except BaseException:
            self._remove()
            raise
        return self

    def _remove(self):
        release(self.lm, self._handles, self._fn_modules, self._saved_attn_impl)
        self._saved_attn_impl = None
        self._resid_pre.clear()

    def __exit__(self, exc_type, exc, tb):
        self._remove()
        return False

    # ---------------------------------------------------------------- dict access
    def _lookup(self, site):
        hit = self._values.get(site)
        if hit is not None:
            return hit
        where = self._head_names.get(site)
        if where is not None:
            view = self._head_views.get(where[0])
            if view is not None:
                return view[..., where[1], :]
        return None

    def __getitem__(self, site: str) -> torch.Tensor:
        hit = self._lookup(site)
        if hit is not None:
            return hit
        if site in self.read_names:
            raise KeyError(
                f"site {site!r} was not reached: run the model inside the trace "
                "(run_from_layer does not reach sites before its start layer)"
            )
        raise KeyError(f"site {site!r} was not requested; read={self.read_names}")

    @property
    def values(self) -> dict[str, torch.Tensor]:
        """Every read value reached so far, in ``read`` order."""
        out = {}
        for name in self.read_names:
            hit = self._lookup(name)
            if hit is not None:
                out[name] = hit
        return out

    def __contains__(self, site) -> bool:
        return self._lookup(site) is not None

    def get(self, site, default=None):
        hit = self._lookup(site)
        return default if hit is None else hit

    def keys(self):
        return self.values.keys()

    def items(self):
        return self.values.items()
