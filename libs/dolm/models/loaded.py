"""``LoadedModel``: model + tokenizer + adapter, with sites, tracing, encoding, token
helpers and layer stepping (``run_from_layer``) for fast activation patching."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dolm.errors import InputError
from dolm.models.adapters import Adapter, ArchSpec
from dolm.models.batching import pad_right
from dolm.models.hooks import Trace, _first, _input_of
from dolm.models.sites import SiteSpace


def _cfg(cfg, *names):
    for name in names:
        val = getattr(cfg, name, None)
        if isinstance(val, int) and not isinstance(val, bool) and val > 0:
            return val
    return None


def _head_width(ad, n_heads: int, cfg, d_model: int) -> int:
    """Width of one head at the output projection's input: its input width over the
    number of heads (MLA models such as DeepSeek-V2/V3 use ``v_head_dim`` there, not
    ``head_dim``); the config's ``head_dim`` when the projection is not a plain linear."""
    if not n_heads:
        return 0
    if ad.spec.attn_o is not None:
        proj = ad.block_module(0, "attn_o")
        width = getattr(proj, "in_features", None)
        if width is None and type(proj).__name__ == "Conv1D":
            width = proj.weight.shape[0]
        if isinstance(width, int) and width % n_heads == 0:
            return width // n_heads
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else d_model // n_heads


# --------------------------------------------------------------------------- encoding
@dataclass
class Encoding:
    """A right-padded batch of prompts.

    ``input_ids``/``attention_mask``: (batch, seq) LongTensors on the model's input
    device. ``last_index``: (batch,) position of each row's last real token.
    ``lengths``: list of real token counts. ``offsets``: per row, per real token,
    ``(char_start, char_end)`` in the prompt text (``(0, 0)`` for an added BOS).
    ``n_prefix``: per row, number of added special tokens at the start (0 or 1).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_index: torch.Tensor
    lengths: list[int]
    offsets: list[list[tuple[int, int]]] | None
    texts: list[str]
    names: list[str]
    n_prefix: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def position_ids(self) -> torch.Tensor:
        """(1, seq) positions; right padding keeps every row's positions at 0..n-1."""
        return torch.arange(self.input_ids.shape[1], device=self.input_ids.device)[None]

    def to(self, device) -> Encoding:
        self.input_ids = self.input_ids.to(device)
        self.attention_mask = self.attention_mask.to(device)
        self.last_index = self.last_index.to(device)
        return self

    def span_to_tokens(self, row: int, start: int, end: int) -> list[int]:
        """Token positions of row ``row`` whose characters overlap ``[start, end)``.

        Added special tokens never match. An empty list means the span covers no
        token (e.g. an empty or whitespace-only span).
        """
        if self.offsets is None:
            raise InputError("span_to_tokens needs a fast tokenizer (character offsets)")
        if not (0 <= start <= end <= len(self.texts[row])):
            raise InputError(
                f"prompt {self.names[row]}: span [{start}, {end}) outside the text "
                f"(length {len(self.texts[row])})"
            )
        out = []
        for pos, (s, e) in enumerate(self.offsets[row]):
            if e > s and s < end and e > start:
                out.append(pos)
        return out

    def span_last_token(self, row: int, start: int, end: int) -> int:
        """Position of the last token overlapping the span; InputError if none."""
        toks = self.span_to_tokens(row, start, end)
        if not toks:
            raise InputError(
                f"prompt {self.names[row]}: span [{start}, {end}) "
                f"({self.texts[row][start:end]!r}) covers no token"
            )
        return toks[-1]


# --------------------------------------------------------------------------- stepping
def _with_cache(rest: tuple, kwargs: dict, slot, cache) -> tuple[tuple, dict]:
    where, key = slot
    if where == "arg":
        rest = (*rest[:key], cache, *rest[key + 1:])
    else:
        kwargs = {**kwargs, key: cache}
    return rest, kwargs


class _EmbedDone(Exception):
    """Raised at block 0's entry to end a forward once ``resid_pre.0`` is known."""


class _Recorder(torch.nn.Module):
    """Stand-in for a block while the layer context is captured: records the
    arguments the model passes to block ``i`` and returns the input unchanged."""

    def __init__(self, store: dict, i: int, as_tuple: bool):
        super().__init__()
        self._store = store
        self._i = i
        self._as_tuple = as_tuple

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        self._store[self._i] = (rest, kwargs)
        return (hidden, None) if self._as_tuple else hidden


