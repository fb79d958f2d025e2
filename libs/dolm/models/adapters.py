"""Declarative architecture adapters: abstract component names -> module paths.

An architecture is data, not a subclass. Each :class:`ArchSpec` row names, for one
family (a *layout*) of Hugging Face causal LMs, where the components every dolm site
needs live:

==================  =========================================================
field               meaning
==================  =========================================================
``model_types``     ``config.model_type`` values served by this row
``layers``          path (from the ``*ForCausalLM`` model) of the block list
``attn``            path inside a block of the attention module; its output
                    (``tensor`` or tuple whose item 0 is the tensor) is the
                    attention's contribution; item 1 is the attention pattern
                    when the eager implementation is used. ``None``: no attention
``attn_o``          path inside a block of the attention output projection;
                    its *input* is the concatenation of the heads (``head.L.H``)
``mlp``             path inside a block of the MLP (or of its last linear layer,
                    ``fc2``, in OPT-style blocks without an MLP module)
``ln1`` / ``ln2``   the pre-attention / pre-MLP norms (``None`` when absent)
``post_attn_norm``  a norm applied to the attention output before it is added to
                    the residual (Gemma 2/3, OLMo 2, GLM-4); ``attn_out.L`` is its
                    output. ``post_mlp_norm`` likewise for ``mlp_out.L``
``mixer``           the sequence mixer of a state-space block (Mamba), whose output
                    is ``mixer_out.L``; such blocks have no attention or MLP sites
``final_norm``      path of the final norm (``final_norm`` site)
``embed``           path of the token embedding (``embed`` site)
``unembed``         path of the unembedding (``logits`` site)
``pos_embed``       path of a learned absolute position embedding, if any
``rotary``          path of the model-level rotary module, if any
``parallel``        ``True``/``False``: the MLP reads ``resid_pre`` (GPT-J, NeoX,
                    Falcon, Cohere, Phi) rather than ``resid_mid``
``norm``            ``"layernorm"`` or ``"rmsnorm"`` (the final norm)
``block_tuple``     blocks return a tuple ``(hidden, ...)`` rather than a tensor
``residual_scale``  the block adds ``scale * output`` of attention and MLP (Granite
                    ``residual_multiplier``, MiniCPM3 ``scale_depth/sqrt(L)``): the
                    sites hold the scaled values, what is added to the residual
``residual_inside`` attention and MLP add their ``residual`` argument themselves
                    (BLOOM): the sites hold ``output - residual``
``pre_unembed``     operations on the final norm's output before the unembedding
                    (MiniCPM3 divides by ``logits_scaling``)
``logit_ops``       operations after the unembedding (Cohere ``logit_scale``,
                    Granite ``/ logits_scaling``, Gemma 2 soft-cap): the ``logits``
                    site and ``run_from_layer`` give the model's own logits
==================  =========================================================

Operations are ``(op, value)`` with ``op`` in ``mul``, ``div``, ``softcap`` and the
value a config attribute name (resolved when the adapter is bound to a model).

A handful of rows are named here (GPT-2, GPT-NeoX, Llama, GPT-J, GPT-Neo); every other
decoder is described by :func:`detect`, which reads the loaded module structure (block
children, norm placement, the attention's and MLP's signatures) and the config flags
that change the data flow. Either way :mod:`dolm.models.verify` checks the row on the
model before it is trusted.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace

from dolm.errors import InputError


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    layers: str
    attn: str | None
    attn_o: str | None
    mlp: str | None
    ln1: str | None
    ln2: str | None
    final_norm: str
    embed: str
    unembed: str
    pos_embed: str | None = None
    rotary: str | None = None
    parallel: bool | str = False
    norm: str = "layernorm"
    block_tuple: bool = False
    post_attn_norm: str | None = None
    post_mlp_norm: str | None = None
    mixer: str | None = None
    residual_scale: str | None = None
    residual_inside: tuple = ()  # parts ("attn", "mlp") that add their residual argument
    pre_unembed: tuple = ()
    logit_ops: tuple = ()
    router: str | None = None  # mixture-of-experts router inside a block (router.L)
    unavailable: tuple = field(default=())  # ((kind, reason), ...)

    @property
    def layout(self) -> str:
        """Short text naming the data flow (used in docs/models.md and cache keys)."""
        if self.mixer:
            return "ssm"
        parts = ["parallel" if self.parallel is True else "sequential"]
        if self.parallel not in (True, False):
            parts = [f"parallel={self.parallel}"]
        if self.post_attn_norm or self.post_mlp_norm:
            parts.append("post-norm")
        if self.residual_inside:
            parts.append(f"residual inside {'+'.join(self.residual_inside)}")
        if self.residual_scale:
            parts.append(f"residual*{self.residual_scale}")
        for op, val in self.pre_unembed + self.logit_ops:
            parts.append(f"logits {op} {val}")
        if self.mlp and self.mlp.startswith("fc"):
            parts.append("no-mlp-module")
        return ", ".join(parts)


_LLAMA_LIKE = dict(
    layers="model.layers",
    attn="self_attn",
    attn_o="self_attn.o_proj",
    mlp="mlp",
    ln1="input_layernorm",
    ln2="post_attention_layernorm",
    final_norm="model.norm",
    embed="model.embed_tokens",
    unembed="lm_head",
    rotary="model.rotary_emb",
    parallel=False,
    norm="rmsnorm",
)

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(
        name="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        attn="attn",
        attn_o="attn.c_proj",
        mlp="mlp",
        ln1="ln_1",
        ln2="ln_2",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        unembed="lm_head",
        pos_embed="transformer.wpe",
    ),
    ArchSpec(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        attn="attention",
        attn_o="attention.dense",
        mlp="mlp",
        ln1="input_layernorm",
        ln2="post_attention_layernorm",
        final_norm="gpt_neox.final_layer_norm",
        embed="gpt_neox.embed_in",
        unembed="lm_head",
        rotary="gpt_neox.rotary_emb",
        parallel="use_parallel_residual",
    ),
    ArchSpec(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"),
        **_LLAMA_LIKE,
    ),
    ArchSpec(
        name="gptj",
        model_types=("gptj",),
        layers="transformer.h",
        attn="attn",
        attn_o="attn.out_proj",
        mlp="mlp",
        ln1="ln_1",
        ln2=None,
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        unembed="lm_head",
        parallel=True,
        block_tuple=True,
    ),
    ArchSpec(
        name="gpt_neo",
        model_types=("gpt_neo",),
        layers="transformer.h",
        attn="attn",
        attn_o="attn.attention.out_proj",
        mlp="mlp",
        ln1="ln_1",
        ln2="ln_2",
        final_norm="transformer.ln_f",
        embed="transformer.wte",
        unembed="lm_head",
        pos_embed="transformer.wpe",
        block_tuple=True,
    ),
)

_BY_MODEL_TYPE = {mt: spec for spec in ARCHITECTURES for mt in spec.model_types}

# What the config adds to the data flow beyond the module structure, per model type.
_GRANITE = dict(residual_scale="residual_multiplier", logit_ops=(("div", "logits_scaling"),))
EXTRAS: dict[str, dict] = {
    **{mt: _GRANITE for mt in ("granite", "granite_swa", "granitemoe", "granitemoe_swa",
                               "granitemoeshared")},
    "hyperclovax": dict(residual_scale="residual_multiplier",
                        logit_ops=(("mul", "logits_scaling"),)),
    "minicpm3": dict(residual_scale="minicpm_depth", pre_unembed=(("div", "logits_scaling"),)),
    **{mt: dict(logit_ops=(("mul", "logit_scale"),)) for mt in ("cohere", "cohere2",
                                                                 "cohere2_moe")},
}

# Types whose causal-LM class is an encoder (or an encoder-decoder) used as a decoder.
ENCODER_TYPES = frozenset((
    "bert", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
    "reformer", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm",
    "xlm-roberta", "xlm-roberta-xl", "xmod", "bert-generation",
))


def supported_model_types() -> list[str]:
    """Types with a named row (others are served after :func:`detect` and verification)."""
    return sorted(_BY_MODEL_TYPE)


def _seq2seq_types() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)


def refuse_config(config, where: str = "") -> None:
    """InputError for configs dolm never serves: encoder-decoder and encoder-only types."""
    pre = f"{where}: " if where else ""
    mt = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False) or mt in _seq2seq_types():
        raise InputError(f"{pre}model_type {mt!r} is an encoder-decoder model; dolm serves "
                         "decoder-only causal language models")
    if mt in ENCODER_TYPES:
        raise InputError(f"{pre}model_type {mt!r} is an encoder-only model (its causal-LM "
                         "head runs the encoder as a decoder); dolm serves decoder-only "
                         "causal language models")


def spec_for(model_type: str, where: str = "") -> ArchSpec:
    """The named adapter row for ``config.model_type``; InputError if there is none."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise InputError(
            f"{where + ': ' if where else ''}model_type {model_type!r} has no named dolm "
            f"adapter; named: {', '.join(supported_model_types())}"
        ) from None


