"""Declarative architecture adapters: abstract component names -> module paths.

An architecture is data, not a subclass. Each :class:`ArchSpec` row names, for one
family of Hugging Face causal LMs, where the components every dolm site needs live:

=================  ==========================================================
field              meaning
=================  ==========================================================
``model_types``    ``config.model_type`` values served by this row
``layers``         path (from the ``*ForCausalLM`` model) of the block list
``attn``           path inside a block of the attention module; its output
                   (``tensor`` or tuple whose item 0 is the tensor added to the
                   residual stream) is ``attn_out.L``; item 1 is the attention
                   pattern when the eager implementation is used
``attn_o``         path inside a block of the attention output projection;
                   its *input* is the concatenation of the heads (``head.L.H``)
``mlp``            path inside a block of the MLP; its output is ``mlp_out.L``
``ln1`` / ``ln2``  paths inside a block of the pre-attention / pre-MLP norms
                   (``ln2`` is ``None`` when the block has a single norm)
``final_norm``     path of the final norm (``final_norm`` site)
``embed``          path of the token embedding (``embed`` site)
``unembed``        path of the unembedding (``logits`` site)
``pos_embed``      path of a learned absolute position embedding, if any
``rotary``         path of the model-level rotary module, if any
``parallel``       ``True``/``False``, or the name of a boolean config attribute
                   (GPT-NeoX ``use_parallel_residual``)
``norm``           ``"layernorm"`` or ``"rmsnorm"``
``block_tuple``    blocks return a tuple ``(hidden, ...)`` rather than a tensor
                   (transformers 5: GPT-J, GPT-Neo); hooks handle both anyway
=================  ==========================================================

Adding an architecture is adding one row to :data:`ARCHITECTURES`; the hook code
never branches on the architecture. An architecture qualifies when attention and MLP
outputs are added to the residual stream unchanged (no post-norms, as in Gemma 2/3 or
OLMo 2), so ``resid_post = resid_pre + attn_out + mlp_out`` holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from dolm.errors import InputError


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    layers: str
    attn: str
    attn_o: str
    mlp: str
    ln1: str
    ln2: str | None
    final_norm: str
    embed: str
    unembed: str
    pos_embed: str | None = None
    rotary: str | None = None
    parallel: bool | str = False
    norm: str = "layernorm"
    block_tuple: bool = False


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
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "olmo"),
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


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def spec_for(model_type: str, where: str = "") -> ArchSpec:
    """The adapter row for ``config.model_type``; InputError if there is none."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise InputError(
            f"{where + ': ' if where else ''}model_type {model_type!r} has no dolm adapter; "
            f"supported: {', '.join(supported_model_types())}"
        ) from None


class Adapter:
    """An :class:`ArchSpec` bound to one loaded model: resolves paths to modules.

    ``adapter.layers`` is the block list; ``adapter.block_module(L, "attn")`` etc. give
    the modules; ``adapter.parallel`` is resolved against the config.
    """

    def __init__(self, spec: ArchSpec, model):
        self.spec = spec
        self.model = model
        self.layers = model.get_submodule(spec.layers)
        parent_path, _, attr = spec.layers.rpartition(".")
        self.layers_parent = model.get_submodule(parent_path) if parent_path else model
        self.layers_attr = attr
        self.base_model = self.layers_parent
        par = spec.parallel
        self.parallel = bool(getattr(model.config, par)) if isinstance(par, str) else bool(par)
        self.norm = spec.norm
        self.embed = model.get_submodule(spec.embed)
        self.final_norm = model.get_submodule(spec.final_norm)
        self.unembed = model.get_submodule(spec.unembed)
        self.pos_embed = model.get_submodule(spec.pos_embed) if spec.pos_embed else None
        self.rotary = model.get_submodule(spec.rotary) if spec.rotary else None

    @property
    def name(self) -> str:
        return self.spec.name

    def block(self, layer: int):
        return self.layers[layer]

    def block_module(self, layer: int, part: str):
        """``part`` is one of ``attn``, ``attn_o``, ``mlp``, ``ln1``, ``ln2``."""
        path = getattr(self.spec, part)
        if path is None:
            raise InputError(f"architecture {self.spec.name!r} has no {part} module")
        return self.layers[layer].get_submodule(path)

    def module_paths(self) -> dict[str, str]:
        """Abstract name -> module path (block parts with ``{L}`` for the layer)."""
        out = {}
        for key in ("embed", "pos_embed", "rotary", "final_norm", "unembed"):
            val = getattr(self.spec, key)
            if val:
                out[key] = val
        for key in ("attn", "attn_o", "mlp", "ln1", "ln2"):
            val = getattr(self.spec, key)
            if val:
                out[key] = f"{self.spec.layers}.{{L}}.{val}"
        return out
