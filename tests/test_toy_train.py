"""dolm-toy training machinery: tokenizer, encoding with soft targets, a short run.

The short run (tiny config, a few hundred steps on CPU) must lower the loss and be
deterministic from its seed; the committed model itself is tested in test_toy_model.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dolm_tools.toy.config import load_config  # noqa: E402
from dolm_tools.toy.data import Example, collate, encode_example  # noqa: E402
from dolm_tools.toy.tokenizer import (  # noqa: E402
    REQUIRED_TOKENS,
    check_single_tokens,
    train_tokenizer,
)

CORPUS = [
    "Ann has 12 pens. First she gets 305 more. How many pens? A: 317",
    "Draws from one bag: X Y X X Y. Draws from one bag: A B A",
    "You find a lost wallet. Option 1: keep it. Option 2: return it. Answer: 2",
] * 30


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=330)


def test_tokenizer_digits_and_answer_tokens(tok):
    ids = check_single_tokens(tok, REQUIRED_TOKENS)
    assert len(set(ids.values())) == len(REQUIRED_TOKENS)  # all distinct
    pieces = tok.convert_ids_to_tokens(tok.encode(" 317 = 12+305", add_special_tokens=False))
    # one digit per token; a leading space stays on the first digit
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == ["Ġ3", "1", "7", "Ġ1", "2", "3", "0", "5"]
    assert tok.decode(tok.encode(" 317 = 12+305")) == " 317 = 12+305"
    assert tok.bos_token_id == tok.eos_token_id != tok.pad_token_id
    # no BOS is added (dolm.models.encode then adds none either)
    assert tok("Draws")["input_ids"] == tok.encode("Draws", add_special_tokens=False)


def test_check_single_tokens_names_the_offender(tok):
    with pytest.raises(ValueError, match="Zorvak"):
        check_single_tokens(tok, [" X", " Zorvak"])


def test_tokenizer_is_deterministic():
    a = train_tokenizer(CORPUS, vocab_size=330)
    b = train_tokenizer(CORPUS, vocab_size=330)
    assert a.get_vocab() == b.get_vocab()


def test_encode_hard_and_soft_targets(tok):
    cache: dict[str, int] = {}
    ex = Example(prompt="Option 1: keep it. Answer:", continuation=" 2")
    e = encode_example(ex, tok, 3, cache)
    p = tok.encode(ex.prompt, add_special_tokens=False)
    assert list(e.ids) == p + [tok.encode(" 2")[0], tok.eos_token_id]
    # targets: the answer token predicted from the prompt's last position, then EOS
    assert list(e.tgt_pos) == [len(p) - 1, len(p)]
    assert e.tgt_ids[0, 0] == tok.encode(" 2")[0] and e.tgt_p[0, 0] == 1.0
    assert e.family == 3

    text = "Draws from one bag: X Y"
    soft = [(19, {" X": 0.625, " Y": 0.375}), (21, {" X": 0.6, " Y": 0.4})]
    e = encode_example(Example(prompt=text, soft=soft, eos=False), tok, 0, cache)
    toks = tok.convert_ids_to_tokens(e.ids.tolist())
    assert toks[-2:] == ["ĠX", "ĠY"]
    n = len(toks)
    assert list(e.tgt_pos) == [n - 3, n - 2]
    x, y = tok.encode(" X")[0], tok.encode(" Y")[0]
    assert e.tgt_ids.tolist() == [[x, y], [x, y]]
    np.testing.assert_allclose(e.tgt_p, [[0.625, 0.375], [0.6, 0.4]])
    with pytest.raises(ValueError, match="token start"):
        encode_example(Example(prompt=text, soft=[(20, {" X": 1.0})]), tok, 0, cache)

    b = collate([e, encode_example(ex, tok, 1, cache)], tok.pad_token_id)
    assert b["input_ids"].shape[0] == 2 and b["attention_mask"].sum() == len(e.ids) + len(p) + 2
    assert b["b"].tolist() == [0, 0, 1, 1] and b["family"].tolist() == [0, 0, 1, 1]


def tiny_config(steps: int) -> dict:
    cfg = load_config()
    cfg["tokenizer"] = {"vocab_size": 600, "examples_per_family": 300}
    cfg["model"] = {"n_layer": 2, "n_embd": 48, "n_head": 4, "n_positions": 128}
    cfg["train"].update({"steps": steps, "batch_size": 16, "lr": 3e-3, "warmup_steps": 20,
                         "log_every": 20, "eval_every": 0})
    small = {
        "factual": {"pool": 300},
        "bayes": {"pool": 300, "options": {"n": 100, "sampling": "uniform"}},
        "formats": {"pool": 300, "options": {"n": 300}},
        "arith": {"pool": 300, "options": {"n": 150}},
        "dilemma": {"pool": 144},
    }
    for name, over in small.items():
        cfg["families"][name].update(over)
    return cfg


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from dolm_tools.toy.train import train

    torch.set_num_threads(1)  # one per xdist worker: 2 threads on 2 busy cores thrash
    out = tmp_path_factory.mktemp("toy-short")
    summary = train(tiny_config(300), out, device="cpu", seed=0, show_progress=False)
    return out, summary


def test_short_training_run_lowers_the_loss(short_run):
    out, summary = short_run
    rows = [line.split(",") for line in (out / "loss_curve.csv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    loss = [float(r[header.index("loss")]) for r in rows]
    assert len(loss) == 15
    assert loss[-1] < 0.5 * loss[0], loss
    for fam in ("factual", "bayes", "formats", "arith", "dilemma"):
        col = [float(r[header.index(f"loss_{fam}")]) for r in rows]
        assert col[-1] < col[0], (fam, col)
    assert (out / "loss_curve.png").stat().st_size > 1000
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["seed"] == 0 and saved["steps"] == 300 and saved["device"] == "cpu"
    assert summary["n_params"] == saved["n_params"]


def test_saved_folder_loads_offline(short_run, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = short_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert sum(p.numel() for p in model.parameters()) == summary["n_params"]
    check_single_tokens(tok, REQUIRED_TOKENS + [" even", " odd", " Paris"])


def test_training_is_deterministic(tmp_path):
    from dolm_tools.toy.train import train

    torch.set_num_threads(1)  # one per xdist worker: 2 threads on 2 busy cores thrash
    cfg = tiny_config(12)
    cfg["train"]["log_every"] = 4
    train(cfg, tmp_path / "a", device="cpu", seed=3, show_progress=False)
    train(cfg, tmp_path / "b", device="cpu", seed=3, show_progress=False)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b
    def losses(d):  # every column but the wall-clock one
        rows = [r.split(",") for r in (tmp_path / d / "loss_curve.csv").read_text().split()]
        drop = rows[0].index("elapsed_s")
        return [r[:drop] + r[drop + 1:] for r in rows]

    assert losses("a") == losses("b")


def test_config_overrides():
    cfg = load_config(None, ["train.steps=7", "model.n_embd=96", "families.arith.weight=0.5"])
    assert cfg["train"]["steps"] == 7 and cfg["model"]["n_embd"] == 96
    assert cfg["families"]["arith"]["weight"] == 0.5
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["nonsense"])


def test_cli_refuses_to_overwrite(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    proc = subprocess.run(
        [sys.executable, "-m", "dolm_tools.toy.cli", "train", "-o", str(tmp_path)],
        capture_output=True, text=True)
    assert proc.returncode == 3
    assert "--force" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dolm_tools.toy.cli", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "train" in proc.stdout and "card" in proc.stdout


def test_training_corpus_excludes_eval_prompts():
    """No held-out prompt (the card's) is a training prompt, or starts a training text."""
    from dolm_tools.toy.corpus import build_pool
    from dolm_tools.toy.evaluate import eval_tables

    cfg = load_config()
    evals = eval_tables()
    for i, name in enumerate(("factual", "bayes", "formats", "arith", "dilemma")):
        fcfg = dict(cfg["families"][name])
        fcfg["pool"] = min(int(fcfg["pool"]), 3000)
        pool = build_pool(name, fcfg, seed=i)
        texts = {e.prompt + e.continuation for e in pool}
        held = [df for key, df in evals.items() if key.split("_")[0] == name]
        eval_prompts = set().union(*(set(df["prompt"]) for df in held))
        assert not eval_prompts & {e.prompt for e in pool}, name
        if name == "bayes":
            # a training sequence never starts with an evaluation sequence
            lengths = {len(p) for p in eval_prompts}
            prefixes = {t[:n] for t in texts for n in lengths if len(t) > n and t[n] == " "}
            assert not eval_prompts & prefixes
