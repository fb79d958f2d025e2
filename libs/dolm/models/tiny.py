"""Tiny randomly initialised models of every supported family, for tests and demos.

``build_tiny_model(out_dir, family)`` writes an HF folder (config, safetensors weights,
fast byte-level BPE tokenizer) that ``dolm.models.load(out_dir)`` loads offline. No
download: configs are built here, weights are random (seeded), the tokenizer is trained
on a small built-in corpus in well under a second.

Families: ``gpt2``, ``gpt_neox`` (parallel residual, partial rotary),
``gpt_neox_seq`` (sequential residual), ``llama`` (grouped-query attention), ``qwen2``,
``mistral`` (sliding window 8), ``qwen3``, ``gemma``, ``phi3``, ``gptj``, ``gpt_neo``.
Tokenizer styles follow the real models: Llama/Mistral/Gemma/Phi-3 tokenizers prepend
a BOS token (``<s>``); GPT-2/NeoX/Qwen/GPT-J/GPT-Neo ones do not.
"""

from __future__ import annotations

import os
from pathlib import Path

FAMILIES = (
    "gpt2",
    "gpt_neox",
    "gpt_neox_seq",
    "llama",
    "qwen2",
    "mistral",
    "qwen3",
    "gemma",
    "phi3",
    "gptj",
    "gpt_neo",
)
MAIN_FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "mistral")
BOS_FAMILIES = ("llama", "mistral", "gemma", "phi3")

_WORDS = (
    "the a an of to in is was and that it for on with as by at from his her their this "
    "Paris France Rome Italy Berlin Germany Tokyo Japan capital city river tower king queen "
    "A B C D X Y yes no Yes No answer question option choose because so then "
    "one two three four five six seven eight nine ten plus minus equals sum "
    "red blue green cat dog bird tree house car book apple water fire"
).split()


def _corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        k = rng.randint(4, 12)
        words = [rng.choice(_WORDS) for _ in range(k)]
        # a leading "- " so words are (almost) always learned with their leading space
        lines.append("- " + " ".join(words) + rng.choice([".", "?", "!", ":", ","]))
    digits = " ".join(str(i) for i in range(100))
    lines += [digits] * 5
    lines += ["- " + " ".join(_WORDS)] * 20
    return lines


def build_tiny_tokenizer(style: str = "gpt", vocab_size: int = 600, model_max_length: int = 64):
    """A fast byte-level BPE tokenizer.

    ``style="gpt"``: special token ``<|endoftext|>`` is bos/eos/pad... except pad, which
    is ``<|pad|>``; nothing is prepended. ``style="llama"``: ``<s>``/``</s>``/``<pad>``,
    and the post-processor prepends ``<s>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style == "gpt":
        specials = ["<|endoftext|>", "<|pad|>"]
        bos, eos, pad = "<|endoftext|>", "<|endoftext|>", "<|pad|>"
    elif style == "llama":
        specials = ["<unk>", "<s>", "</s>", "<pad>"]
        bos, eos, pad = "<s>", "</s>", "<pad>"
    else:
        raise ValueError(f"style must be 'gpt' or 'llama', not {style!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=True)
    if style == "llama":
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence(
            [
                byte_level,
                processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
                ),
            ]
        )
    else:
        tok.post_processor = byte_level
    kwargs = dict(bos_token=bos, eos_token=eos, pad_token=pad)
    if style == "llama":
        kwargs["unk_token"] = "<unk>"
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    return fast


def tiny_config(family: str, vocab_size: int, bos_id: int, eos_id: int, pad_id: int,
                n_layers: int = 3, d_model: int = 32, n_heads: int = 4, n_ctx: int = 64):
    """A transformers config for a tiny model of ``family``."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id,
                  pad_token_id=pad_id, initializer_range=0.1)
    llama_like = dict(
        hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_heads // 2,
        max_position_embeddings=n_ctx, tie_word_embeddings=False, **common,
    )
    if family == "gpt2":
        return tf.GPT2Config(n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family in ("gpt_neox", "gpt_neox_seq"):
        return tf.GPTNeoXConfig(
            hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
            intermediate_size=2 * d_model, max_position_embeddings=n_ctx,
            rotary_pct=0.5, use_parallel_residual=(family == "gpt_neox"),
            tie_word_embeddings=False, **common,
        )
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(sliding_window=8, **llama_like)
    if family == "qwen3":
        return tf.Qwen3Config(head_dim=2 * d_model // n_heads, **llama_like)
    if family == "gemma":
        return tf.GemmaConfig(head_dim=d_model // n_heads, **llama_like)
    if family == "phi3":
        return tf.Phi3Config(**llama_like)
    if family == "gptj":
        return tf.GPTJConfig(n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                             rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                             tie_word_embeddings=False, **common)
    if family == "gpt_neo":
        return tf.GPTNeoConfig(
            hidden_size=d_model, num_layers=2, num_heads=n_heads,
            attention_types=[[["global", "local"], 1]], window_size=8,
            max_position_embeddings=n_ctx, resid_dropout=0.0, embed_dropout=0.0,
            attention_dropout=0.0, **common,
        )
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}")


def build_tiny_model(out_dir, family: str = "gpt2", seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny random ``family`` model + tokenizer to ``out_dir``; return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    style = "llama" if family in BOS_FAMILIES else "gpt"
    tok = build_tiny_tokenizer(style, model_max_length=config_kwargs.get("n_ctx", 64))
    cfg = tiny_config(family, vocab_size=len(tok), bos_id=tok.bos_token_id,
                      eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, **config_kwargs)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":  # pragma: no cover - convenience: python -m dolm.models.tiny DIR FAMILY
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join("runs", "tiny-gpt2")
    fam = sys.argv[2] if len(sys.argv) > 2 else "gpt2"
    print(build_tiny_model(target, fam))