@dataclass
class LayerContext:
    """What the model passes to each block besides the hidden states (attention mask,
    rotary position embeddings, position ids, ...), captured from the model itself for
    one batch shape and attention mask. Reuse it across ``run_from_layer`` calls."""

    args: dict[int, tuple]
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    shape: tuple[int, int]
    attn_impl: str
    #: positions before the hidden states (their keys/values come from a cached run)
    prefix: int = 0
    #: where the blocks' KV-cache argument sits: ("arg", index) or ("kw", name)
    cache_slot: tuple[str, object] | None = None


class _PrefixKV:
    """Stands in for the model's KV cache inside one block: the attention's
    ``update(k, v, layer_idx, ...)`` returns the cached keys/values of the unchanged
    prefix followed by the new ones; nothing is stored."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        k = self.keys.to(device=key_states.device, dtype=key_states.dtype)
        v = self.values.to(device=value_states.device, dtype=value_states.dtype)
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)


def accepts_kwarg(module, name: str) -> bool:
    """Whether ``module.forward`` takes the keyword ``name``."""
    import inspect

    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False


def _cache_kwarg(module) -> str:
    """Name of a forward's KV-cache argument (``cache`` in transformers >= 5.x)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _find_slot(rest: tuple, kwargs: dict, cache) -> tuple[str, object] | None:
    for i, a in enumerate(rest):
        if a is cache:
            return ("arg", i)
    for k, a in kwargs.items():
        if a is cache:
            return ("kw", k)
    return None