# --------------------------------------------------------------------------- detection
_ATTN = ("self_attn", "attn", "attention", "self_attention", "attn_layer", "multi_head_attention")
_ATTN_O = ("o_proj", "c_proj", "dense", "out_proj", "wo", "o", "proj", "attention.out_proj",
           "linear_proj")
_MLP = ("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe", "feedforward", "mlp_block")
_MIXER = ("mixer", "mamba")
_PRE_ATTN = ("input_layernorm", "ln_1", "ln1", "attention_norm", "self_attn_layer_norm",
             "norm_1", "norm1", "ln_attn", "attn_norm", "input_norm", "pre_attention_layernorm",
             "attention_layernorm", "operator_norm", "layernorm1", "norm")
_PRE_MLP = ("pre_feedforward_layernorm", "ln_2", "ln2", "ffn_norm", "final_layer_norm",
            "norm_2", "norm2", "ln_mlp", "pre_mlp_layernorm", "mlp_norm", "ffn_layernorm",
            "feedforward_layernorm", "layernorm2")
_POST_ATTN = ("post_self_attn_layernorm", "post_attention_norm", "post_attn_norm", "post_norm1",
              "post_attention_layernorm")
_POST_MLP = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_ffn_norm",
             "post_feedforward_norm", "post_mlp_norm", "post_norm2")
