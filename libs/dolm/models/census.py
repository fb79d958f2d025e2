"""The model census: every causal-LM ``model_type`` of the installed transformers, built
tiny from its config, saved, loaded through :func:`dolm.models.load` as a user would
(``--model /path``), and given a verdict.

Verdicts: ``SUPPORTED`` (loaded and every identity of :mod:`dolm.models.verify` holds),
``REFUSED`` (dolm said why: an :class:`~dolm.errors.InputError` naming the reason),
``SKIPPED`` (transformers itself could not build, save or reload a tiny model of the type
here: a missing optional package, a config that needs a sub-model, ...). Anything else
is a ``CRASH`` (a bug in dolm; the census exits 1 if there is one).

``python -m dolm.models.census [--out docs/models.md] [--types a,b,...]`` (``just census``).
"""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

# Small sizes, set wherever the config class takes (or maps) the name.
_SMALL = dict(
    num_hidden_layers=2, n_layer=2, num_layers=2, n_layers=2, num_decoder_layers=2,
    hidden_size=32, n_embd=32, d_model=32, dim=32, embed_dim=32, hidden_dim=32, n_embed=32,
    intermediate_size=64, n_inner=64, ffn_dim=64, ffn_hidden_size=64, d_ff=64,
    ffn_embed_dim=64, decoder_ffn_dim=64, decoder_layers=2, decoder_attention_heads=4,
    num_attention_heads=4, n_head=4, num_heads=4, n_heads=4, decoder_embed_dim=32,
    num_key_value_heads=2, num_kv_heads=2, n_kv_heads=2, multi_query_group_num=2,
    head_dim=8, kv_channels=8, attention_head_dim=8,
    max_position_embeddings=64, n_positions=64, max_seq_len=64, seq_length=64, n_ctx=64,
    max_sequence_length=64,
    moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
    moe_num_experts=4, num_experts_per_tok=2, moe_k=2, top_k=2, moe_topk=2, n_shared_experts=1,
    shared_expert_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    qk_head_dim=16,
    state_size=8, ssm_state_size=8, mamba_d_state=8, conv_kernel=4, time_step_rank=4,
    mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, n_groups=1, mamba_expand=2,
    initializer_range=0.1, tie_word_embeddings=False, use_cache=False, rotary_dim=4,
)
_MAX_PARAMS = 3_000_000

# Types whose defaults hide what the census must see: non-unit multipliers, caps.
_OVERRIDES: dict[str, dict] = {
    "granite": dict(residual_multiplier=0.5, embedding_multiplier=3.0, logits_scaling=2.0,
                    attention_multiplier=0.3),
    "granitemoe": dict(residual_multiplier=0.5, embedding_multiplier=3.0, logits_scaling=2.0,
                       attention_multiplier=0.3),
    "granitemoeshared": dict(residual_multiplier=0.5, embedding_multiplier=3.0,
                             logits_scaling=2.0, attention_multiplier=0.3),
    "granitemoehybrid": dict(residual_multiplier=0.5, embedding_multiplier=3.0,
                             logits_scaling=2.0, attention_multiplier=0.3),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=8),
    "cohere": dict(logit_scale=0.5),
    "cohere2": dict(logit_scale=0.5),
}


