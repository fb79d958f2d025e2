"""The computational graph of a model and one forward pass with edge interventions.

Nodes: ``embed`` (token + position embedding), ``head.L.H`` (a head's output through its
slice of the output projection), ``mlp.L`` and ``logits``. Every node's output is added
to the residual stream, so the input a downstream node reads is the sum of the outputs
of the nodes upstream of it (plus the attention output biases, the same in every run).
An **edge** runs from an upstream node's output to a downstream node's input; into a
head separately through its query, key and value input (``channel`` q/k/v), into
``mlp.L`` and ``logits`` through the residual stream (channel None).

**Edge intervention** (the standard edge-patching decomposition): a receiver's input is

    input_r = resid_r + sum_s mask[r, s] * (patch_out[s] - out[s])

where ``resid_r`` is the residual stream the receiver reads in this run, ``out[s]`` the
sender's output in this run and ``patch_out[s]`` its output in the corrupted run (or an
ablation value). A head whose q, k and v inputs get different edges reads three
different streams: each head and channel gets its own input stream, normalised by the
block's first norm and projected with that head's slice of the q/k/v projection.

:class:`GraphRunner` runs this pass on the shared engine (:func:`dolm.engine.run_rows`
steps the model's own blocks): the senders' outputs are read with ``lm.trace`` (``head.L.H``
through that head's slice of the output projection, ``mlp_out.L``), the receivers' inputs
are given with ``lm.receiver_inputs`` (per-head q/k/v input streams, the MLP norm's input;
:mod:`dolm.models.streams`), and the logits' input goes through the adapter's final norm
and unembedding. It serves every architecture whose heads the model library resolves
(GPT-2, llama/mistral/qwen2 with grouped-query attention and rotary, gpt_neox, ...); with a
parallel residual (gpt_neox, ...) ``mlp.L`` reads the block input, so layer L's heads are
not upstream of it. Post-norm blocks (a norm after the attention output mixes the heads)
are refused with the reason. :meth:`GraphRunner.check` verifies that with no edge patched
the pass reproduces the model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dolm.errors import InputError

CHANNELS = ("q", "k", "v")


@dataclass
class Graph:
    """Nodes and edges of a model with ``n_layers`` layers of ``n_heads`` heads.

    Senders (``senders``) in order: ``embed``, then per layer its heads and its MLP.
    ``parallel``: the MLP reads the block input (parallel residual), so the layer's heads
    are not upstream of it. Receivers (``receivers``): per layer ``(head.L.H, c)`` for c
    in q, k, v (head-major), then ``(mlp.L, None)``; last ``(logits, None)``.
    ``edges``: (sender index, receiver index) pairs, every sender upstream of every
    receiver.
    """

    n_layers: int
    n_heads: int
    parallel: bool = False
    senders: list[str] = field(default_factory=list)
    receivers: list[tuple[str, str | None]] = field(default_factory=list)
    edges: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        n, h = self.n_layers, self.n_heads
        self.senders = ["embed"]
        for lyr in range(n):
            self.senders += [f"head.{lyr}.{i}" for i in range(h)] + [f"mlp.{lyr}"]
        self.receivers = []
        self.head_recv0: list[int] = []  # first receiver index of layer L's heads
        self.mlp_recv: list[int] = []
        for lyr in range(n):
            self.head_recv0.append(len(self.receivers))
            self.receivers += [(f"head.{lyr}.{i}", c) for i in range(h) for c in CHANNELS]
            self.mlp_recv.append(len(self.receivers))
            self.receivers.append((f"mlp.{lyr}", None))
        self.logits_recv = len(self.receivers)
        self.receivers.append(("logits", None))
        self.sender_index = {s: i for i, s in enumerate(self.senders)}
        self.receiver_index = {r: i for i, r in enumerate(self.receivers)}
        self.edges = [(s, r) for r in range(len(self.receivers))
                      for s in range(self.n_upstream(r))]
        self.edge_index = {e: i for i, e in enumerate(self.edges)}

    @property
    def n_senders(self) -> int:
        return len(self.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    def head_sender(self, layer: int, head: int = 0) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def receiver_layer(self, r: int) -> int:
        """Layer whose computation the receiver's input enters (n_layers for logits)."""
        name = self.receivers[r][0]
        return self.n_layers if name == "logits" else int(name.split(".")[1])

    def n_upstream(self, r: int) -> int:
        """Number of senders upstream of receiver ``r`` (they are senders 0..n-1)."""
        name = self.receivers[r][0]
        if name == "logits":
            return self.n_senders
        kind, lyr = name.split(".")[:2]
        if kind == "head" or self.parallel:
            return self.head_sender(int(lyr))
        return self.mlp_sender(int(lyr))

    def edge_name(self, e: tuple[int, int]) -> tuple[str, str, str | None]:
        dst, ch = self.receivers[e[1]]
        return self.senders[e[0]], dst, ch

    def find_edge(self, src: str, dst: str, channel: str | None, where: str = "") -> int:
        """Index of the edge ``src -> dst`` (``channel`` q/k/v for heads); InputError
        naming the node the model lacks."""
        at = f"{where}: " if where else ""
        if src not in self.sender_index:
            raise InputError(f"{at}edge source {src!r}: this model ({self.n_layers} layers, "
                             f"{self.n_heads} heads) has no such node; senders are embed, "
                             f"head.L.H, mlp.L")
        ch = None if channel in (None, "", "resid") else str(channel)
        if dst.startswith("head.") and ch not in CHANNELS:
            raise InputError(f"{at}edge into {dst!r}: channel must be q, k or v, found "
                             f"{channel!r}")
        key = (dst, ch if dst.startswith("head.") else None)
        if key not in self.receiver_index:
            raise InputError(f"{at}edge target {dst!r}: this model ({self.n_layers} layers, "
                             f"{self.n_heads} heads) has no such node; receivers are "
                             "head.L.H (q/k/v), mlp.L, logits")
        s, r = self.sender_index[src], self.receiver_index[key]
        if s >= self.n_upstream(r):
            raise InputError(f"{at}edge {src} -> {dst}: the source is not upstream of the "
                             "target")
        return self.edge_index[(s, r)]

    def mask(self, edge_ids, value: float = 1.0, dtype=torch.float32) -> torch.Tensor:
        """(R, S) mask with ``value`` at the given edges."""
        m = torch.zeros(self.n_receivers, self.n_senders, dtype=dtype)
        if len(edge_ids):
            idx = torch.as_tensor([self.edges[i] for i in edge_ids], dtype=torch.long)
            m[idx[:, 1], idx[:, 0]] = value
        return m

    def all_edges_mask(self, dtype=torch.float32) -> torch.Tensor:
        """(R, S) with 1 on every edge of the graph."""
        return self.mask(range(len(self.edges)), dtype=dtype)


