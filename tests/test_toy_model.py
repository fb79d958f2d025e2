"""The committed toy model (models/toy): loading, tokens, sites, and its card.

The card's numbers (models/toy/metrics.json, rendered in README.md) were measured with
dolm-gen-prompts -> dolm-collect-acts on every held-out prompt; here a small evenly
spaced sample of each prompt set is re-scored in process (same definitions) and must
agree with the card within the tolerances below, so the weights and the card cannot
drift apart.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "models" / "toy"

# |sample metric - card metric| allowed; a sample of n prompts of accuracy p has a
# standard error sqrt(p(1-p)/n): these are about 3 standard errors at the sample sizes
# used, and far below what a retrained or corrupted model moves.
TOL = {
    "factual.top1": 0.06,            # 96 prompts
    "bayes.mean_abs_error": 0.02,    # 6 orderings x 11 evidence counts (absolute)
    "formats.by_format": 0.25,       # 24 units per format
    "arith.cot_exact_match": 0.25,   # 30 problems
    "arith.direct_exact_match": 0.25,
    "dilemma.base_intended": 0.1,    # all 36 base + 36 swapped prompts
    "dilemma.switch_rate": 0.1,
}


@pytest.fixture(scope="module")
def card_metrics():
    return json.loads((TOY / "metrics.json").read_text())


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # one per xdist worker (see conftest)
    model = AutoModelForCausalLM.from_pretrained(TOY).eval()
    tok = AutoTokenizer.from_pretrained(TOY)
    return model, tok


def test_committed_files():
    names = {p.name for p in TOY.iterdir()}
    for need in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "README.md", "loss_curve.png", "loss_curve.csv", "training_config.json",
                 "metrics.json"):
        assert need in names, need
    total = sum(p.stat().st_size for p in TOY.iterdir() if p.is_file())
    assert total <= 20 * 2**20


def test_load_toy_offline(monkeypatch, hf):
    from dolm.models import load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DOLM_TOY_MODEL", raising=False)
    lm = load("toy")
    model, tok = hf
    assert lm.info["architecture"].lower().startswith("gpt2")
    assert lm.n_layers == model.config.n_layer and lm.d_model == model.config.n_embd
    assert lm.d_vocab == len(tok) == model.config.vocab_size
    cfg = model.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert not lm.prepends_bos  # trained without BOS, evaluated without BOS
    # same weights either way
    enc = lm.encode(["Draws from one bag: X Y X"])
    with torch.no_grad():
        a = lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        b = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_answer_tokens_are_single(hf):
    from dolm.models import load
    from dolm_tools.toy.corpus import required_tokens
    from dolm_tools.toy.tokenizer import REQUIRED_TOKENS, check_single_tokens

    _, tok = hf
    names = ["factual", "bayes", "formats", "arith", "dilemma"]
    ids = check_single_tokens(tok, REQUIRED_TOKENS + required_tokens(names))
    for s in (" X", " Y", " A", " B", " 1", " 2", "7", " 7"):
        assert tok.decode([ids[s]]) == s
    lm = load(str(TOY))
    assert len(set(lm.choice_token_ids([" X", " Y", " A", " B"]))) == 4
    assert lm.token_id(" 1") == ids[" 1"]


def test_site_checks(hf):
    from dolm.models import load

    lm = load(str(TOY))
    prompts = ["Draws from one bag: X Y X X", "Ann has 2 pens. First she gets 3 more. A:"]
    enc = lm.encode(prompts)
    sites = lm.expand_sites(["resid_pre.*", "resid_mid.*", "resid_post.*", "attn_out.*",
                             "head.*.*"])
    with torch.no_grad(), lm.trace(read=sites) as tr:
        out = lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                       output_hidden_states=True)
    hs = out.hidden_states
    n = lm.n_layers
    for layer in range(n):
        if layer < n - 1:
            assert (tr[f"resid_post.{layer}"] - hs[layer + 1]).abs().max() < 1e-5
        assert torch.allclose(tr[f"resid_mid.{layer}"],
                              tr[f"resid_pre.{layer}"] + tr[f"attn_out.{layer}"], atol=1e-5)
        proj = lm.adapter.block_module(layer, "attn_o")  # GPT-2 Conv1D: x W + b
        d = lm.d_head
        total = proj.bias.clone()
        for h in range(lm.n_heads):
            total = total + tr[f"head.{layer}.{h}"] @ proj.weight[h * d:(h + 1) * d]
        assert (total - tr[f"attn_out.{layer}"]).abs().max() < 1e-4


@pytest.fixture(scope="module")
def sample(hf):
    """Every card metric on a small evenly spaced sample of its held-out prompts."""
    from dolm_tools.toy.evaluate import EVAL_SETS, compute_metrics, quick_outcomes

    model, tok = hf
    sizes = {"factual": 96, "bayes": None, "formats": 72, "arith": 60, "dilemma": None}
    tables = _sample_tables(sizes)
    outs = {name: quick_outcomes(model, tok, df, generate=EVAL_SETS[name][2])
            for name, df in tables.items()}
    return tables, outs, compute_metrics(tables, outs)


def _sample_tables(sizes):
    from dolm_tools.toy.evaluate import eval_tables

    tables = eval_tables(list(sizes))
    out = {}
    for name, df in tables.items():
        if name == "bayes":  # 6 orderings of every evidence count
            df = df.groupby("n_x", group_keys=False).head(6).reset_index(drop=True)
        elif name == "formats":
            units = df["unit_id"].unique()
            keep = units[np.linspace(0, len(units) - 1, sizes[name] // 3).round().astype(int)]
            df = df[df["unit_id"].isin(keep)].reset_index(drop=True)
        elif name == "arith":
            groups = df["group_id"].unique()
            keep = groups[np.linspace(0, len(groups) - 1, sizes[name] // 2).round().astype(int)]
            df = df[df["group_id"].isin(keep)].reset_index(drop=True)
        elif sizes[name] is not None:
            idx = np.linspace(0, len(df) - 1, sizes[name]).round().astype(int)
            df = df.iloc[np.unique(idx)].reset_index(drop=True)
        out[name] = df
    return out


def test_card_factual(sample, card_metrics):
    m = sample[2]["factual"]
    assert abs(m["top1"] - card_metrics["factual"]["top1"]) <= TOL["factual.top1"]


def test_card_bayes(sample, card_metrics):
    m = sample[2]["bayes"]
    assert set(m["by_n_x"]) == set(range(11))
    assert abs(m["mean_abs_error"] - card_metrics["bayes"]["mean_abs_error"]) <= TOL[
        "bayes.mean_abs_error"]


def test_card_formats(sample, card_metrics):
    m = sample[2]["formats"]
    for fmt, v in card_metrics["formats"]["by_format"].items():
        assert abs(m["by_format"][fmt] - v) <= TOL["formats.by_format"], fmt


def test_card_arith(sample, card_metrics):
    m, c = sample[2]["arith"], card_metrics["arith"]
    assert m["steps"] == [3]
    for k in ("cot_exact_match", "direct_exact_match"):
        assert abs(m[k] - c[k]) <= TOL[f"arith.{k}"], k


def test_card_dilemma(sample, card_metrics):
    m, c = sample[2]["dilemma"], card_metrics["dilemma"]
    for k in ("base_intended", "switch_rate"):
        assert abs(m[k] - c[k]) <= TOL[f"dilemma.{k}"], k


# Card targets the committed weights are known to miss (the card says so too).
KNOWN_MISSES: set[str] = set()


def test_card_targets_hold(card_metrics):
    from dolm_tools.toy.evaluate import check_targets

    got = check_targets(card_metrics)
    assert {k for k, ok in got.items() if not ok} == KNOWN_MISSES


def test_config_file_reproduces_the_committed_run():
    """`dolm-toy train` with the default config resolves to the committed run's config."""
    from dolm_tools.toy.config import load_config

    saved = json.loads((TOY / "training_config.json").read_text())["config"]
    assert load_config() == saved


