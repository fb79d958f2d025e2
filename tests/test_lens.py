"""dolm-lens: logit lens against an independent computation from Hugging Face hidden
states, the tuned lens's held-out KL against the logit lens (toy model when built, else a
tiny GPT-2), translators refused on another model, and the real executable's outputs and
errors.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

PROMPTS = [
    # prompt, target, choices
    ("the king of the city was", " the", [" the", " a"]),
    ("one two three", " four", None),
    ("A B C D X Y yes no", " yes", [" no", " yes", " A"]),
    ("the river of Rome is the capital of", " Italy", [" Italy", " France"]),
]


def prompts_frame(rows=PROMPTS, repeat=1) -> pd.DataFrame:
    out = []
    for r in range(repeat):
        for i, (prompt, target, choices) in enumerate(rows):
            out.append({"prompt_id": f"p{r}-{i}", "family": "test", "prompt": prompt,
                        "target": target, "choices": choices, "split": "eval",
                        **dict.fromkeys(["foil", "cf_prompt", "cf_target", "cf_foil", "spans",
                                         "cf_spans", "group_id"])})
    return pd.DataFrame(out)


def write_prompts(path, df):
    from dolm.formats import write_table

    write_table(df, str(path), schema="prompts", run=None, force=True)
    return str(path)


def _env():
    return dict(os.environ, DOLM_PROGRESS="0", OMP_NUM_THREADS="1")


def _run(*args):
    return subprocess.run(["dolm-lens", *map(str, args)], capture_output=True, text=True,
                          env=_env())


def words_corpus(n: int, seed: int) -> list[str]:
    """Sentences over the tiny models' vocabulary (every word one token)."""
    from dolm.models.tiny import _WORDS

    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=rng.integers(6, 16))) for _ in range(n)]


# ---------------------------------------------------------------- logit lens vs HF


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logit_lens_matches_hidden_states(tiny_lm, family):
    from dolm_tools.lens import core, tokens

    lm = tiny_lm(family)
    df = prompts_frame()
    toks = tokens.resolve(lm, df, "prompts")
    enc = lm.encode(df.prompt.tolist(), names=df.prompt_id.tolist())
    res = core.lens_batch(lm, enc, list(range(len(df))), toks, "all", [], 3, ["logit"], None)
    table = core.to_frame(lm, df, toks, res)
    model = lm.model
    ad = lm.adapter
    n = lm.n_layers
    checked = 0
    for i, (_prompt, target, choices) in enumerate(PROMPTS):
        ids = enc.input_ids[i, : enc.lengths[i]][None]
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
            final = torch.log_softmax(out.logits[0].double(), -1)
            for layer in range(n):
                if layer < n - 1:  # hidden_states[L + 1] is block L's output
                    logits = ad.unembed(ad.final_norm(out.hidden_states[layer + 1][0]))
                else:  # HF's last hidden state already went through the final norm
                    logits = out.logits[0]
                lp = torch.log_softmax(logits.double(), -1)
                kl = (final.exp() * (final - lp)).sum(-1)
                ent = -(lp.exp() * lp).sum(-1)
                sub = table[(table.prompt_id == f"p0-{i}") & (table.layer == layer)]
                for pos in range(enc.lengths[i]):
                    cell = sub[sub.position == pos].sort_values("rank")
                    assert len(cell) == 3
                    top = lp[pos].topk(3)
                    np.testing.assert_allclose(cell.prob, top.values.exp().numpy(), atol=1e-5)
                    assert cell.token_id.iloc[0] == int(top.indices[0])
                    np.testing.assert_allclose(cell.kl_to_final.iloc[0], kl[pos], atol=1e-5)
                    np.testing.assert_allclose(cell.entropy.iloc[0], ent[pos], atol=1e-4)
                    t = lm.token_id(target)
                    np.testing.assert_allclose(cell.target_logprob.iloc[0], lp[pos, t], atol=1e-5)
                    assert cell.target_rank.iloc[0] == int((lp[pos] > lp[pos, t]).sum())
                    if choices:
                        want = [float(lp[pos, lm.token_id(c)]) for c in choices]
                        np.testing.assert_allclose(cell.choice_logprobs.iloc[0], want, atol=1e-5)
                    checked += 1
    assert checked == n * sum(enc.lengths)
    last = table[table.layer == n - 1]
    assert last.kl_to_final.abs().max() < 1e-5  # the last layer's logit lens is the output