class LoadedModel:
    """A loaded causal LM with dolm's site vocabulary. See ``dolm.models`` docs."""

    def __init__(self, model, tokenizer, arch: ArchSpec, info: dict):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.adapter = Adapter(arch, model)
        self.info = info
        cfg = model.config
        ad = self.adapter
        self.n_layers = len(ad.layers)
        self.n_heads = 0 if ad.spec.attn is None else int(
            _cfg(cfg, "num_attention_heads", "n_head", "num_heads") or 0)
        self.n_kv_heads = int(_cfg(cfg, "num_key_value_heads", "num_kv_heads",
                                   "multi_query_group_num") or self.n_heads)
        self.d_model = int(_cfg(cfg, "hidden_size", "n_embd", "d_model")
                           or ad.embed.weight.shape[-1])
        self.d_head = _head_width(ad, self.n_heads, cfg, self.d_model)
        d_mlp = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
                 or 4 * self.d_model)
        self.d_mlp = int(d_mlp)
        unembed = ad.unembed
        self.d_vocab = int(getattr(unembed, "out_features", None) or cfg.vocab_size)
        self.n_ctx = int(getattr(cfg, "max_position_embeddings", None)
                         or getattr(cfg, "n_positions", 0) or 0) or None
        n_experts = 0 if "expert" in ad.unavailable else int(
            _cfg(cfg, "num_local_experts", "num_experts", "n_routed_experts") or 0)
        self.sites = SiteSpace(self.n_layers, self.n_heads, ad.unavailable, n_experts)
        self._prepends_bos: bool | None = None
        self._prefix_kv_ok: bool | None = None
        info.setdefault("n_layers", self.n_layers)

    # ------------------------------------------------------------------ basics
    def __repr__(self) -> str:
        return (f"LoadedModel({self.info.get('spec')!r}, {self.adapter.name}, "
                f"n_layers={self.n_layers}, n_heads={self.n_heads}, d_model={self.d_model})")

    @property
    def device(self) -> torch.device:
        """Device of the input embedding (where input ids go)."""
        return self.adapter.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.embed.weight.dtype

    @property
    def parallel_residual(self) -> bool:
        return self.adapter.parallel

    def expand_sites(self, patterns) -> list[str]:
        """Names for a pattern (``resid_post.*``), a comma list, or a list of either."""
        return self.sites.expand(patterns)

    def parse_site(self, site: str):
        """``Site(kind, layer, head)`` for a concrete site name."""
        return self.sites.parse(site)

    def site_width(self, site: str) -> int:
        """Width of the last axis of a per-position site (``d_model``, ``d_head``, ...);
        InputError for sites that are not one vector per position (``attn.L``,
        ``pattern.L.H``: (query, key) matrices)."""
        kind = self.parse_site(site).kind
        cfg = self.config
        if kind in ("attn", "pattern"):
            raise InputError(f"site {site!r} is a (query, key) matrix per prompt, not one "
                             "vector per token position")
        if kind == "head":
            return int(self.d_head)
        if kind in ("q", "k"):
            return int(_cfg(cfg, "qk_head_dim", "head_dim") or self.d_head)
        if kind == "v":
            return int(_cfg(cfg, "v_head_dim", "head_dim") or self.d_head)
        if kind == "router":
            return int(_cfg(cfg, "num_local_experts", "num_experts", "n_routed_experts"))
        if kind == "logits":
            return int(self.d_vocab)
        return int(self.d_model)

    def trace(self, read=(), write=None, *, batch_index=None, detach: bool = True) -> Trace:
        """Context manager reading ``read`` sites and applying ``write`` functions.

        ``with lm.trace(read=[...], write={site: fn}) as tr: lm.model(...)``; then
        ``tr[site]``. Patterns are expanded. ``fn(act, batch_index) -> act``.
        Reading ``attn.L`` switches the model to eager attention inside the context.
        """
        return Trace(self, read=read, write=write, batch_index=batch_index, detach=detach)

    def forward(self, enc: Encoding, **kwargs):
        """``model(input_ids, attention_mask)`` for an :class:`Encoding`."""
        return self.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                          use_cache=False, **kwargs)

    # ------------------------------------------------------------------ tokens
    @property
    def prepends_bos(self) -> bool:
        """Whether this tokenizer conventionally prepends BOS (its post-processor does)."""
        if self._prepends_bos is None:
            tok = self.tokenizer
            bos = tok.bos_token_id
            if bos is None:
                self._prepends_bos = False
            else:
                with_sp = tok("a", add_special_tokens=True)["input_ids"]
                plain = tok("a", add_special_tokens=False)["input_ids"]
                self._prepends_bos = bool(
                    len(with_sp) > len(plain) and with_sp and with_sp[0] == bos
                )
        return self._prepends_bos

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for cand in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if cand is not None:
                return int(cand)
        return 0

    def encode(self, texts, *, names=None, add_bos: bool | None = None,
               max_length: int | None = None, device=None) -> Encoding:
        """Tokenize ``texts`` into a right-padded :class:`Encoding`.

        ``add_bos``: None follows the tokenizer's convention (Llama-style tokenizers
        prepend BOS, GPT-2-style do not); True/False forces it. A BOS already at the
        start of the text is never doubled. No EOS is appended. ``names`` (e.g. prompt
        ids) are used in error messages. A prompt longer than ``max_length`` (default:
        the model's context) is an InputError naming it.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise InputError("encode: no prompts")
        names = [str(n) for n in names] if names is not None else [f"#{i}" for i in
                                                                      range(len(texts))]
        if len(names) != len(texts):
            raise InputError(f"encode: {len(names)} names for {len(texts)} prompts")
        for name, t in zip(names, texts, strict=True):
            if not isinstance(t, str):
                raise InputError(f"prompt {name}: expected a string, found {type(t).__name__}")
        tok = self.tokenizer
        fast = bool(getattr(tok, "is_fast", False))
        batch = tok(texts, add_special_tokens=False, return_offsets_mapping=fast)
        ids_list = batch["input_ids"]
        offs_list = batch["offset_mapping"] if fast else None
        want_bos = self.prepends_bos if add_bos is None else bool(add_bos)
        bos = tok.bos_token_id
        if want_bos and bos is None:
            raise InputError("encode: add_bos=True but the tokenizer has no BOS token")
        limit = max_length if max_length is not None else self.n_ctx
        rows, offsets, n_prefix = [], [], []
        for i, ids in enumerate(ids_list):
            ids = list(ids)
            off = [tuple(o) for o in offs_list[i]] if fast else None
            pre = 0
            if want_bos and (not ids or ids[0] != bos):
                ids.insert(0, bos)
                if off is not None:
                    off.insert(0, (0, 0))
                pre = 1
            if not ids:
                raise InputError(f"prompt {names[i]}: empty (no tokens)")
            if limit is not None and len(ids) > limit:
                raise InputError(
                    f"prompt {names[i]}: {len(ids)} tokens, longer than the model's context "
                    f"of {limit} tokens ({len(texts[i])} characters: {texts[i][:60]!r}...)"
                )
            rows.append(ids)
            offsets.append(off)
            n_prefix.append(pre)
        lengths = [len(r) for r in rows]
        dev = self.device if device is None else device
        input_ids, mask = pad_right(rows, self.pad_id, dev)
        last = torch.tensor([n - 1 for n in lengths], dtype=torch.long)
        return Encoding(
            input_ids=input_ids, attention_mask=mask, last_index=last.to(dev),
            lengths=lengths, offsets=offsets if fast else None, texts=texts, names=names,
            n_prefix=n_prefix,
        )

    def to_str_tokens(self, ids) -> list[str]:
        """Decoded string of each token id."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [self.tokenizer.decode([i]) for i in ids]

    def _tokenize_piece(self, s: str) -> list[int]:
        return list(self.tokenizer(s, add_special_tokens=False)["input_ids"])

    def _single_token_problem(self, s: str) -> str | None:
        if not isinstance(s, str) or s == "":
            return f"{s!r} is not a non-empty string"
        ids = self._tokenize_piece(s)
        if len(ids) == 1:
            return None
        pieces = self.to_str_tokens(ids)
        msg = f"{s!r} is {len(ids)} tokens {pieces}, expected exactly one"
        cands = []
        if not s.startswith(" "):
            cands.append(" " + s)
        if s != s.strip():
            cands.append(s.strip())
            if s.strip():
                cands.append(" " + s.strip())
        for c in dict.fromkeys(cands):
            if c and c != s and len(self._tokenize_piece(c)) == 1:
                msg += f"; {c!r} is one token"
                break
        return msg

    def token_id(self, s: str) -> int:
        """The id of ``s`` if it is exactly one token, else InputError with a suggestion
        (e.g. the leading-space variant when that is one token)."""
        problem = self._single_token_problem(s)
        if problem:
            raise InputError(f"token {problem}")
        return int(self._tokenize_piece(s)[0])

    def choice_token_ids(self, choices, first_token: bool = False) -> list[int]:
        """Distinct token ids for ``choices``.

        Each choice must be exactly one token (InputError listing every offender, with
        suggestions), unless ``first_token=True``, which takes each choice's first token.
        Two choices with the same (first) token are an InputError.
        """
        choices = list(choices)
        if not choices:
            raise InputError("choices: empty list")
        ids, problems = [], []
        for c in choices:
            if first_token:
                toks = self._tokenize_piece(c) if isinstance(c, str) and c else []
                if not toks:
                    problems.append(f"{c!r} has no tokens")
                    ids.append(None)
                else:
                    ids.append(int(toks[0]))
            else:
                p = self._single_token_problem(c)
                if p:
                    problems.append(p)
                    ids.append(None)
                else:
                    ids.append(int(self._tokenize_piece(c)[0]))
        if problems:
            raise InputError("choices: " + "; ".join(problems))
        seen: dict[int, str] = {}
        for c, i in zip(choices, ids, strict=True):
            if i in seen:
                what = "first token" if first_token else "token"
                raise InputError(
                    f"choices {seen[i]!r} and {c!r} share the {what} {self.to_str_tokens([i])[0]!r}"
                    f" (id {i}); choices must be distinguishable by their {what}"
                )
            seen[i] = c
        return ids

    # ------------------------------------------------------------------ stepping
    def layer_context(self, attention_mask: torch.Tensor, position_ids=None, *,
                      prefix: int = 0) -> LayerContext:
        """Capture the per-block arguments for a batch with this attention mask.

        Runs the model's own forward with the blocks replaced by recorders, so masks
        (causal, padding, sliding window), rotary embeddings and position ids are
        exactly what the model computes; costs about one embedding lookup.

        ``prefix > 0``: the context of hidden states for positions ``prefix..seq-1``
        only (``attention_mask`` still covers all ``seq`` positions), whose attention
        reads the keys/values of positions ``0..prefix-1`` from a cached run
        (:meth:`run_layers` ``past=``). Only for models where :meth:`supports_prefix_kv`.
        """
        ad = self.adapter
        if attention_mask.dim() != 2:
            raise InputError("layer_context: attention_mask must be (batch, seq)")
        b, s = attention_mask.shape
        if not 0 <= prefix < s:
            raise InputError(f"layer_context: prefix {prefix} out of range 0..{s - 1}")
        store: dict[int, tuple] = {}
        dummy = torch.zeros(b, s - prefix, self.d_model, dtype=self.dtype, device=self.device)
        mask = attention_mask.to(self.device)
        if position_ids is not None:
            position_ids = position_ids.to(self.device)
        extra: dict = {"use_cache": False}
        if prefix:
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache()
            zeros = torch.zeros(b, 1, prefix, 1, dtype=self.dtype, device=self.device)
            for i in range(self.n_layers):
                cache.update(zeros, zeros, i)
            extra = {"use_cache": True, _cache_kwarg(ad.base_model): cache}
        original = getattr(ad.layers_parent, ad.layers_attr)
        first_error = None
        # the adapter says whether blocks return tuples; try the other form if it fails
        for as_tuple in (ad.spec.block_tuple, not ad.spec.block_tuple):
            store.clear()
            recorders = torch.nn.ModuleList(
                _Recorder(store, i, as_tuple) for i in range(self.n_layers))
            setattr(ad.layers_parent, ad.layers_attr, recorders)
            try:
                with torch.no_grad():
                    ad.base_model(inputs_embeds=dummy, attention_mask=mask,
                                  position_ids=position_ids, **extra)
                break
            except Exception as exc:
                first_error = first_error or exc
            finally:
                setattr(ad.layers_parent, ad.layers_attr, original)
        else:
            raise first_error
        if len(store) != self.n_layers:  # pragma: no cover - architecture mismatch
            raise RuntimeError(f"layer_context captured {len(store)} of {self.n_layers} blocks")
        slot = None
        if prefix:
            rest, kwargs = store[0]
            slot = _find_slot(rest, kwargs, extra[_cache_kwarg(ad.base_model)])
            if slot is None:
                raise InputError(f"layer_context: {self.adapter.name} blocks take no KV cache; "
                                 "prefix reuse is not available for this model")
        return LayerContext(args=store, attention_mask=attention_mask, position_ids=position_ids,
                            shape=(b, s - prefix), attn_impl=self.config._attn_implementation,
                            prefix=prefix, cache_slot=slot)

    def forward_kv(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   **kwargs):
        """A full forward that also returns every layer's keys and values.

        Returns ``(output, [(keys, values)] * n_layers)``, each (batch, kv_heads, seq,
        head_dim) as the attention caches them; the keys/values of a prefix that a later
        run leaves unchanged are what :meth:`run_layers` ``past=`` takes. ``kwargs`` go to
        the model's forward (e.g. ``logits_to_keep``).
        """
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True,
                         **{_cache_kwarg(self.model): cache}, **kwargs)
        kv = []
        for layer in getattr(cache, "layers", ()):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if keys is None or values is None or keys.shape[-2] != input_ids.shape[1]:
                raise InputError(f"forward_kv: {self.adapter.name} does not cache every "
                                 "position's keys/values in every layer")
            kv.append((keys, values))
        if len(kv) != self.n_layers:
            raise InputError(f"forward_kv: {len(kv)} cached layers for {self.n_layers} blocks")
        return out, kv

    def accepts(self, name: str) -> bool:
        """Whether the model's forward takes the keyword ``name`` (e.g. ``logits_to_keep``:
        unembed only the positions a caller reads)."""
        return accepts_kwarg(self.model, name)

    def supports_prefix_kv(self) -> bool:
        """Whether blocks can reuse a cached run's keys/values for an unchanged prefix
        (checked once, on a 6-token input, against the full recompute)."""
        if self._prefix_kv_ok is None:
            self._prefix_kv_ok = self._probe_prefix_kv()
        return self._prefix_kv_ok

    @torch.no_grad()
    def _probe_prefix_kv(self) -> bool:
        t, p = 6, 3
        ids = (torch.arange(t, device=self.device)[None] * 7 + 3) % self.d_vocab
        try:
            _, kv = self.forward_kv(ids)
            h0 = self.embed_resid(ids)
            full = self.run_layers(h0, 0, self.n_layers, self.layer_context(torch.ones_like(ids)))
            ctx = self.layer_context(torch.ones_like(ids), prefix=p)
            part = self.run_layers(h0[:, p:], 0, self.n_layers, ctx,
                                   past=lambda i: (kv[i][0][..., :p, :], kv[i][1][..., :p, :]))
        except Exception:  # any architecture that cannot: fall back to the full recompute
            return False
        ref = full[:, p:].float()
        err = float((part.float() - ref).abs().max())
        return err <= 1e-3 * max(1.0, float(ref.abs().max()))

    def run_from_layer(self, hidden: torch.Tensor, start_layer: int, attention_mask=None,
                       position_ids=None, *, context: LayerContext | None = None,
                       positions=None, write=None, batch_index=None) -> torch.Tensor:
        """Run blocks ``start_layer..n_layers-1``, the final norm and the unembedding.

        ``hidden`` is ``resid_pre.<start_layer>`` (batch, seq, d_model); with
        ``start_layer == n_layers`` it is the last block's output. Give the batch's
        ``attention_mask`` (and ``position_ids`` if not 0..seq-1), or a ``context``
        from :meth:`layer_context` to reuse across calls. ``positions``: None -> logits
        for every position (batch, seq, vocab); a (batch,) LongTensor -> (batch, vocab)
        at one position per row; (batch, k) -> (batch, k, vocab). Only the selected
        positions go through the final norm and unembedding.

        Sites are hooked as in a full forward: wrap the call in ``lm.trace(...)`` to read
        or write (sites before ``start_layer`` and ``embed`` are not reached); ``write``
        is a shortcut for ``with lm.trace(write=write, batch_index=batch_index)``.
        """
        if not (0 <= start_layer <= self.n_layers):
            raise InputError(f"start_layer {start_layer} out of range 0..{self.n_layers}")
        if context is None or context.attn_impl != self.config._attn_implementation:
            if context is not None:
                attention_mask, position_ids = context.attention_mask, context.position_ids
            if attention_mask is None:
                attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long,
                                            device=hidden.device)
            context = self.layer_context(attention_mask, position_ids)
        if tuple(hidden.shape[:2]) != context.shape:
            raise InputError(
                f"run_from_layer: hidden has shape {tuple(hidden.shape)}, context is for "
                f"(batch, seq) = {context.shape}"
            )
        if write:
            with self.trace(write=write, batch_index=batch_index):
                return self._run_from_layer(hidden, start_layer, context, positions)
        return self._run_from_layer(hidden, start_layer, context, positions)

    def run_layers(self, h: torch.Tensor, lo: int, hi: int, context: LayerContext,
                   past=None) -> torch.Tensor:
        """Run blocks ``lo..hi-1`` on the hidden states ``h`` (``resid_pre.lo``), with the
        per-block arguments of ``context`` (:meth:`layer_context`); returns
        ``resid_pre.hi`` (``hi == n_layers``: the last block's output). Hooks of an
        enclosing ``lm.trace`` fire as in a full forward.

        A context with a ``prefix`` needs ``past(layer) -> (keys, values)``: the cached
        keys/values of positions ``0..prefix-1`` for the rows of ``h`` (from
        :meth:`forward_kv`); ``h`` then holds positions ``prefix..`` only.
        """
        if not (0 <= lo <= hi <= self.n_layers):
            raise InputError(f"run_layers: layers {lo}..{hi} out of range 0..{self.n_layers}")
        if context.prefix and past is None:
            raise InputError("run_layers: a prefix context needs the prefix's keys/values")
        layers = self.adapter.layers
        for i in range(lo, hi):
            rest, kwargs = context.args[i]
            if context.prefix:
                rest, kwargs = _with_cache(rest, kwargs, context.cache_slot, _PrefixKV(*past(i)))
            h = _first(layers[i](h, *rest, **kwargs))
        return h

    def receiver_inputs(self, heads=None, mlp=None):
        """Per-head q/k/v input streams and the MLP's input for edge-level interventions
        (a context manager; see :mod:`dolm.models.streams`)."""
        from dolm.models.streams import ReceiverInputs

        return ReceiverInputs(self, heads=heads, mlp=mlp)

    def embed_resid(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """``resid_pre.0`` of these tokens, from the model's own embedding code (no block
        runs). Hooks of an enclosing ``lm.trace`` on ``embed`` fire."""
        captured: dict[str, torch.Tensor] = {}

        def stop(module, args, kwargs):
            captured["h"] = _input_of(args, kwargs)
            raise _EmbedDone

        handle = self.adapter.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.adapter.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False)
        except _EmbedDone:
            pass
        finally:
            handle.remove()
        return captured["h"]

    def _run_from_layer(self, hidden, start_layer, context, positions):
        h = self.run_layers(hidden, start_layer, self.n_layers, context)
        if positions is not None:
            positions = torch.as_tensor(positions, device=h.device)
            rows = torch.arange(h.shape[0], device=h.device)
            h = h[rows, positions] if positions.dim() == 1 else h[rows[:, None], positions]
        return self.adapter.logits_from_final_norm(self.adapter.final_norm(h))
