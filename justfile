# dolm recipes. `just --list` shows them all.
set shell := ["bash", "-euo", "pipefail", "-c"]

export HF_HUB_OFFLINE := "1"
export HF_HUB_DISABLE_PROGRESS_BARS := "1"
export TOKENIZERS_PARALLELISM := "false"

default:
    @just --list

# The whole test suite (what CI runs).
test:
    python -m pytest -q -n 2 --durations=15

# Lint.
lint:
    ruff check .
