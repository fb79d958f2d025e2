"""Task families (dolm.tasks): ground truth, determinism, train/eval disjointness."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from dolm.errors import InputError
from dolm.tasks import (
    CORE_COLUMNS,
    FAMILIES,
    GENERATED,
    extract_answer,
    posterior_predictive,
    training_text,
)
from dolm.tasks import arith as arith_mod
from dolm.tasks import bayes as bayes_mod
from dolm.tasks import dilemma as dilemma_mod
from dolm.tasks import factual as factual_mod


def spans(row, col="spans"):
    return json.loads(row[col]) if row[col] is not None else {}


def _binom_posterior_x(n_x, n, pa=0.5, pb=0.75, prior=0.5):
    """Independent computation: posterior over generators from the two binomial
    likelihoods (with the binomial coefficient), then the predictive."""
    la = math.comb(n, n_x) * pa**n_x * (1 - pa) ** (n - n_x)
    lb = math.comb(n, n_x) * pb**n_x * (1 - pb) ** (n - n_x)
    wa = prior * la / (prior * la + (1 - prior) * lb)
    return wa * pa + (1 - wa) * pb


# ----------------------------------------------------------------- all families


@pytest.mark.parametrize("name", GENERATED)
@pytest.mark.parametrize("split", ["eval", "train"])
def test_core_columns_and_determinism(name, split):
    fam = FAMILIES[name]
    a = fam.generate(split=split, seed=3, n=30)
    b = fam.generate(split=split, seed=3, n=30)
    c = fam.generate(split=split, seed=4, n=30)
    assert list(a.columns[: len(CORE_COLUMNS)]) == CORE_COLUMNS
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b)
    assert a["prompt_id"].is_unique
    assert (a["family"] == name).all() and (a["split"] == split).all()
    assert a["prompt"].map(lambda s: isinstance(s, str) and len(s) > 0).all()
    # the training text starts with the prompt and continues it
    for _, row in a.iterrows():
        t = training_text(row)
        assert t.startswith(row["prompt"])
        # bayes eval rows: the draws are the text (the next draw is what is asked)
        assert len(t) > len(row["prompt"]) or (name == "bayes" and split == "eval")
        if row["target"] is not None and name != "arith":
            assert t == row["prompt"] + row["target"] or name == "bayes"
        for col in ("spans", "cf_spans"):
            for lo, hi in spans(row, col).values():
                text = row["prompt"] if col == "spans" else row["cf_prompt"]
                assert 0 <= lo <= hi <= len(text)
    if name != "factual":  # factual eval = all facts; other seeds sample other items
        assert not a["text"].equals(c["text"])


@pytest.mark.parametrize("name", GENERATED)
def test_every_option_has_help_and_valid_default(name):
    fam = FAMILIES[name]
    for opt in fam.options:
        assert opt.help and opt.flag.startswith("--")
        assert opt.coerce(opt.default) == opt.default or opt.default is None


def test_unknown_option_and_bad_value_are_input_errors():
    with pytest.raises(InputError, match="unknown option 'bogus'"):
        FAMILIES["bayes"].generate(bogus=1)
    with pytest.raises(InputError, match="--n-draws: expected an integer"):
        FAMILIES["bayes"].generate(n_draws="ten")
    with pytest.raises(InputError, match="--templates: expected one of"):
        FAMILIES["bayes"].generate(templates="base,weird")
    with pytest.raises(InputError, match="--p-b: expected a probability"):
        FAMILIES["bayes"].generate(p_b=1.5)
    with pytest.raises(InputError, match="--split"):
        FAMILIES["arith"].generate(split="test")


# ----------------------------------------------------------------- factual


def test_factual_truth_counterfactual_and_spans():
    df = FAMILIES["factual"].generate()
    w = factual_mod.world()
    truth = {(r.subject, rel): getattr(r, rel) for r in w.itertuples() for rel in ("city", "job",
                                                                                  "color")}
    assert len(df) == len(w) * 3 * 6  # 6 eval phrasings per relation
    for _, r in df.iterrows():
        assert r["target"] == truth[(r["subject"], r["relation"])]
        assert r["cf_target"] == truth[(r["cf_subject"], r["relation"])]
        assert r["cf_target"] != r["target"] and r["foil"] == r["cf_target"]
        assert r["cf_foil"] == r["target"]
        s, cs = spans(r)["subject"], spans(r, "cf_spans")["subject"]
        assert r["prompt"][s[0]:s[1]] == r["subject"]
        assert r["cf_prompt"][cs[0]:cs[1]] == r["cf_subject"]
        assert len(r["subject"].split()) == len(r["cf_subject"].split())
        # the prompts differ only in the subject
        assert r["prompt"].replace(r["subject"], "#") == r["cf_prompt"].replace(r["cf_subject"],
                                                                                "#")
        assert r["prompt"].endswith(r["prompt"].rstrip()) and not r["prompt"].endswith(" ")
        assert r["target"].startswith(" ") and " " not in r["target"][1:]


def test_factual_eval_phrasings_are_held_out_facts_shared():
    ev = FAMILIES["factual"].generate(split="eval")
    tr = FAMILIES["factual"].generate(split="train")
    assert not set(ev["template_id"]) & set(tr["template_id"])
    assert not set(ev["prompt"]) & set(tr["prompt"])
    # every eval fact is trained (in other phrasings)
    facts_tr = set(zip(tr["subject"], tr["relation"], tr["target"], strict=True))
    facts_ev = set(zip(ev["subject"], ev["relation"], ev["target"], strict=True))
    assert facts_ev <= facts_tr
    # every eval phrasing's prefix and core are seen in training
    pre = {t.split(".")[1] for t in tr["template_id"]}
    core = {(t.split(".")[0], t.split(".")[2]) for t in tr["template_id"]}
    for t in set(ev["template_id"]):
        rel, p, c = t.split(".")
        assert p in pre and (rel, c) in core


def test_factual_equal_token_length_with_tokenizer():
    # a toy tokenizer: one token per 3 characters of each word
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [0] * sum(math.ceil(len(w) / 3) for w in text.split())

    tok = Tok()
    df = FAMILIES["factual"].generate(tokenizer=tok, relations="city")
    assert len(df) > 0
    for _, r in df.iterrows():
        assert len(tok.encode(r["prompt"])) == len(tok.encode(r["cf_prompt"]))
        assert r["subject_tokens"] == len(tok.encode(" " + r["cf_subject"]))


# ----------------------------------------------------------------- bayes


def test_bayes_posterior_matches_binomial_computation():
    df = FAMILIES["bayes"].generate(sweep=True, permutations=5)
    assert sorted(set(df["n_x"])) == list(range(11))
    for _, r in df.iterrows():
        assert r["n_draws"] == 10 and r["sequence"].count("X") == r["n_x"]
        assert r["posterior_x"] == pytest.approx(_binom_posterior_x(r["n_x"], 10), abs=1e-12)
        assert r["cf_posterior_x"] == pytest.approx(_binom_posterior_x(10 - r["n_x"], 10),
                                                    abs=1e-12)
        assert r["target"] == " X" and r["foil"] == " Y" and list(r["choices"]) == [" X", " Y"]
        assert r["prompt"].count(" X") + r["prompt"].count(" Y") == 10
    # other generator settings
    d2 = FAMILIES["bayes"].generate(n=20, p_a=0.3, p_b=0.9, prior=0.2)
    for _, r in d2.iterrows():
        assert r["posterior_x"] == pytest.approx(
            _binom_posterior_x(r["n_x"], 10, 0.3, 0.9, 0.2), abs=1e-12)


def test_posterior_predictive_per_position():
    seq = "XXYXY"
    p = posterior_predictive(seq)
    assert len(p) == 6 and p[0] == pytest.approx(0.625)
    for i in range(6):
        assert p[i] == pytest.approx(_binom_posterior_x(seq[:i].count("X"), i))
    assert posterior_predictive([" X", " Y"]) == pytest.approx(posterior_predictive("XY"))
    assert posterior_predictive("AB") == pytest.approx(posterior_predictive("XY"))
    ind = posterior_predictive(seq, template="independent")
    assert np.allclose(ind, 0.625)


def test_bayes_permutations_share_multiset():
    df = FAMILIES["bayes"].generate(sweep=True, permutations=20)
    for _, g in df.groupby("group_id"):
        assert g["sequence"].map(sorted).map("".join).nunique() == 1
        assert g["sequence"].is_unique  # distinct orderings
        assert g["posterior_x"].nunique() == 1
        n_x = g["n_x"].iloc[0]
        assert len(g) == min(20, math.comb(10, n_x))
    assert df.groupby("n_x").size()[5] == 20


def test_bayes_conditions_templates_distractors_symbols():
    df = FAMILIES["bayes"].generate(
        n=10, templates="base,independent,order_irrelevant", distractors="0,2", symbol_swap=True
    )
    assert len(df) == 10 * 3 * 2 * 2
    for _, r in df.iterrows():
        sp = spans(r)
        assert r["prompt"].count(bayes_mod.DISTRACTOR) == r["distractors"]
        if r["distractors"]:
            assert r["prompt"][slice(*sp["distractors"])].startswith(bayes_mod.DISTRACTOR)
        assert r["prompt"][slice(*sp["header"])] == bayes_mod.TEMPLATES[r["template"]]
        sx, sy = ("A", "B") if r["symbols"] == "AB" else ("X", "Y")
        draws = r["prompt"][slice(*sp["draws"])].split()
        assert "".join("X" if d == sx else "Y" for d in draws) == r["sequence"]
        assert r["target"] == " " + sx and list(r["choices"]) == [" " + sx, " " + sy]
        if r["template"] == "independent":
            assert r["posterior_x"] == pytest.approx(0.625)
        else:
            assert r["posterior_x"] == pytest.approx(_binom_posterior_x(r["n_x"], 10))
    # every condition of one sequence has the same draws
    assert (df.groupby("sequence_id")["sequence"].nunique() == 1).all()


def test_bayes_train_disjoint_and_soft_targets():
    ev = FAMILIES["bayes"].generate(sweep=True)
    ev2 = FAMILIES["bayes"].generate(n=300, seed=1)
    tr = FAMILIES["bayes"].generate(split="train", n=3000, seed=0)
    eval_seqs = set(ev["sequence"]) | set(ev2["sequence"])
    assert all(bayes_mod.is_eval_sequence(s) for s in eval_seqs)
    prefixes = {s[:10] for s in tr["sequence"]}
    assert not prefixes & eval_seqs
    assert not any(t.startswith(p) for p in set(ev["prompt"]) for t in tr["text"][:300])
    assert set(tr["sequence"].map(len)) == {9, 16} and tr["truncated"].any()
    # training sequences from the generative story, unskewed by the eval reservation:
    # the first 9 draws are always kept, X frequency 0.625; P(B | 9 draws) matches
    first9 = tr["sequence"].str[:9]
    allx = "".join(first9)
    assert allx.count("X") / len(allx) == pytest.approx(0.625, abs=0.015)
    row = tr[~tr["truncated"]].iloc[0]
    st = bayes_mod.soft_targets(row)
    assert len(st) == len(row["sequence"]) == 16
    pp = posterior_predictive(row["sequence"])
    for i, (off, p) in enumerate(st):
        assert row["text"][off:off + 2] == " " + row["sequence"][i]
        assert p == pytest.approx(pp[i])


# ----------------------------------------------------------------- formats


def test_formats_experiment_balanced_observational_confounded():
    ex = FAMILIES["formats"].generate(n=300, design="experiment", seed=2)
    ob = FAMILIES["formats"].generate(n=300, design="observational", seed=2, confounding=2.0)
    assert len(ex) == 900 and len(ob) == 300
    assert set(ex["format"]) == {"direct", "polite", "fewshot"}
    assert (ex.groupby("unit_id")["format"].nunique() == 3).all()
    assert (ex.groupby("unit_id")["target"].nunique() == 1).all()
    # experiment: identical covariate distribution in every format
    m = ex.groupby("format")["difficulty"].mean()
    assert m.max() - m.min() == 0
    # observational: same units, difficulty differs across formats (few-shot harder)
    assert set(ob["unit_id"]) == set(ex["unit_id"])
    joined = ob.merge(ex, on=["unit_id", "format"], suffixes=("", "_ex"))
    assert (joined["prompt"] == joined["prompt_ex"]).all()
    mo = ob.groupby("format")["difficulty"].mean()
    assert mo["fewshot"] - mo["direct"] > 0.5
    # no confounding: roughly balanced
    ob0 = FAMILIES["formats"].generate(n=300, design="observational", seed=2, confounding=0)
    assert np.allclose(ob0["propensity"], 1 / 3)
    ps = ob[["ps_direct", "ps_polite", "ps_fewshot"]].sum(axis=1)
    assert np.allclose(ps, 1)


def _solve(task, inp):
    items = inp.split()
    if task == "count":
        raise AssertionError
    if task == "max":
        return str(max(map(int, items)))
    if task == "add":
        return str(sum(map(int, items)))
    if task == "parity":
        return "even" if int(inp) % 2 == 0 else "odd"
    if task == "last":
        return items[-1]


def _check_direct_line(task, line):
    """A solved direct-format line "Instruction: input. Answer: a" is right."""
    head, ans = line.rsplit(" Answer:", 1)
    instr, inp = head.split(": ", 1)
    inp = inp[:-1]  # the final period
    if task == "count":
        assert ans == " " + str(inp.split().count(instr.split()[2])), line
    else:
        assert ans == " " + _solve(task, inp), line


def test_formats_answers_correct_and_single_tokens():
    ex = FAMILIES["formats"].generate(n=150)
    for r in ex[ex["format"] == "fewshot"].itertuples():
        lines = r.text.split("\n")
        assert len(lines) == 3
        for line in lines:
            _check_direct_line(r.task_type, line)
    assert set(ex["task_type"]) >= {"count", "max", "add", "parity", "last"}
    assert set(ex["difficulty"]) == {1, 2, 3}
    for _, r in ex.iterrows():
        sp = spans(r)
        inp = r["prompt"][slice(*sp["input"])]
        if r["task_type"] == "count":
            q = r["prompt"].split("count the " if r["format"] == "polite" else "Count the ")[-1][0]
            assert r["target"] == " " + str(inp.split().count(q))
        else:
            assert r["target"] == " " + _solve(r["task_type"], inp)
        assert r["target"].startswith(" ") and len(r["target"].split()) == 1
        assert r["prompt"].endswith("Answer:")
        if r["format"] == "fewshot":
            assert r["prompt"].count("Answer:") == 3
    # lengths: few-shot > direct for the same unit
    pl = ex.pivot(index="unit_id", columns="format", values="prompt_length")
    assert (pl["fewshot"] > pl["direct"]).all()


def test_formats_train_disjoint_and_weighted():
    ev = FAMILIES["formats"].generate(n=300)
    tr = FAMILIES["formats"].generate(split="train", n=3000)
    ev_inputs = {(r.task_type, json.loads(r.spans)["input"] and r.prompt[slice(
        *json.loads(r.spans)["input"])]) for r in ev.itertuples()}
    tr_inputs = {(r.task_type, r.prompt[slice(*json.loads(r.spans)["input"])])
                 for r in tr.itertuples()}
    assert not ev_inputs & tr_inputs
    share = tr["format"].value_counts(normalize=True)
    assert share["direct"] == pytest.approx(0.6, abs=0.04)
    assert share["polite"] == pytest.approx(0.1, abs=0.03)


# ----------------------------------------------------------------- arith


def test_arith_answers_chain_and_spans():
    df = FAMILIES["arith"].generate(n=60, steps="1,2,3")
    assert set(df["steps"]) == {1, 2, 3}
    assert (df.groupby("group_id")["cot"].nunique() == 2).all()
    for _, r in df.iterrows():
        ops = list(r["operands"])
        assert len(ops) == r["steps"] + 1
        assert r["answer"] == sum(ops) and r["target"] == f" {sum(ops)}"
        sp = spans(r)
        assert [int(r["prompt"][slice(*sp[f"n{j}"])]) for j in range(len(ops))] == ops
        nums = r["prompt"][slice(*sp["numbers"])]
        assert nums.startswith(str(ops[0])) and nums.endswith(str(ops[-1]))
        text = training_text(r)
        assert extract_answer(text[len(r["prompt"]):]) == r["answer"]
        if r["cot"]:
            assert r["prompt"].endswith("Steps:")
            # partial sums are right
            partial = ops[0]
            for j, x in enumerate(ops[1:]):
                assert f"{arith_mod.ORDINALS[j]} {partial}+{x}={partial + x}." in r["chain"]
                # the question names the step with the same ordinal, before its operand
                assert f"{arith_mod.ORDINALS[j]} " in r["prompt"][: spans(r)[f"n{j + 1}"][0]]
                partial += x
            assert r["chain"].endswith(f"A: {r['answer']}")
        else:
            assert r["prompt"].endswith("A:") and pd.isna(r["chain"])


def test_extract_answer():
    assert extract_answer(" 17\nBob has 3") == 17
    assert extract_answer(" First 5+3=8. Second 8+7=15. A: 15") == 15
    assert extract_answer(" First 5+3=8. A: 8 more A: 9") == 8
    assert extract_answer("no number") is None
    assert extract_answer(None) is None


def test_arith_train_eval_problems_disjoint():
    ev = FAMILIES["arith"].generate(n=400, steps="2,3")
    tr = FAMILIES["arith"].generate(split="train", n=4000, steps="2,3", seed=5)
    key = lambda df: set(df["operands"].map(tuple))  # noqa: E731
    assert not key(ev) & key(tr)
    assert not set(ev["prompt"]) & set(tr["prompt"])


# ----------------------------------------------------------------- dilemma


def test_dilemma_swap_flips_target():
    df = FAMILIES["dilemma"].generate(n=40)
    assert set(df["target"]) == {" 1", " 2"}
    assert abs((df["target"] == " 1").mean() - 0.5) <= 0.05
    for _, r in df.iterrows():
        assert list(r["choices"]) == [" 1", " 2"]
        assert r["cf_target"] == r["foil"] and r["cf_foil"] == r["target"]
        assert r["cf_target"] != r["target"]
        sp, cs = spans(r), spans(r, "cf_spans")
        eth = r["ethical_text"]
        assert r["prompt"][slice(*sp[f"option_{r['intended_option']}"])] == eth
        assert r["cf_prompt"][slice(*cs[f"option_{r['cf_intended_option']}"])] == eth
        assert r["target"] == f" {r['intended_option']}"


def test_dilemma_train_disjoint_and_both_orders():
    ev = FAMILIES["dilemma"].generate()
    tr = FAMILIES["dilemma"].generate(split="train")
    assert not set(ev["group_id"]) & set(tr["group_id"])
    assert (tr.groupby("group_id")["target"].nunique() == 2).all()
    # every option text of an eval instance is seen in training
    seen = set(tr["ethical_text"]) | set(tr["unethical_text"])
    assert set(ev["ethical_text"]) <= seen


def test_dilemma_import_json(tmp_path):
    base = [{"prompt_id": "a", "prompt": "Q. Option 1: lie. Option 2: help. Answer:",
             "ethical_option": 2},
            {"prompt_id": "b", "prompt": "Q. Option 1: share. Option 2: steal. Answer:",
             "ethical_option": "1"}]
    cf = [{"prompt_id": "a", "prompt": "Q. Option 1: help. Option 2: lie. Answer:",
           "ethical_option": 1},
          {"prompt_id": "b", "prompt": "Q. Option 1: steal. Option 2: share. Answer:",
           "ethical_option": "Option 2"}]
    (tmp_path / "base_prompts.json").write_text(json.dumps(base))
    (tmp_path / "counterfactual_prompts.json").write_text(json.dumps(cf))
    df = FAMILIES["dilemma"].generate(import_base=str(tmp_path / "base_prompts.json"),
                                      import_cf=str(tmp_path / "counterfactual_prompts.json"))
    assert list(df["target"]) == [" 2", " 1"] and list(df["cf_target"]) == [" 1", " 2"]
    r = df.iloc[0]
    assert r["prompt"][slice(*spans(r)["option_2"])] == "help"
    assert r["cf_prompt"][slice(*spans(r, "cf_spans")["option_1"])] == "help"
    cf[1]["prompt_id"] = "c"
    (tmp_path / "counterfactual_prompts.json").write_text(json.dumps(cf))
    with pytest.raises(InputError, match="no counterfactual for prompt_id 'b'"):
        dilemma_mod.import_json(tmp_path / "base_prompts.json",
                                tmp_path / "counterfactual_prompts.json")
    base[0]["ethical_option"] = 3
    (tmp_path / "base_prompts.json").write_text(json.dumps(base))
    with pytest.raises(InputError, match="ethical_option: expected 1 or 2"):
        dilemma_mod.import_json(tmp_path / "base_prompts.json",
                                tmp_path / "counterfactual_prompts.json")


# ----------------------------------------------------------------- from-file


def test_from_file_mapping_and_errors(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"Q{i}:", "answer": f" {i}", "extra": i})
                           for i in range(3)))
    df = FAMILIES["from-file"].generate(path=str(p), map="prompt=text,target=answer")
    assert list(df["prompt"]) == ["Q0:", "Q1:", "Q2:"]
    assert list(df["target"]) == [" 0", " 1", " 2"]
    assert list(df["prompt_id"]) == ["data-00000", "data-00001", "data-00002"]
    assert list(df["extra"]) == [0, 1, 2] and (df["family"] == "from-file").all()
    with pytest.raises(InputError, match=r"data.jsonl: column 'answr' \(mapped to target\)"):
        FAMILIES["from-file"].generate(path=str(p), map=["prompt=text", "target=answr"])
    with pytest.raises(InputError, match="no prompt column"):
        FAMILIES["from-file"].generate(path=str(p))
    with pytest.raises(InputError, match="missing.csv: file not found"):
        FAMILIES["from-file"].generate(path=str(tmp_path / "missing.csv"))
    c = tmp_path / "d.csv"
    c.write_text('prompt,choices\nhi,"["" a"", "" b""]"\n')
    d = FAMILIES["from-file"].generate(path=str(c))
    assert list(d["choices"].iloc[0]) == [" a", " b"]
    q = tmp_path / "d.parquet"
    pd.DataFrame({"prompt": ["x", "y"], "prompt_id": ["1", "1"]}).to_parquet(q)
    with pytest.raises(InputError, match="expected unique ids"):
        FAMILIES["from-file"].generate(path=str(q))