def graph_for(lm) -> Graph:
    """The graph of a loaded model (parallel residual from its adapter)."""
    return Graph(lm.n_layers, lm.n_heads, parallel=bool(lm.adapter.parallel))


@dataclass
class Pass:
    """What one graph pass returns: ``logits`` at the read positions (B, V), and when
    asked the senders' outputs ``outs`` (B, T, S, d), the residual at each layer's entry
    ``entries`` (list of (B, T, d)), and the receivers' input probes (for gradients)."""

    logits: torch.Tensor
    outs: torch.Tensor | None = None
    entries: list | None = None
    probes: list | None = None


def runner_problem(lm) -> str | None:
    """Why the edge-level pass cannot run on ``lm`` (None: it can)."""
    from dolm.models.streams import receiver_problem

    why = receiver_problem(lm)
    if why:
        return why
    ad = lm.adapter
    if ad.post_norm:
        return (f"{ad.name} normalises the attention/MLP output before adding it to the "
                "residual (post-norm), so the heads' outputs are not separate terms of the "
                "residual stream")
    if ad.spec.residual_inside:
        return f"{ad.name}'s attention/MLP modules add the residual themselves"
    if ad.spec.ln2 is None:
        return f"{ad.name}'s MLP shares the attention's norm, so it has no input of its own"
    return None


