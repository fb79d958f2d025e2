"""Shared fixtures: tiny randomly initialised models of every supported family.

- ``tiny_model_dir(family="gpt2") -> Path``: an HF folder (config, safetensors weights,
  fast byte-level BPE tokenizer) that ``dolm.models.load(path)`` loads offline. Built
  once per session per family. Families: ``dolm.models.tiny.FAMILIES`` (``gpt2``,
  ``gpt_neox``, ``gpt_neox_seq``, ``llama``, ``qwen2``, ``mistral``, ``qwen3``,
  ``gemma``, ``phi3``, ``gptj``, ``gpt_neo``). 3 layers, 4 heads, d_model 32, context 64,
  vocab ~550 (every corpus word is one token with its leading space, most are several
  without it). Llama/Mistral/Gemma/Phi-3 tokenizers prepend ``<s>``; the others add nothing.
- ``tiny_gpt2_dir``: ``tiny_model_dir("gpt2")``.
- ``tiny_lm(family="gpt2", **load_kwargs) -> LoadedModel``: loaded once per session per
  (family, kwargs); treat it as read-only (traces clean up after themselves).

- ``in_process(exe, *args, env=None) -> result``: ``dolm-<tool> ARGS`` run in this
  process (the installed console script's click command, its exit codes and error
  handling; torch on one thread, ``DOLM_PROGRESS=0``), for a reference run or a bad-input
  case that need not pay a cold import of torch in a new process; ``result`` has
  ``returncode``, ``stdout`` and ``stderr`` as ``subprocess.run``'s.
- ``one_thread``: module-scoped; torch on one thread while a test module runs (opt in with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``).

Tests marked ``slow`` run first (stable order otherwise): under pytest-xdist the suite
ends when its last long test does, so the long ones start first and the short ones fill
the gaps.

Also, for the whole session: ``DOLM_CACHE_DIR`` points to a temporary folder (weights
hash cache), HF progress bars are off, and torch (and every child process, by
``OMP_NUM_THREADS``) computes on one thread: tiny models gain nothing from more, and
``-n 2`` workers on 2 cores with 2 threads each thrash (4x the CPU time of one thread
on a busy machine).
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def _dolm_test_env(tmp_path_factory):
    import torch

    saved = {k: os.environ.get(k) for k in ("DOLM_CACHE_DIR", "HF_HUB_DISABLE_PROGRESS_BARS",
                                            "OMP_NUM_THREADS")}
    os.environ["DOLM_CACHE_DIR"] = str(tmp_path_factory.mktemp("dolm-cache"))
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"  # child processes too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_in_process(exe: str, *args, env: dict | None = None):
    """``exe ARGS`` (a ``dolm-*`` console script) run in this process: its click command,
    exit codes and error handling, torch on one thread, ``DOLM_PROGRESS=0``."""
    import importlib.metadata
    from types import SimpleNamespace

    import torch
    from click.testing import CliRunner

    (entry,) = importlib.metadata.entry_points(group="console_scripts", name=exe)
    main = entry.load()
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = CliRunner().invoke(main, [str(a) for a in args], prog_name=exe,
                               env={"DOLM_PROGRESS": "0", **(env or {})})
    finally:
        torch.set_num_threads(saved)
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


@pytest.fixture(scope="session")
def in_process():
    return run_in_process


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for cores)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from dolm.models.tiny import build_tiny_model

    built: dict[str, object] = {}

    def make(family: str = "gpt2"):
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return built[family]

    return make


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_model_dir):
    return tiny_model_dir("gpt2")


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir):
    from dolm.models import load

    loaded: dict[tuple, object] = {}

    def get(family: str = "gpt2", **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = load(str(tiny_model_dir(family)), **kwargs)
        return loaded[key]

    return get


@pytest.fixture(scope="session")
def circuit_scorer(tiny_lm):
    """``family -> (lm, data, scorer)``: three clean/counterfactual prompt pairs prepared for
    the circuit scorer (logit_diff, counterfactual corruption) on a tiny model."""
    import pandas as pd
    from dolm.circuits.scores import Scorer, prepare

    def get(family: str = "gpt2"):
        lm = tiny_lm(family)
        df = pd.DataFrame({
            "prompt_id": ["p0", "p1", "p2"],
            "prompt": ["the king of France", "a red cat and a", "one two three four five"],
            "cf_prompt": ["the queen of Italy", "a blue dog and a", "five four three two one"],
            "target": [" is", " dog", " six"], "foil": [" was", " cat", " one"]})
        data = prepare(lm, df, "t", "logit_diff", "cf")
        return lm, data, Scorer(lm, data, "logit_diff", batch_size=2)

    return get