def test_crossing_layer_definition(tiny_lm):
    from dolm_tools.lens import core, tokens

    assert core.crossing_layer([-1.0, 0.5, -0.2, 0.3, 0.4]) == 3
    assert core.crossing_layer([1.0, 2.0]) == 0
    assert core.crossing_layer([1.0, -1.0]) is None
    lm = tiny_lm("gpt2")
    df = prompts_frame()
    toks = tokens.resolve(lm, df, "prompts")
    assert toks.intended == [0, None, 1, 0]
    enc = lm.encode(df.prompt.tolist(), names=df.prompt_id.tolist())
    res = core.lens_batch(lm, enc, list(range(len(df))), toks, "last", [], 1, ["logit"], None)
    cells = core.to_frame(lm, df, toks, res)
    for _pid, g in cells.groupby("prompt_id"):
        g = g.sort_values("layer")
        ix = g.intended.iloc[0]
        if pd.isna(ix):
            assert g.crossing_layer.isna().all()
            continue
        margins = [c[ix] - max(v for j, v in enumerate(c) if j != ix) for c in g.choice_logprobs]
        assert g.crossing_layer.iloc[0] == core.crossing_layer(margins) or (
            pd.isna(g.crossing_layer.iloc[0]) and core.crossing_layer(margins) is None)


# ---------------------------------------------------------------- tuned lens


def _toy_or_none():
    from dolm.errors import InputError
    from dolm.models import load

    try:
        return load("toy")
    except InputError:
        return None


def _toy_texts():
    from dolm.tasks import generate

    train, held = [], []
    for fam, opts in (("dilemma", {}), ("factual", {}), ("arith", {"n": 150}),
                      ("bayes", {"n": 100})):
        train += generate(fam, split="train", seed=0, **opts)["text"].dropna().tolist()[:300]
        held += generate(fam, split="eval", seed=0, **opts)["text"].dropna().tolist()[:40]
    return train, held


def test_tuned_lens_heldout_kl_below_logit_lens(tiny_lm):
    """On the toy model (tiny GPT-2 until it is built): after training, the tuned lens's
    held-out KL to the final distribution is below the logit lens's at every layer but
    the last, where both are the model's output."""
    from dolm_tools.lens import tuned

    lm = _toy_or_none()
    if lm is not None:
        train_texts, held_texts = _toy_texts()
        cfg = tuned.TrainConfig(steps=60, tokens_per_step=1024, max_tokens=12000, seed=0)
    else:
        lm = tiny_lm("gpt2")
        train_texts, held_texts = words_corpus(300, 0), words_corpus(60, 1)
        cfg = tuned.TrainConfig(steps=80, tokens_per_step=1024, max_tokens=8000, seed=0)
    seqs = tuned.tokenize_texts(lm, train_texts, 128)
    states = tuned.collect_residuals(lm, seqs, "auto", cfg.max_tokens, "train")
    tr, losses = tuned.train(lm, states, cfg)
    assert losses[-1] < losses[0]
    held = tuned.collect_residuals(lm, tuned.tokenize_texts(lm, held_texts, 128), "auto",
                                   4000, "held")
    report = tuned.heldout_kl(lm, held, tr)
    print(f"\n{lm.info.get('spec')}:\n" + tuned.describe_report(report))
    n = lm.n_layers
    for layer in range(n - 1):
        assert report["tuned"][layer] < report["logit"][layer], layer
    assert report["logit"][n - 1] < 1e-5 and report["tuned"][n - 1] < 1e-5
    # same data and seed: the same translators, bit for bit
    short = tuned.TrainConfig(steps=3, tokens_per_step=256, seed=7)
    a, _ = tuned.train(lm, states[:, :2000], short)
    b, _ = tuned.train(lm, states[:, :2000], short)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_translators_refused_on_another_model(tiny_lm, tmp_path):
    from dolm.errors import InputError
    from dolm.formats import Run
    from dolm_tools.lens import tuned

    gpt2, llama = tiny_lm("gpt2"), tiny_lm("llama")
    tr = tuned.Translators(gpt2.d_model, [0, 1], gpt2.n_layers)
    with torch.no_grad():
        tr.weight.normal_(0, 0.01)
    run = Run(tool="lens")
    run.set_model(gpt2.info)
    path = str(tmp_path / "t.safetensors")
    tuned.save(tr, path, run, False, gpt2, tuned.TrainConfig(), {})
    back = tuned.load(path, gpt2, None, False)
    assert torch.equal(back.weight.cpu(), tr.weight)
    with pytest.raises(InputError, match="--allow-model-mismatch"):
        tuned.load(path, llama, None, False)
    assert tuned.load(path, llama, None, True).layers == [0, 1]  # same width and depth
    small = tuned.Translators(16, [0], 3)
    bad = str(tmp_path / "bad.safetensors")
    tuned.save(small, bad, run, False, gpt2, tuned.TrainConfig(), {})
    with pytest.raises(InputError, match="width"):
        tuned.load(bad, gpt2, None, True)


