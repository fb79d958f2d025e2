"""The site vocabulary: one set of names for a model's internals, across architectures.

=================  ===========================================  =========================
site               what                                          shape
=================  ===========================================  =========================
``embed``          token-embedding output (before position        (batch, seq, d_model)
                   embeddings are added, GPT-2)
``resid_pre.L``    input of block L                              (batch, seq, d_model)
``resid_mid.L``    ``resid_pre.L + attn_out.L``                  (batch, seq, d_model)
``resid_post.L``   output of block L                             (batch, seq, d_model)
``attn_out.L``     attention output added to the residual        (batch, seq, d_model)
``mlp_out.L``      MLP output added to the residual              (batch, seq, d_model)
``mixer_out.L``    state-space mixer output added to the         (batch, seq, d_model)
                   residual (Mamba-style blocks only)
``head.L.H``       head H's slice of the input of the attention  (batch, seq, d_head)
                   output projection (before the projection)
``q.L.H``          query of head H as the attention function     (batch, seq, d_qk)
                   receives it (after the projection, any q/k
                   norm and rotary embedding)
``k.L.H``          key of the kv head serving query head H:      (batch, seq, d_qk)
                   under grouped-query attention (n_kv_heads <
                   n_heads) kv head ``H // (n_heads/n_kv_heads)``;
                   writing it changes that kv head for every
                   query head of its group
``v.L.H``          value, mapped as ``k.L.H``                    (batch, seq, d_head)
``pattern.L.H``    attention probabilities of head H (read and   (batch, q, k)
                   write; runs the model's own eager attention)
``attn.L``         attention pattern, read-only                  (batch, heads, q, k)
``router.L``       router logits of a mixture-of-experts MLP,     (batch, seq, experts)
                   read-only (``mlp_out.L`` stays the whole MoE
                   output)
``expert.L.E``     expert E's output as the experts module adds   (batch, seq, d_model)
                   it, weighted by its routing weight (zero at
                   tokens not routed to E; the experts sum to the
                   experts module's output, before any shared
                   expert or residual multiplier). Read and write:
                   a write replaces E's term in the sum
``final_norm``     final norm output                             (batch, seq, d_model)
``logits``         unembedding output                            (batch, seq, d_vocab)
=================  ===========================================  =========================

Patterns put ``*`` for an index: ``resid_post.*``, ``head.3.*``, ``head.*.*``.
For parallel-residual blocks (GPT-NeoX, GPT-J) ``resid_mid.L`` is still defined as
``resid_pre.L + attn_out.L`` although the MLP reads ``resid_pre.L``.

Sites are always what the block adds to the residual stream: with a post-output norm
(Gemma 2) ``attn_out.L`` is the norm's output, with a residual multiplier (Granite)
it is the scaled output, and ``logits`` are the model's own (after Cohere's scale or
Gemma 2's soft-cap). Heads are the input of the attention output projection, so on
post-norm models they sum (through the projection) to the attention output *before*
its post-norm. A kind an architecture lacks (heads on Mamba) is refused with the reason.
"""

from __future__ import annotations

from typing import NamedTuple

from dolm.errors import InputError

GLOBAL_KINDS = ("embed", "final_norm", "logits")
LAYER_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn",
               "mixer_out", "router")
HEAD_KINDS = ("head", "q", "k", "v", "pattern")
EXPERT_KINDS = ("expert",)
READ_ONLY_KINDS = ("attn", "router")
ALL_KINDS = GLOBAL_KINDS[:1] + LAYER_KINDS + HEAD_KINDS + EXPERT_KINDS + GLOBAL_KINDS[1:]


class Site(NamedTuple):
    """A parsed site: ``kind``, ``layer`` (or None) and ``head`` (or None)."""

    kind: str
    layer: int | None = None
    head: int | None = None

    @property
    def name(self) -> str:
        if self.layer is None:
            return self.kind
        if self.head is None:
            return f"{self.kind}.{self.layer}"
        return f"{self.kind}.{self.layer}.{self.head}"


def valid_forms(n_layers: int, n_heads: int, unavailable=(), n_experts: int = 0) -> str:
    layer = [k for k in LAYER_KINDS if k not in unavailable]
    text = "valid sites: embed, " + ", ".join(f"{k}.L" for k in layer)
    text += f" (L in 0..{n_layers - 1} or *)"
    heads = [k for k in HEAD_KINDS if k not in unavailable]
    if heads and n_heads:
        text += f", {heads[0]}.L.H (H in 0..{n_heads - 1} or *)"
        if heads[1:]:
            text += ", " + ", ".join(f"{k}.L.H" for k in heads[1:]) + " (same H)"
    if n_experts and "expert" not in unavailable:
        text += f", expert.L.E (E in 0..{n_experts - 1} or *)"
    return text + ", final_norm, logits"


