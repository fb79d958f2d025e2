"""dolm.models: one model-loading library with one site vocabulary.

Importing this package is cheap (torch/transformers load on first use).

Public API
----------
``load(spec, revision=None, dtype="auto", device="auto", device_map=None,
load_in_4bit=False, load_in_8bit=False, trust_remote_code=False) -> LoadedModel``
    ``spec``: ``toy`` | local folder | hub id (see :mod:`dolm.models.loading`).

``LoadedModel`` attributes: ``model``, ``tokenizer``, ``config``, ``adapter``
(:class:`~dolm.models.adapters.Adapter`), ``info`` (dict: spec, path, source,
revision, architecture, model_type, adapter, weights_sha256, dtype, quantization,
device, n_params, n_layers), dims ``n_layers``, ``n_heads``, ``n_kv_heads``,
``d_model``, ``d_head``, ``d_mlp``, ``d_vocab``, ``n_ctx``, ``device`` (input device),
``dtype``, ``parallel_residual``, ``prepends_bos``, ``pad_id``, ``sites``.

``LoadedModel`` methods:

- ``expand_sites(pattern_or_list) -> list[str]``; ``parse_site(name) -> Site``
- ``trace(read=(), write=None, *, batch_index=None, detach=True) -> Trace``
  (context manager; ``tr[site]``); write fns ``fn(act, batch_index) -> act``
- ``encode(texts, *, names=None, add_bos=None, max_length=None, device=None) -> Encoding``
  (``input_ids``, ``attention_mask``, ``last_index``, ``lengths``, ``offsets``,
  ``n_prefix``, ``span_to_tokens(row, start, end)``, ``span_last_token(...)``)
- ``forward(enc, **kw)``: ``model(input_ids=..., attention_mask=..., use_cache=False)``
- ``token_id(s) -> int``; ``choice_token_ids(choices, first_token=False) -> list[int]``;
  ``to_str_tokens(ids) -> list[str]``
- ``layer_context(attention_mask, position_ids=None) -> LayerContext``
- ``run_from_layer(hidden, start_layer, attention_mask=None, position_ids=None, *,
  context=None, positions=None, write=None, batch_index=None) -> logits``

Batching: ``run_batched(n_items, fn, batch_size="auto"|int, *, max_batch_size=64)``,
``iter_batched(...)`` (yields ``(start, stop, result)``), ``is_oom(exc)``,
``parse_batch_size(value)``.

Sites: see :mod:`dolm.models.sites` (also ``q.L.H``, ``k.L.H``, ``v.L.H``, ``pattern.L.H``
inside the attention, ``mixer_out.L`` on state-space blocks). Adapters:
:mod:`dolm.models.adapters` (named rows, else detected from the module structure).
Verify, then trust: :mod:`dolm.models.verify` (identities run on first load, cached;
``load(..., verify=False)`` skips them). The census of every causal-LM type:
:mod:`dolm.models.census` (``just census`` -> docs/models.md).
Tiny random models for tests/demos: :mod:`dolm.models.tiny`
(``build_tiny_model(out_dir, family)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from dolm.models.loaded import LoadedModel

__all__ = [
    "load",
    "LoadedModel",
    "Encoding",
    "LayerContext",
    "Trace",
    "run_batched",
    "iter_batched",
    "is_oom",
    "parse_batch_size",
    "pad_right",
    "supported_model_types",
]


def load(
    spec: str,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map=None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``spec`` (``toy``, a local folder or a hub id); see :func:`dolm.models.loading.load`."""
    from dolm.models.loading import load as _load

    return _load(spec, revision=revision, dtype=dtype, device=device, device_map=device_map,
                 load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                 trust_remote_code=trust_remote_code)


_LAZY = {
    "LoadedModel": "dolm.models.loaded",
    "Encoding": "dolm.models.loaded",
    "LayerContext": "dolm.models.loaded",
    "Trace": "dolm.models.hooks",
    "run_batched": "dolm.models.batching",
    "iter_batched": "dolm.models.batching",
    "is_oom": "dolm.models.batching",
    "parse_batch_size": "dolm.models.batching",
    "pad_right": "dolm.models.batching",
    "supported_model_types": "dolm.models.adapters",
}


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'dolm.models' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)