def causal_lm_types() -> list[str]:
    """Every ``model_type`` the installed transformers maps to ``AutoModelForCausalLM``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _accepted(cls) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            names |= set(inspect.signature(klass.__init__).parameters)
        names |= set(getattr(klass, "attribute_map", {}) or {})
    return names


def tiny_config(model_type: str, vocab_size: int, bos: int, eos: int, pad: int,
                **extra):
    """A config of ``model_type`` as small as it will build (2 layers, width 32)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    ok = _accepted(cls)
    kw = {k: v for k, v in _SMALL.items() if k in ok}
    kw.update(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    kw.update(_OVERRIDES.get(model_type, {}))
    kw.update({k: v for k, v in extra.items() if k in ok})
    text_key = next((k for k in ("text_config",) if k in ok), None)
    if text_key:
        sub = cls().get_text_config()
        sok = _accepted(type(sub))
        skw = {k: v for k, v in _SMALL.items() if k in sok}
        skw.update(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
        skw.update({k: v for k, v in extra.items() if k in sok})
        kw[text_key] = skw
    try:
        return cls(**kw)
    except Exception:
        # drop the MoE/MLA extras first, then everything but the basic sizes
        basic = ("num_hidden_layers", "n_layer", "num_layers", "hidden_size", "n_embd",
                 "intermediate_size", "num_attention_heads", "n_head", "vocab_size",
                 "bos_token_id", "eos_token_id", "pad_token_id")
        return cls(**{k: v for k, v in kw.items() if k in basic})


def build(model_type: str, out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random ``model_type`` model and a tiny tokenizer to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    from dolm.models.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer("gpt", vocab_size=200)
    ids = torch.tensor([tok("- the cat sat on the mat.")["input_ids"]] * 2)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # a padded row, as dolm runs it
    problem = None
    # grouped-query attention first; some attention kinds (MLA) need as many kv heads
    for extra in ({}, {"num_key_value_heads": 4, "num_kv_heads": 4}):
        cfg = tiny_config(model_type, len(tok), tok.bos_token_id, tok.eos_token_id,
                          tok.pad_token_id, **extra)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg)
        n = sum(p.numel() for p in meta.parameters())
        if n > _MAX_PARAMS:
            raise _Skip(f"smallest config built has {n / 1e6:.1f}M parameters")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.eval()
        try:  # the model's own forward must run before dolm is asked anything
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            problem = None
            break
        except Exception as exc:
            problem = f"transformers' own forward fails on the tiny model: " \
                      f"{type(exc).__name__}: {_one_line(exc)}"
    if problem:
        raise _Skip(problem)
    model.eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


class _Skip(Exception):
    pass


def census_one(model_type: str, work: Path) -> tuple[str, str]:
    """(verdict, reason) for one type."""
    from dolm.errors import InputError
    from dolm.models import load

    folder = work / model_type
    try:
        build(model_type, folder)
    except _Skip as exc:
        return "SKIPPED", str(exc)
    except Exception as exc:  # transformers could not build/save it tiny here
        return "SKIPPED", f"{type(exc).__name__}: {_one_line(exc)}"
    try:
        lm = load(str(folder), device="cpu")
    except InputError as exc:
        return "REFUSED", _one_line(exc).replace(str(folder), "<dir>")
    except Exception as exc:
        return "CRASH", f"{type(exc).__name__}: {_one_line(exc)}\n{traceback.format_exc()}"
    return "SUPPORTED", f"{lm.adapter.name}: {lm.adapter.describe()}"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def run_census(types=None, log=sys.stderr) -> list[tuple[str, str, str]]:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dolm-census-") as tmp:
        os.environ.setdefault("DOLM_CACHE_DIR", str(Path(tmp) / "cache"))
        for mt in types or causal_lm_types():
            t0 = time.time()
            verdict, why = census_one(mt, Path(tmp))
            rows.append((mt, verdict, why))
            print(f"{mt:28s} {verdict:9s} {time.time() - t0:5.1f}s  {why.splitlines()[0]}",
                  file=log, flush=True)
    return rows


def render(rows, seconds: float) -> str:
    import transformers

    counts = {v: sum(1 for _, x, _ in rows if x == v) for v in
              ("SUPPORTED", "REFUSED", "SKIPPED", "CRASH")}
    out = [
        "# Models dolm serves",
        "",
        "Generated by `just census` (`python -m dolm.models.census`); do not edit by hand.",
        "",
        f"Every `model_type` that transformers {transformers.__version__} maps to "
        f"`AutoModelForCausalLM` ({len(rows)} types), built as a tiny random model from its "
        "config (2 layers, width 32), saved to a folder and loaded as `--model /path`. "
        "SUPPORTED means every identity of `dolm.models.verify` holds on it (the residual "
        "stream decomposes, heads sum to the attention output, `final_norm` and `logits` "
        "equal the model's, `run_from_layer` equals the full forward, padding parity); "
        "REFUSED gives dolm's message; SKIPPED says why transformers could not build it tiny "
        "here.",
        "",
        f"**{counts['SUPPORTED']} supported, {counts['REFUSED']} refused, "
        f"{counts['SKIPPED']} skipped, {counts['CRASH']} crashed** "
        f"(census time {seconds:.0f} s).",
        "",
        "| model_type | verdict | layout / reason |",
        "| --- | --- | --- |",
    ]
    for mt, verdict, why in rows:
        why = why.splitlines()[0].replace("|", "\\|")
        out.append(f"| {mt} | {verdict} | {why} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dolm.models.census", description=__doc__)
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--types", default=None, help="comma list of model types (default: all)")
    args = ap.parse_args(argv)
    types = [t.strip() for t in args.types.split(",")] if args.types else None
    t0 = time.time()
    rows = run_census(types)
    seconds = time.time() - t0
    text = render(rows, seconds)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    crashes = [r for r in rows if r[1] == "CRASH"]
    for mt, _, why in crashes:
        print(f"CRASH {mt}: {why}", file=sys.stderr)
    return 1 if crashes else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