_FINAL = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f", "ln_out",
          "final_norm", "layer_norm", "layernorm", "ln_final", "embedding_norm")
_POS = ("wpe", "embed_positions", "position_embeddings", "pos_emb", "wpe_emb")


def _is_norm(module) -> bool:
    return module is not None and "norm" in type(module).__name__.lower()


def _child(module, name: str):
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _n_layers(config) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        val = getattr(config, key, None)
        if isinstance(val, int) and val > 0:
            return val
    return None


def _path_of(model, target) -> str | None:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    return None


def _takes(module, arg: str) -> bool:
    try:
        return arg in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _refuse(model_type: str, why: str) -> InputError:
    return InputError(f"model_type {model_type!r}: {why}; dolm has no adapter for this layout")


def detect(model) -> ArchSpec:
    """Build an :class:`ArchSpec` from the loaded module structure of ``model``.

    InputError naming what is missing when the structure is not one dolm knows (no
    uniform block list, no final norm, blocks of several kinds as in hybrids, ...).
    """
    import torch

    cfg = model.config
    mt = getattr(cfg, "model_type", type(model).__name__)
    n = _n_layers(cfg)
    lists = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0
             and (n is None or len(mod) == n) and len(list(mod[0].children())) > 1]
    if not lists:
        raise _refuse(mt, "no list of decoder blocks found")
    layers_path, layers = min(lists, key=lambda kv: kv[0].count("."))
    kinds = {tuple(sorted(name for name, _ in b.named_children())) for b in layers}
    classes = {type(b).__name__ for b in layers}
    if len(kinds) > 1 or len(classes) > 1:
        raise _refuse(mt, f"hybrid stack: blocks of {len(classes)} kinds "
                          f"({', '.join(sorted(classes))})")
    parent_path = layers_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    block = layers[0]

    def first(names, inside=block, pred=None):
        for name in names:
            mod = _child(inside, name)
            if mod is not None and (pred is None or pred(mod)):
                return name
        return None

    final = first(_FINAL, parent, _is_norm)
    if final is None:
        raise _refuse(mt, f"no final norm beside the block list {layers_path!r}")
    embed_mod = model.get_input_embeddings()
    unembed_mod = model.get_output_embeddings()
    if unembed_mod is None:
        raise _refuse(mt, "no output embedding (unembedding) module")
    embed = _path_of(model, embed_mod)
    unembed = _path_of(model, unembed_mod)
    pre = f"{parent_path}." if parent_path else ""
    pos = first(_POS, parent, lambda m: isinstance(m, torch.nn.Embedding))
    rotary = next((name for name, m in parent.named_children()
                   if "rotary" in type(m).__name__.lower()), None)
    final_mod = parent.get_submodule(final)
    norm = "rmsnorm" if ("rms" in type(final_mod).__name__.lower()
                         or hasattr(final_mod, "variance_epsilon")) else "layernorm"
    common = dict(
        model_types=(mt,), layers=layers_path, final_norm=pre + final, embed=embed,
        unembed=unembed, pos_embed=pre + pos if pos else None,
        rotary=pre + rotary if rotary else None, norm=norm, **EXTRAS.get(mt, {}),
    )
    attn = first(_ATTN, pred=lambda m: "att" in type(m).__name__.lower())
    if attn is None:
        mixer = first(_MIXER)
        if mixer is None:
            raise _refuse(mt, "blocks have neither an attention module nor a sequence mixer "
                              f"(block children: {', '.join(n for n, _ in block.named_children())})")
        if first(_MLP) is not None:
            raise _refuse(mt, "state-space blocks with an MLP beside the mixer (hybrid "
                              "state-space layout)")
        why = f"{mt} blocks have no attention (a {type(block.get_submodule(mixer)).__name__} " \
              "mixes the sequence)"
        return ArchSpec(
            name=f"{mt}", attn=None, attn_o=None, mlp=None, ln1=first(_PRE_ATTN, pred=_is_norm),
            ln2=None, mixer=mixer,
            unavailable=tuple((k, why) for k in ("attn_out", "resid_mid", "mlp_out", "head",
                                                  "attn", "q", "k", "v", "pattern")),
            **common,
        )
    attn_mod = block.get_submodule(attn)
    o_name = first(_ATTN_O, attn_mod, lambda m: getattr(m, "weight", None) is not None)
    mlp = first(_MLP)
    if mlp is None and _child(block, "fc2") is not None:
        mlp = "fc2"  # OPT/BioGPT/XGLM: fc1 -> act -> fc2 inside the block
    if mlp is None:
        raise _refuse(mt, "no MLP module in the blocks (block children: "
                          f"{', '.join(n for n, _ in block.named_children())})")
    names = {name for name, _ in block.named_children()}
    ln1 = first(_PRE_ATTN, pred=_is_norm)
    has_pre_ff = any(n in names for n in _PRE_MLP)
    post_attn = None
    if any(n in names for n in _POST_ATTN[:-1]):
        post_attn = first(_POST_ATTN[:-1], pred=_is_norm)
    elif "post_attention_layernorm" in names and (has_pre_ff or ln1 is None):
        post_attn = "post_attention_layernorm"  # Gemma 2/3, OLMo 2
    post_mlp = first(_POST_MLP, pred=_is_norm)
    ln2 = first(_PRE_MLP, pred=_is_norm)
    if ln2 is None and post_attn is None and "post_attention_layernorm" in names:
        ln2 = "post_attention_layernorm"  # Llama: the pre-MLP norm, despite its name
    parallel = _parallel(cfg, ln2, post_attn)
    unavailable = []
    if o_name is None:
        unavailable.append(("head", f"the attention module {type(attn_mod).__name__} has no "
                                    "output projection dolm can split into heads"))
    mlp_mod = block.get_submodule(mlp)
    router = next((f"{mlp}.{n}" for n in ("gate", "router")
                   if "router" in type(_child(mlp_mod, n)).__name__.lower()), None)
    residual_inside = tuple(part for part, mod in (("attn", attn_mod),
                                                   ("mlp", block.get_submodule(mlp)))
                            if _takes(mod, "residual"))
    return ArchSpec(
        name=mt, attn=attn, attn_o=f"{attn}.{o_name}" if o_name else None, mlp=mlp, ln1=ln1,
        ln2=ln2, post_attn_norm=post_attn, post_mlp_norm=post_mlp, parallel=parallel,
        router=router,
        residual_inside=residual_inside, unavailable=tuple(unavailable), **common,
    )


