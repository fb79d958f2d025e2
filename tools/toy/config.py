"""Reading the toy model's training config (TOML: mixture, sizes, hyper-parameters)."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).with_name("toy_config.toml")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """Load a TOML config; ``overrides`` are ``section.key=value`` strings (TOML values)."""
    path = Path(path) if path else DEFAULT_CONFIG
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    for ov in overrides or []:
        if "=" not in ov:
            raise ValueError(f"--set {ov!r}: expected section.key=value")
        key, val = ov.split("=", 1)
        try:
            value = tomllib.loads(f"v = {val}")["v"]
        except tomllib.TOMLDecodeError:
            value = val
        node = cfg
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def resolved(cfg: dict) -> dict:
    return copy.deepcopy(cfg)