class SiteSpace:
    """Parses and expands site names for a model with ``n_layers`` and ``n_heads``."""

    def __init__(self, n_layers: int, n_heads: int, unavailable: dict | None = None,
                 n_experts: int = 0):
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_experts = n_experts
        # kind -> why this architecture has no such site
        self.unavailable = dict(unavailable or {})
        self._cache: dict[str, Site] = {}

    def _bad(self, site: str, why: str) -> InputError:
        forms = valid_forms(self.n_layers, self.n_heads, self.unavailable, self.n_experts)
        return InputError(f"site {site!r}: {why}; {forms}")

    def _index(self, site: str, text: str, n: int, what: str) -> int | None:
        """Parse one index; ``None`` for ``*``."""
        if text == "*":
            return None
        if not text.isdigit():
            raise self._bad(site, f"{what} {text!r} is not a non-negative integer or *")
        value = int(text)
        if value >= n:
            raise self._bad(site, f"{what} {value} out of range 0..{n - 1}")
        return value

    def parse_pattern(self, site: str) -> tuple[str, int | None, int | None]:
        """Parse a name or pattern: (kind, layer or None for *, head or None for *)."""
        if not isinstance(site, str):
            raise InputError(f"site {site!r}: expected a string")
        parts = site.strip().split(".")
        kind = parts[0]
        if kind in self.unavailable:
            raise self._bad(site, f"this model has no {kind} sites: {self.unavailable[kind]}")
        if kind in GLOBAL_KINDS:
            if len(parts) != 1:
                raise self._bad(site, f"{kind} takes no index")
            return kind, None, None
        if kind in LAYER_KINDS:
            if len(parts) != 2:
                raise self._bad(site, f"{kind} takes one index (the layer)")
            return kind, self._index(site, parts[1], self.n_layers, "layer"), None
        if kind in HEAD_KINDS + EXPERT_KINDS:
            what = "expert" if kind in EXPERT_KINDS else "head"
            if len(parts) != 3:
                raise self._bad(site, f"{kind} takes two indices (layer and {what})")
            layer = self._index(site, parts[1], self.n_layers, "layer")
            head = self._index(site, parts[2], self._width(kind), what)
            return kind, layer, head
        raise self._bad(site, f"unknown site kind {kind!r}")

    def _width(self, kind: str) -> int:
        """How many values the last index of ``kind`` takes (heads or experts)."""
        return self.n_experts if kind in EXPERT_KINDS else self.n_heads

    def parse(self, site: str) -> Site:
        """Parse one concrete site name (no ``*``); cached."""
        hit = self._cache.get(site)
        if hit is not None:
            return hit
        kind, layer, head = self.parse_pattern(site)
        parts = site.strip().split(".")
        if "*" in parts:
            raise self._bad(site, "a pattern is not allowed here; use expand_sites() first")
        if kind in GLOBAL_KINDS:
            out = Site(kind)
        elif kind in LAYER_KINDS:
            out = Site(kind, layer)
        else:
            out = Site(kind, layer, head)
        self._cache[site] = out
        return out

    def expand(self, patterns) -> list[str]:
        """Expand one pattern or a list of names/patterns into concrete names.

        Order follows the input; within a pattern, layers then heads ascending.
        Duplicates are dropped (first occurrence kept).
        """
        if isinstance(patterns, str):
            patterns = [p for p in patterns.split(",") if p.strip()] or [patterns]
        out: list[str] = []
        seen: set[str] = set()
        for pat in patterns:
            pat = pat.strip()
            kind, layer, head = self.parse_pattern(pat)
            if kind in GLOBAL_KINDS:
                names = [kind]
            else:
                layers = range(self.n_layers) if layer is None else [layer]
                if kind in LAYER_KINDS:
                    names = [f"{kind}.{lyr}" for lyr in layers]
                else:
                    heads = range(self._width(kind)) if head is None else [head]
                    names = [f"{kind}.{lyr}.{h}" for lyr in layers for h in heads]
            for name in names:
                if name not in seen:
                    seen.add(name)
                    out.append(name)
        return out