def _parallel(cfg, ln2, post_attn) -> bool:
    for key in ("use_parallel_residual", "parallel_attn", "parallel_residual",
                "use_parallel_block"):
        val = getattr(cfg, key, None)
        if isinstance(val, bool):
            if key == "parallel_attn" and getattr(cfg, "new_decoder_architecture", False):
                return True  # Falcon's new layout is parallel whatever parallel_attn says
            return val
    if getattr(cfg, "new_decoder_architecture", False):
        return True
    return ln2 is None and post_attn is None


def arch_for(model) -> ArchSpec:
    """The named row for the model's type, else the detected one."""
    mt = getattr(model.config, "model_type", None)
    spec = _BY_MODEL_TYPE.get(mt)
    return spec if spec is not None else detect(model)


# --------------------------------------------------------------------------- binding
def _config_value(config, name: str) -> float:
    if name == "minicpm_depth":
        return float(config.scale_depth) / math.sqrt(config.num_hidden_layers)
    val = getattr(config, name, None)
    if val is None:
        raise InputError(f"config has no {name!r}, which this adapter row needs")
    return float(val)


def apply_ops(x, ops):
    """Apply bound ``(op, float)`` operations to a tensor."""
    import torch

    for op, val in ops:
        if op == "mul":
            x = x * val
        elif op == "div":
            x = x / val
        elif op == "softcap":
            x = torch.tanh(x / val) * val
        else:  # pragma: no cover
            raise AssertionError(op)
    return x