# ---------------------------------------------------------------- the executable


def test_cli_train_then_read(tiny_model_dir, tmp_path):
    from dolm.formats import read_meta, validate_file

    model = tiny_model_dir("gpt2")
    text = tmp_path / "train.txt"
    text.write_text("\n".join(words_corpus(200, 2)) + "\n")
    prompts = write_prompts(tmp_path / "p.parquet", prompts_frame())
    tpath = tmp_path / "tr.safetensors"
    # a text file (one sequence per line) and a prompts table (its prompt column), pooled
    r = _run("train", text, prompts, "--model", model, "-o", tpath, "--steps", 40,
             "--tokens-per-step", 512, "--seed", 3)
    assert r.returncode == 0, r.stderr
    assert "held-out KL" in r.stderr and "from 184 sequences" in r.stderr  # 200 + 4, 20 held out
    assert validate_file(str(tpath)) == ("translators", [])
    meta = read_meta(str(tpath))
    assert meta.extra["layers"] == [0, 1] and meta.extra["heldout_kl"]["tuned"][0] < \
        meta.extra["heldout_kl"]["logit"][0]
    assert meta.extra["train"]["optimizer"] == "sgd-nesterov"
    assert [i["path"] for i in meta.provenance[-1]["inputs"]][:2] == [str(text), prompts]
    out = tmp_path / "lens.parquet"
    r = _run(prompts, "--model", model, "-o", out, "--translators", tpath, "--positions", "all",
             "--top-k", 2)
    assert r.returncode == 0, r.stderr
    assert validate_file(str(out)) == ("lens", [])
    df = pd.read_parquet(out)
    assert set(df.lens) == {"logit", "tuned"} and set(df["rank"]) == {0, 1}
    assert set(df.site) == {"resid_post.0", "resid_post.1", "resid_post.2"}
    # the last layer has no translator: both lenses are the model's output there
    last = df[df.layer == 2].pivot_table(index=["prompt_id", "position", "rank"],
                                         columns="lens", values="prob")
    np.testing.assert_allclose(last["logit"], last["tuned"], atol=1e-6)
    assert df[df.layer == 2].kl_to_final.max() < 1e-5
    first = df[(df["rank"] == 0) & (df.layer == 0)].groupby("lens").kl_to_final.mean()
    assert first["tuned"] < first["logit"]
    # another model: refused, exit 3, naming the option that would allow it
    r = _run(prompts, "--model", tiny_model_dir("llama"), "-o", tmp_path / "x.parquet",
             "--translators", tpath)
    assert r.returncode == 3, r.stderr
    assert "--allow-model-mismatch" in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_input(tiny_model_dir, tmp_path, in_process):
    """In-process (the click command's own error handling; no cold import per case)."""
    model = tiny_model_dir("gpt2")
    df = prompts_frame()
    df.loc[1, "target"] = " fourteenth"
    prompts = write_prompts(tmp_path / "p.parquet", df)
    r = in_process("dolm-lens", prompts, "--model", model, "-o", tmp_path / "o.parquet")
    assert r.returncode == 3
    assert "prompt p0-1, column 'target'" in r.stderr and "expected exactly one" in r.stderr
    assert "--first-token" in r.stderr and "Traceback" not in r.stderr
    empty = write_prompts(tmp_path / "e.parquet", df.iloc[:0])
    r = in_process("dolm-lens", empty, "--model", model, "-o", tmp_path / "o.parquet")
    assert r.returncode == 3 and "empty" in r.stderr
    r = in_process("dolm-lens", prompts, "--model", model, "-o", tmp_path / "o.parquet",
                   "--lens", "tuned")
    assert r.returncode == 3 and "--translators" in r.stderr