class _Outs:
    """The senders' outputs (B, T, S, d) of one pass, filled layer by layer from the
    reads of ``tr`` (``head.L.*`` through the output projection, ``mlp_out.L``); senders
    below ``start`` come from ``outs0`` (a cached run)."""

    def __init__(self, runner, h0: torch.Tensor, outs0=None, start: int = 0):
        g = runner.graph
        self.runner, self.start, self.filled, self.tr = runner, start, set(), None
        if outs0 is not None:
            self.t = outs0.clone()
        else:
            self.t = h0.new_zeros(*h0.shape[:2], g.n_senders, h0.shape[-1])
            self.t[:, :, 0] = h0.detach()

    def reads(self) -> list[str]:
        return [s for lyr in range(self.start, self.runner.lm.n_layers)
                for s in (f"head.{lyr}.*", f"mlp_out.{lyr}")]

    def fill(self, kind: str, lyr: int) -> None:
        if (kind, lyr) in self.filled or lyr < self.start:
            return
        self.filled.add((kind, lyr))
        g, tr, nh = self.runner.graph, self.tr, self.runner.lm.n_heads
        if kind == "head":
            z = torch.stack([tr[f"head.{lyr}.{i}"] for i in range(nh)], dim=2)
            hs = g.head_sender(lyr)
            self.t[:, :, hs:hs + nh] = torch.einsum("bthe,hed->bthd", z,
                                                    self.runner.w_o[lyr])
        else:
            self.t[:, :, g.mlp_sender(lyr)] = tr[f"mlp_out.{lyr}"]


