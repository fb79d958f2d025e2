"""Option checks for dolm-lens that need no model (and no torch import)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dolm.errors import InputError
from dolm.positions import parse_positions


@dataclass
class TrainConfig:
    """Tuned-lens training settings (see the module docstring for their origin)."""

    steps: int = 250
    tokens_per_step: int = 4096
    lr_scale: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-3
    max_tokens: int = 32768
    max_length: int = 256
    holdout: float = 0.1
    seed: int = 0
    optimizer: str = "sgd-nesterov"
    schedule: str = "linear decay to 0, no warm-up"
    loss: str = "KL(final || lens), mean over tokens, summed over layers"
    extra: dict = field(default_factory=dict)


def check_request(*, prompts: str, positions: str, top_k: int, translators: str | None,
                  lens: str | None, run: Any) -> tuple[Any, tuple[str, list[int]], list[str]]:
    """Cheap checks before the model loads: options, then the prompts table."""
    from dolm.formats import read_table

    if top_k < 1:
        raise InputError(f"--top-k: expected a positive integer, found {top_k}")
    kind, ints = parse_positions(positions)
    pos = (kind, ints or [])
    want = lens or ("both" if translators else "logit")
    lenses = ["logit", "tuned"] if want == "both" else [want]
    if "tuned" in lenses and not translators:
        raise InputError(f"--lens {want}: the tuned lens needs --translators FILE "
                         "(train them with `dolm-lens train`)")
    df, _meta = read_table(prompts, schema="prompts", run=run)
    if len(df) == 0:
        raise InputError(f"{prompts}: no prompts (the table is empty)")
    return df, pos, lenses


def check_train(cfg: Any) -> None:
    """Training settings in range (InputError naming the option otherwise)."""
    for name, value, lo in (("--steps", cfg.steps, 1),
                            ("--tokens-per-step", cfg.tokens_per_step, 1),
                            ("--max-tokens", cfg.max_tokens, 2),
                            ("--max-length", cfg.max_length, 2)):
        if value < lo:
            raise InputError(f"{name}: expected an integer >= {lo}, found {value}")
    if not 0 <= cfg.holdout < 1:
        raise InputError(f"--holdout: expected a fraction in [0, 1), found {cfg.holdout}")
    if cfg.lr_scale <= 0:
        raise InputError(f"--lr-scale: expected a positive number, found {cfg.lr_scale}")
    if not 0 <= cfg.momentum < 1:
        raise InputError(f"--momentum: expected a number in [0, 1), found {cfg.momentum}")
    if cfg.weight_decay < 0:
        raise InputError(f"--weight-decay: expected a number >= 0, found {cfg.weight_decay}")


def read_texts(path: str, text_column: str, run: Any) -> list[str]:
    """Training texts: a column of a table (Parquet/CSV/JSONL), or the non-empty lines
    of a text file."""
    import os

    from dolm.formats import read_table, sniff

    if path != "-" and not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    kind = sniff(path) if path != "-" else "parquet"
    if kind in ("parquet", "csv"):
        df, _ = read_table(path, run=run)
        if text_column not in df.columns:
            raise InputError(f"{path}: no column {text_column!r} (columns: "
                             f"{', '.join(map(str, df.columns))}); choose one with --text-column")
        texts = [str(t) for t in df[text_column].tolist() if t is not None and t == t]
    elif kind in ("hdf5", "safetensors"):
        raise InputError(f"{path}: is a {kind} file, expected a prompts table or a text file")
    else:
        try:
            with open(path, encoding="utf-8") as fh:
                texts = [line.rstrip("\n") for line in fh]
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not a UTF-8 text file ({exc})") from None
        run.add_input(path)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(f"{path}: no training text (empty table or file)")
    return texts