def invert_ops(x, ops):
    """The inverse of :func:`apply_ops` (soft-cap inverted with ``atanh``, clamped)."""
    import torch

    for op, val in reversed(ops):
        if op == "mul":
            x = x / val
        elif op == "div":
            x = x * val
        elif op == "softcap":
            x = torch.atanh((x / val).clamp(-1 + 1e-6, 1 - 1e-6)) * val
        else:  # pragma: no cover
            raise AssertionError(op)
    return x


def _experts_problem(experts) -> str | None:
    """Why ``expert.L.E`` cannot be served (None: it can). dolm computes one expert's term
    by calling the experts module itself with the other experts' routing weights zeroed,
    so the module must take ``(hidden_states, top_k_index, top_k_weights)``."""
    if experts is None:
        return "no experts module beside the router"
    try:
        params = list(inspect.signature(type(experts).forward).parameters)[1:4]
    except (TypeError, ValueError):
        params = []
    if params != ["hidden_states", "top_k_index", "top_k_weights"]:
        return (f"its experts module {type(experts).__name__} does not take (hidden_states, "
                "top_k_index, top_k_weights), which dolm needs to run one expert")
    return None


def _qkv_problem(attn) -> str | None:
    """Why q/k/v/pattern sites cannot be served on this attention module (None: they can):
    they need the module to call transformers' attention interface and its modeling file
    to define the eager attention function."""
    import sys

    mods = [attn] + [m for m in attn.children() if "att" in type(m).__name__.lower()]
    for mod in mods:
        try:
            src = inspect.getsource(type(mod).forward)
        except (OSError, TypeError):
            continue
        if "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface" in src:
            eager = getattr(sys.modules.get(type(mod).__module__), "eager_attention_forward",
                            None)
            if eager is None:
                return (f"{type(mod).__name__}'s modeling file defines no eager attention "
                        "function to compute q/k/v and patterns through")
            return None
    return (f"{type(attn).__name__} does not call transformers' attention interface, where "
            "dolm reads queries, keys, values and patterns")


