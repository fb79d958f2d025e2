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

:class:`GraphRunner` computes this pass from the model's own modules (norms, projection
weights, MLP, unembedding); :meth:`GraphRunner.check` verifies that with no edge patched
it reproduces the model's logits. It serves the GPT-2 family (learned positions,
pre-norm blocks, fused q/k/v projection), the architecture of the embedded toy model;
other architectures are refused with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from dolm.errors import InputError

CHANNELS = ("q", "k", "v")


@dataclass
class Graph:
    """Nodes and edges of a model with ``n_layers`` layers of ``n_heads`` heads.

    Senders (``senders``) in order: ``embed``, then per layer its heads and its MLP.
    Receivers (``receivers``): per layer ``(head.L.H, c)`` for c in q, k, v (head-major),
    then ``(mlp.L, None)``; last ``(logits, None)``. ``edges``: (sender index, receiver
    index) pairs, every sender upstream of every receiver.
    """

    n_layers: int
    n_heads: int
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
        return self.head_sender(int(lyr)) if kind == "head" else self.mlp_sender(int(lyr))

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
    return Graph(lm.n_layers, lm.n_heads)


@dataclass
class Pass:
    """What one graph pass returns: ``logits`` at the read positions (B, V), and when
    asked the senders' outputs ``outs`` (B, T, S, d), the residual at each layer's entry
    ``entries`` (list of (B, T, d)), and the receivers' input probes (for gradients)."""

    logits: torch.Tensor
    outs: torch.Tensor | None = None
    entries: list | None = None
    probes: list | None = None