class GraphRunner:
    """The edge-level forward pass of a loaded model on the shared engine (module doc)."""

    def __init__(self, lm):
        why = runner_problem(lm)
        if why:
            raise InputError(f"--model: edge-level circuits need each head's q/k/v input and "
                             f"output resolved: {why}")
        self.lm = lm
        self.graph = graph_for(lm)
        self.dtype = lm.dtype
        self.device = lm.device
        scale = lm.adapter.residual_scale
        self.w_o = [self._o_map(lyr, 1.0 if scale is None else float(scale))
                    for lyr in range(lm.n_layers)]
        self._contexts: dict = {}
        self._fast: bool | None = None  # fast receiver gradients (checked on first use)

    @torch.no_grad()
    def _o_map(self, layer: int, scale: float) -> torch.Tensor:
        """Layer's output projection as (H, d_head, d): head h's output is z_h @ W[h]
        (read off the module itself: o(I) - o(0); the bias is the same in every run)."""
        lm = self.lm
        o = lm.adapter.block_module(layer, "attn_o")
        width = lm.n_heads * lm.d_head
        eye = torch.eye(width, dtype=self.dtype, device=self.device)
        w = o(eye) - o(torch.zeros_like(eye[:1]))
        return (w * scale).reshape(lm.n_heads, lm.d_head, -1)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The embed node's output (``resid_pre.0``) from the model's own embedding."""
        ids = ids.to(self.device)
        return self.lm.embed_resid(ids, torch.ones_like(ids))

    # ------------------------------------------------------------------ the pass
    def run(self, ids: torch.Tensor | None, positions: torch.Tensor, *,
            embeds: torch.Tensor | None = None, patch: torch.Tensor | None = None,
            mask: torch.Tensor | None = None, start: int = 0,
            entry: torch.Tensor | None = None, outs0: torch.Tensor | None = None,
            keep: bool = False, probes: bool = False) -> Pass:
        """One pass over a batch.

        ``ids`` (B, T) or ``embeds`` (B, T, d) (the embed node's output, e.g. noised);
        ``positions`` (B,): the position whose logits are read. ``patch`` (B, T, S, d) and
        ``mask`` (B or 1, R, S): the edge intervention (both or neither). ``start``: first
        layer computed; rows then begin from ``entry`` (B, T, d), the residual at that
        layer's entry, and ``outs0`` (B, T, S, d), the senders' outputs below it (a
        cached clean run). ``keep``: return outs and entries. ``probes``: add a zero
        tensor requiring grad to every receiver input and return them (EAP gradients).
        """
        from dolm.engine import run_rows

        g, lm = self.graph, self.lm
        n, nh, d = lm.n_layers, lm.n_heads, lm.d_model
        if entry is not None:
            h0 = entry
        else:
            if start != 0:
                raise ValueError("a pass starting above layer 0 needs entry and outs0")
            h0 = self.embed(ids) if embeds is None else embeds
        h0 = h0.to(device=self.device, dtype=self.dtype)
        b, t = h0.shape[:2]
        need_outs = keep or mask is not None
        so = _Outs(self, h0, outs0, start) if need_outs else None
        outs = so.t if need_outs else None
        if mask is not None and mask.shape[0] == 1 and b > 1:
            mask = mask.expand(b, -1, -1)
        entries = [] if keep else None
        probe_at: dict = {}

        def fill(kind: str, lyr: int):
            if so is not None:
                so.fill(kind, lyr)

        def delta(recv: slice, up: int) -> torch.Tensor:
            """sum_s mask[r, s] (patch[s] - outs[s]) for receivers ``recv`` (B, T, R, d)."""
            diff = patch[:, :, :up] - outs[:, :, :up]
            return torch.einsum("btsd,brs->btrd", diff, mask[:, recv, :up])

        def heads_in(lyr: int, x: torch.Tensor):
            if keep:
                entries.append(x)
            fill("head", lyr - 1)
            fill("mlp", lyr - 1)
            if mask is None and not probes:
                return None
            r0 = g.head_recv0[lyr]
            recv = slice(r0, r0 + 3 * nh)
            if probes:
                sel = list(range(3 * nh))
            else:
                sel = (mask[:, recv].abs().sum((0, 2)) > 0).nonzero().flatten().tolist()
            if not sel:
                return None
            xs = x[:, :, None, :].expand(b, t, len(sel), d)
            if mask is not None:
                dl = delta(recv, g.head_sender(lyr))
                xs = xs + dl[:, :, sel]
            if probes:
                pr = torch.zeros(b, t, 3 * nh, d, dtype=x.dtype, device=x.device,
                                 requires_grad=True)
                probe_at[(lyr, 0)] = pr
                xs = xs + pr
            out = {}
            for j, i in enumerate(sel):
                key = (i // 3, CHANNELS[i % 3])
                rows = None if probes else \
                    (mask[:, r0 + i].abs().sum(-1) > 0).nonzero().flatten()
                if rows is None or len(rows) == b:
                    out[key] = xs[:, :, j]
                else:  # only these rows patch this receiver
                    out[key] = (rows, xs[rows, :, j])
            return out

        def mlp_in(lyr: int, x: torch.Tensor):
            if not g.parallel:
                fill("head", lyr)
            if mask is None and not probes:
                return None
            rm = g.mlp_recv[lyr]
            xm = x
            if mask is not None:
                xm = xm + delta(slice(rm, rm + 1), g.n_upstream(rm))[:, :, 0]
            if probes:
                pr = torch.zeros_like(x, requires_grad=True)
                probe_at[(lyr, 1)] = pr
                xm = xm + pr
            return xm

        with lm.trace(read=so.reads() if need_outs else ()) as tr, \
                lm.receiver_inputs(heads=heads_in, mlp=mlp_in):
            if so is not None:
                so.tr = tr
            h = run_rows(lm, [start] * b, lambda lyr, a, z: h0[a:z], t,
                         contexts=self._context_cache())
            fill("head", n - 1)
            fill("mlp", n - 1)
        if keep:
            entries.append(h)
        rows = torch.arange(b, device=h.device)
        pos = positions.to(h.device)
        xf = h[rows, pos]
        if mask is not None:
            dl = (patch[rows, pos] - outs[rows, pos]) * mask[:, g.logits_recv, :, None]
            xf = xf + dl.sum(1)
        probe_list = None
        if probes:
            pr = torch.zeros_like(xf, requires_grad=True)
            xf = xf + pr
            probe_list = [probe_at[(lyr, k)] for lyr in range(start, n) for k in (0, 1)]
            probe_list.append(pr)
        ad = lm.adapter
        logits = ad.logits_from_final_norm(ad.final_norm(xf))
        return Pass(logits, outs if keep else None, entries, probe_list)

    def _context_cache(self) -> dict:
        """Layer contexts by length, per attention implementation (masks differ)."""
        return self._contexts.setdefault(self.lm.model.config._attn_implementation, {})

    # ------------------------------------------------------------------ gradients
    def receiver_grads(self, embeds: torch.Tensor, positions: torch.Tensor,
                       metric, keep: bool = False):
        """dM/d(every receiver's input) from the embed output ``embeds`` (attribution
        patching): per layer the heads' (B, T, 3H, d) (head-major q, k, v) and the MLP's
        (B, T, d), then the logits' input (B, d); ``metric(logits) -> scalar``.

        Fast path where the q/k/v projections' layout is known
        (:func:`dolm.models.streams.qkv_projections`) and every query head has its own
        key/value head: one ordinary backward; the gradient at each projection's output,
        read per head, goes back through that head's slice of the projection (read off
        the module) and the norm. It is checked once against the per-head input streams
        (``run(probes=True)``), which are used where it is not available or disagrees.
        ``keep``: return ``(grads, outs)``, the senders' outputs of this pass too (EAP's
        clean run is this pass)."""
        if self._fast is None:
            self._fast = self._fast_agrees(embeds, positions)
        if self._fast:
            grads, outs = self._fast_grads(embeds, positions, metric, keep)
        else:
            with torch.enable_grad():
                p = self.run(None, positions, embeds=embeds, probes=True, keep=keep)
                grads = [x.detach() for x in torch.autograd.grad(metric(p.logits), p.probes)]
            outs = p.outs
        return (grads, outs) if keep else grads

    def _fast_agrees(self, embeds: torch.Tensor, positions: torch.Tensor) -> bool:
        from dolm.models.streams import qkv_projections

        lm = self.lm
        projs = [qkv_projections(lm, lyr) for lyr in range(lm.n_layers)]
        if any(p is None for p in projs):
            return False
        self._proj = projs
        with torch.no_grad():
            self._w_qkv = [self._qkv_map(lyr) for lyr in range(lm.n_layers)]
        if any(w[1].shape[1] != lm.n_heads for w in self._w_qkv):
            return False  # grouped keys/values: a query head's k/v gradient is not separate
        t = min(int(embeds.shape[1]), 8)
        e = embeds[:1, :t]
        pos = positions[:1].clamp(max=t - 1)

        def probe(lg):
            return lg.float().logsumexp(-1).sum() + lg.float()[:, :7].sum()

        try:
            fast, _ = self._fast_grads(e, pos, probe)
        except Exception:  # noqa: BLE001 - any failure: the general path serves
            return False
        with torch.enable_grad():
            p = self.run(None, pos, embeds=e, probes=True)
            ref = torch.autograd.grad(probe(p.logits), p.probes)
        for a, b in zip(fast, ref, strict=True):
            if float((a - b).abs().max()) > 1e-4 * max(1.0, float(b.abs().max())):
                return False
        return True

    def _qkv_map(self, layer: int) -> list[torch.Tensor]:
        """[W_q, W_k, W_v] of ``layer``, each (d, heads, d_head): the projections' linear
        part read off the modules (P(I) - P(0))."""
        from dolm.models.streams import split_heads

        lm = self.lm
        mods, layout = self._proj[layer]
        eye = torch.eye(lm.d_model, dtype=self.dtype, device=self.device)
        outs = [m(eye) - m(torch.zeros_like(eye[:1])) for m in mods]
        n_kv = (outs[0].shape[-1] // lm.d_head - lm.n_heads) // 2 if layout == "q|k|v" else 0
        return split_heads(outs, layout, lm.n_heads, n_kv, lm.d_head)

    def _fast_grads(self, embeds, positions, metric, keep: bool = False):
        from dolm.engine import run_rows
        from dolm.models.hooks import _input_of
        from dolm.models.streams import split_heads

        lm, ad = self.lm, self.lm.adapter
        n, nh, d, dh = lm.n_layers, lm.n_heads, lm.d_model, lm.d_head
        h0 = embeds.to(device=self.device, dtype=self.dtype)
        b, t = h0.shape[:2]
        xs, pr_proj, pr_mlp, handles = {}, {}, {}, []
        so = _Outs(self, h0) if keep else None

        def add_probe(store, key, x):
            z = torch.zeros_like(x, requires_grad=True)
            store[key] = z
            return x + z

        for lyr in range(n):
            for i, m in enumerate(self._proj[lyr][0]):
                handles.append(m.register_forward_hook(
                    lambda mod, a, out, key=(lyr, i): add_probe(pr_proj, key, out)))
            handles.append(ad.block_module(lyr, "ln1").register_forward_pre_hook(
                lambda mod, a, k, lyr=lyr: ln1_in(lyr, _input_of(a, k)), with_kwargs=True))

        def ln1_in(lyr, x):
            xs[lyr] = x
            if so is not None:
                so.fill("head", lyr - 1)
                so.fill("mlp", lyr - 1)

        def mlp_in(lyr, x):
            if so is not None and not self.graph.parallel:
                so.fill("head", lyr)
            return add_probe(pr_mlp, lyr, x)

        try:
            with torch.enable_grad(), lm.trace(read=so.reads() if keep else ()) as tr, \
                    lm.receiver_inputs(mlp=mlp_in):
                if so is not None:
                    so.tr = tr
                h = run_rows(lm, [0] * b, lambda lyr, a, z: h0[a:z], t,
                             contexts=self._context_cache())
                if so is not None:
                    so.fill("head", n - 1)
                    so.fill("mlp", n - 1)
                rows = torch.arange(b, device=h.device)
                xf = add_probe(pr_mlp, "final", h[rows, positions.to(h.device)])
                logits = ad.logits_from_final_norm(ad.final_norm(xf))
                keys = [(lyr, i) for lyr in range(n) for i in range(len(self._proj[lyr][0]))]
                wrt = [pr_proj[k] for k in keys] + [pr_mlp[lyr] for lyr in range(n)]
                got = torch.autograd.grad(metric(logits), wrt + [pr_mlp["final"]],
                                          allow_unused=True)
        finally:
            for hd in handles:
                hd.remove()
        got = [torch.zeros_like(w) if g is None else g.detach()
               for w, g in zip(wrt + [pr_mlp["final"]], got, strict=True)]
        by_key = dict(zip(keys, got, strict=False))
        out = []
        for lyr in range(n):
            mods, layout = self._proj[lyr]
            gp = split_heads([by_key[(lyr, i)] for i in range(len(mods))], layout, nh, nh, dh)
            u = torch.stack([torch.einsum("bthe,dhe->bthd", gp[c], self._w_qkv[lyr][c])
                             for c in range(3)], dim=3).reshape(b, t, 3 * nh, d)
            x = xs[lyr].detach().requires_grad_(True)
            with torch.enable_grad():
                nrm = ad.block_module(lyr, "ln1")(x)
                gx = torch.autograd.grad(nrm, x, u.permute(2, 0, 1, 3).contiguous(),
                                         is_grads_batched=True)[0]
            out += [gx.permute(1, 2, 0, 3), got[len(keys) + lyr]]
        out.append(got[-1])
        return out, (so.t if so is not None else None)

    def check(self, ids: torch.Tensor, positions: torch.Tensor, tol: float = 1e-3) -> float:
        """Max |graph pass - model| of the read logits; InputError beyond ``tol``."""
        with torch.no_grad():
            ours = self.run(ids, positions).logits
            ids = ids.to(self.device)
            ref = self.lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            rows = torch.arange(ids.shape[0])
            err = float((ours - ref[rows, positions.to(ref.device)]).abs().max())
        if err > tol * max(1.0, float(ref.abs().max())):
            raise InputError(f"--model: the edge-level pass does not reproduce this model's "
                             f"logits (max difference {err:.3g})")
        return err