class Adapter:
    """An :class:`ArchSpec` bound to one loaded model: resolves paths to modules.

    ``adapter.layers`` is the block list; ``adapter.block_module(L, "attn")`` etc. give
    the modules; ``adapter.parallel`` is resolved against the config;
    ``adapter.residual_scale`` (float or None), ``adapter.pre_unembed`` and
    ``adapter.logit_ops`` (bound ``(op, float)``) are the config's multipliers.
    """

    def __init__(self, spec: ArchSpec, model):
        self.spec = spec
        self.model = model
        cfg = model.config
        soft = getattr(cfg, "final_logit_softcapping", None)
        if soft and not any(op == "softcap" for op, _ in spec.logit_ops):
            spec = replace(spec, logit_ops=spec.logit_ops + (("softcap",
                                                              "final_logit_softcapping"),))
            self.spec = spec
        self.layers = model.get_submodule(spec.layers)
        parent_path, _, attr = spec.layers.rpartition(".")
        self.layers_parent = model.get_submodule(parent_path) if parent_path else model
        self.layers_attr = attr
        self.base_model = self.layers_parent
        par = spec.parallel
        self.parallel = bool(getattr(cfg, par)) if isinstance(par, str) else bool(par)
        self.norm = spec.norm
        self.embed = model.get_submodule(spec.embed)
        self.final_norm = model.get_submodule(spec.final_norm)
        self.unembed = model.get_submodule(spec.unembed)
        self.pos_embed = model.get_submodule(spec.pos_embed) if spec.pos_embed else None
        self.rotary = model.get_submodule(spec.rotary) if spec.rotary else None
        self.residual_scale = (_config_value(cfg, spec.residual_scale)
                               if spec.residual_scale else None)
        self.pre_unembed = tuple((op, _config_value(cfg, v)) for op, v in spec.pre_unembed)
        self.logit_ops = tuple((op, _config_value(cfg, v)) for op, v in spec.logit_ops)
        self.unavailable = dict(spec.unavailable)
        if spec.attn is not None and "q" not in self.unavailable:
            why = _qkv_problem(self.layers[0].get_submodule(spec.attn))
            if why:
                for kind in ("q", "k", "v", "pattern"):
                    self.unavailable[kind] = why
        if spec.router is None:
            self.unavailable.setdefault("router", "its MLP is not a mixture of experts with a "
                                                  "router module")
            self.unavailable.setdefault("expert", self.unavailable["router"])
        else:
            why = _experts_problem(next((m for m in map(self.experts_module,
                                                        range(len(self.layers)))
                                         if m is not None), None))
            if why:
                self.unavailable["expert"] = why
        if spec.mixer is None:
            self.unavailable["mixer_out"] = ("its blocks have attention and an MLP "
                                             "(mixer_out is for state-space blocks)")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def post_norm(self) -> bool:
        return bool(self.spec.post_attn_norm or self.spec.post_mlp_norm)

    def describe(self) -> str:
        """The layout with ``parallel`` resolved against the config."""
        return replace(self.spec, parallel=self.parallel).layout

    def block(self, layer: int):
        return self.layers[layer]

    def block_module(self, layer: int, part: str):
        """``part``: ``attn``, ``attn_o``, ``mlp``, ``ln1``, ``ln2``, ``post_attn_norm``,
        ``post_mlp_norm``, ``mixer``, ``router``."""
        path = getattr(self.spec, part)
        if path is None:
            raise InputError(f"architecture {self.spec.name!r} has no {part} module")
        return self.layers[layer].get_submodule(path)

    def attn_out_module(self, layer: int):
        """The module whose output is ``attn_out.L`` (before any residual scale)."""
        part = "post_attn_norm" if self.spec.post_attn_norm else "attn"
        return self.block_module(layer, part)

    def mlp_out_module(self, layer: int):
        part = "post_mlp_norm" if self.spec.post_mlp_norm else "mlp"
        return self.block_module(layer, part)

    def experts_module(self, layer: int):
        """The MoE block's experts (a sibling of the router), or None."""
        if self.spec.router is None:
            return None
        return _child(self.layers[layer], self.spec.router.rpartition(".")[0] + ".experts")

    def logits_from_final_norm(self, h):
        """The model's logits from the final norm's output (multipliers and caps applied)."""
        if self.pre_unembed:
            h = apply_ops(h, self.pre_unembed)
        out = self.unembed(h)
        return apply_ops(out, self.logit_ops) if self.logit_ops else out

    def module_paths(self) -> dict[str, str]:
        """Abstract name -> module path (block parts with ``{L}`` for the layer)."""
        out = {}
        for key in ("embed", "pos_embed", "rotary", "final_norm", "unembed"):
            val = getattr(self.spec, key)
            if val:
                out[key] = val
        for key in ("attn", "attn_o", "mlp", "ln1", "ln2", "post_attn_norm", "post_mlp_norm",
                    "mixer"):
            val = getattr(self.spec, key)
            if val:
                out[key] = f"{self.spec.layers}.{{L}}.{val}"
        return out