def test_readme_shows_the_metrics(card_metrics):
    from dolm_tools.toy.card import metrics_markdown

    text = (TOY / "README.md").read_text()
    assert metrics_markdown(card_metrics) in text
    summary = json.loads((TOY / "training_config.json").read_text())
    assert summary["command"] in text and f"Seed: {summary['seed']}" in text


@pytest.mark.slow
def test_in_process_scorer_equals_collect_acts(hf, sample, tmp_path):
    """The test's scorer and dolm-collect-acts (the card's) agree prompt by prompt."""
    from dolm.formats import read_table, write_table

    tables, outs, _ = sample
    from dolm.tasks import CORE_COLUMNS

    pick = pd.concat([tables[n].head(4)[CORE_COLUMNS] for n in ("bayes", "dilemma", "arith")],
                     ignore_index=True)
    p, o = tmp_path / "p.parquet", tmp_path / "o.parquet"
    write_table(pick, str(p), schema="prompts", run=None)
    exe = Path(sys.executable).with_name("dolm-collect-acts")
    proc = subprocess.run([str(exe), str(p), "--model", str(TOY), "-o", str(o),
                           "--generate", "48", "--device", "cpu"],
                          capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": str(exe.parent)})
    assert proc.returncode == 0, proc.stderr
    got, _ = read_table(str(o))
    got = got.set_index("prompt_id")
    mine = pd.concat(outs.values(), ignore_index=True).set_index("prompt_id")
    for pid in pick["prompt_id"]:
        a, b = got.loc[pid], mine.loc[pid]
        assert math.isclose(a["target_logprob"], b["target_logprob"], abs_tol=1e-4)
        assert a["target_rank"] == b["target_rank"] and a["correct"] == b["correct"]
        if isinstance(b.get("choice_probs"), list):
            np.testing.assert_allclose(a["choice_probs"], b["choice_probs"], atol=1e-5)
        if pid.startswith("arith"):
            assert a["generation"] == b["generation"]
            assert a["exact_match"] == b["exact_match"]
