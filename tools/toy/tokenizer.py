"""The toy model's own byte-level BPE tokenizer, trained on the task corpus.

Pre-tokenisation is GPT-2's, with one change: digits are split one by one, and a
digit keeps its leading space (``" 123"`` -> ``" 1" "2" "3"``), so ``" 1"`` and
``"1"`` are both single tokens. Every answer/choice token the studies use is
asserted to be exactly one token (:func:`check_single_tokens`).
"""

from __future__ import annotations

from collections.abc import Iterable

BOS = "<|endoftext|>"
PAD = "<|pad|>"

# GPT-2's split, with `` ?\p{N}+`` replaced by `` ?\p{N}`` (one digit per piece).
SPLIT_PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)

DIGITS = [str(d) for d in range(10)]
# Answer / choice tokens every study relies on (each must be ONE token).
REQUIRED_TOKENS = (
    [" X", " Y", " A", " B", " C", " D", "X", "Y", "A", "B"]
    + DIGITS
    + [" " + d for d in DIGITS]
    + [" yes", " no", " Yes", " No"]
)


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    required: Iterable[str] = REQUIRED_TOKENS,
    n_positions: int = 512,
):
    """Train a ByteLevel BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    ``required`` strings are added to the training corpus many times, so the BPE
    learns each as one token (checked afterwards).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    required = list(required)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def corpus():
        yield from texts
        for _ in range(200):
            yield " ".join(required) + " " + "".join(required)

    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=BOS,
        pad_token=PAD,
        model_max_length=n_positions,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    check_single_tokens(fast, required)
    return fast


def check_single_tokens(tokenizer, strings: Iterable[str] = REQUIRED_TOKENS) -> dict[str, int]:
    """Return ``{string: token id}``; raise ``ValueError`` if one is not exactly one token."""
    out: dict[str, int] = {}
    bad = []
    for s in strings:
        ids = tokenizer.encode(s, add_special_tokens=False)
        if len(ids) != 1:
            bad.append(f"{s!r} -> {tokenizer.convert_ids_to_tokens(ids)}")
        else:
            out[s] = ids[0]
    if bad:
        raise ValueError("not single tokens: " + "; ".join(bad))
    return out