class GraphRunner:
    """The edge-level forward pass of a loaded GPT-2-family model (see module doc)."""

    def __init__(self, lm):
        arch = str(lm.info.get("architecture", "")) if hasattr(lm, "info") else ""
        mt = getattr(lm.model.config, "model_type", "")
        if mt != "gpt2":
            raise InputError(
                f"--model: edge-level circuits need head-resolved q/k/v inputs, computed "
                f"from the GPT-2 family's modules (learned positions, pre-norm blocks, "
                f"fused q/k/v); this model is {mt or arch!r}")
        self.lm = lm
        self.graph = graph_for(lm)
        m = lm.model
        self.tr = m.transformer
        cfg = m.config
        self.scale = (1.0 / math.sqrt(lm.d_head)) if cfg.scale_attn_weights else 1.0
        self.inv_layer = bool(getattr(cfg, "scale_attn_by_inverse_layer_idx", False))
        self.dtype = next(m.parameters()).dtype
        self.device = next(m.parameters()).device

    # ------------------------------------------------------------------ pieces
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.tr.wte(ids) + self.tr.wpe(pos)[None]

    def _qkv(self, layer: int, x: torch.Tensor):
        """x (B, T, H, 3, d) head/channel input streams -> q, k, v (B, T, H, dh)."""
        blk = self.tr.h[layer]
        ln = blk.ln_1(x)
        h, dh, d = self.lm.n_heads, self.lm.d_head, self.lm.d_model
        w = blk.attn.c_attn.weight.view(d, 3, h, dh)
        b = blk.attn.c_attn.bias.view(3, h, dh)
        return [torch.einsum("bthd,dhe->bthe", ln[:, :, :, c], w[:, c]) + b[c]
                for c in range(3)]

    def _attend(self, layer: int, q, k, v) -> torch.Tensor:
        """Causal attention; returns each head's output through its W_O slice (B, T, H, d)."""
        t = q.shape[1]
        scale = self.scale / (layer + 1) if self.inv_layer else self.scale
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) * scale
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        p = scores.softmax(-1)
        z = torch.einsum("bhqk,bkhe->bqhe", p, v)
        attn = self.tr.h[layer].attn
        h, dh, d = self.lm.n_heads, self.lm.d_head, self.lm.d_model
        return torch.einsum("bqhe,hed->bqhd", z, attn.c_proj.weight.view(h, dh, d))

    def _delta(self, patch, outs, mask, recv: slice, up: int):
        """sum_s mask[r, s] (patch[s] - outs[s]) for receivers ``recv`` -> (B, T, R, d)."""
        diff = patch[:, :, :up] - outs[:, :, :up]
        return torch.einsum("btsd,brs->btrd", diff, mask[:, recv, :up])

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
        g, lm = self.graph, self.lm
        n, nh = lm.n_layers, lm.n_heads
        if entry is not None:
            h = entry
        else:
            if start != 0:
                raise ValueError("a pass starting above layer 0 needs entry and outs0")
            h = self.embed(ids) if embeds is None else embeds
        b, t = h.shape[:2]
        need_outs = keep or mask is not None
        outs = None
        if need_outs:
            if outs0 is not None:
                outs = outs0.clone()
            else:
                outs = h.new_zeros(b, t, g.n_senders, lm.d_model)
                outs[:, :, 0] = h
        if mask is not None and mask.shape[0] == 1 and b > 1:
            mask = mask.expand(b, -1, -1)
        entries = [] if keep else None
        probe_list = [] if probes else None
        for lyr in range(start, n):
            if keep:
                entries.append(h)
            r0 = g.head_recv0[lyr]
            x = h[:, :, None, :].expand(b, t, 3 * nh, lm.d_model)
            if mask is not None:
                up = g.head_sender(lyr)
                x = x + self._delta(patch, outs, mask, slice(r0, r0 + 3 * nh), up)
            if probes:
                pr = torch.zeros(b, t, 3 * nh, lm.d_model, dtype=h.dtype, device=h.device,
                                 requires_grad=True)
                probe_list.append(pr)
                x = x + pr
            q, k, v = self._qkv(lyr, x.reshape(b, t, nh, 3, lm.d_model))
            heads = self._attend(lyr, q, k, v)
            blk = self.tr.h[lyr]
            h = h + heads.sum(2) + blk.attn.c_proj.bias
            if need_outs:
                hs = g.head_sender(lyr)
                outs[:, :, hs:hs + nh] = heads
            rm = g.mlp_recv[lyr]
            xm = h
            if mask is not None:
                xm = xm + self._delta(patch, outs, mask, slice(rm, rm + 1),
                                      g.mlp_sender(lyr))[:, :, 0]
            if probes:
                pr = torch.zeros_like(h, requires_grad=True)
                probe_list.append(pr)
                xm = xm + pr
            mo = blk.mlp(blk.ln_2(xm))
            h = h + mo
            if need_outs:
                outs[:, :, g.mlp_sender(lyr)] = mo
        if keep:
            entries.append(h)
        rows = torch.arange(b, device=h.device)
        pos = positions.to(h.device)
        xf = h[rows, pos]
        if mask is not None:
            d = (patch[rows, pos] - outs[rows, pos]) * mask[:, g.logits_recv, :, None]
            xf = xf + d.sum(1)
        if probes:
            pr = torch.zeros_like(xf, requires_grad=True)
            probe_list.append(pr)
            xf = xf + pr
        logits = self.lm.model.lm_head(self.tr.ln_f(xf))
        return Pass(logits, outs if keep else None, entries, probe_list)

    def check(self, ids: torch.Tensor, positions: torch.Tensor, tol: float = 1e-3) -> float:
        """Max |graph pass - model| of the read logits; InputError beyond ``tol``."""
        with torch.no_grad():
            ours = self.run(ids, positions).logits
            ref = self.lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            rows = torch.arange(ids.shape[0])
            err = float((ours - ref[rows, positions.to(ref.device)]).abs().max())
        if err > tol * max(1.0, float(ref.abs().max())):
            raise InputError(f"--model: the edge-level pass does not reproduce this model's "
                             f"logits (max difference {err:.3g}); the model's blocks differ "
                             "from the GPT-2 layout")
        return err
