"""dolm-gen-prompts: the real executable, output validated, bad input exits 3."""

from __future__ import annotations

import io
import json
import subprocess

import pandas as pd
import pyarrow.parquet as pq
import pytest
from dolm.formats import read_table, validate_file
from dolm.tasks import FAMILIES


def gen(*args, cwd=None):
    return subprocess.run(["dolm-gen-prompts", *map(str, args)], capture_output=True, cwd=cwd)


def ok(r):
    assert r.returncode == 0, r.stderr.decode()
    return r


@pytest.mark.parametrize(
    "family,args",
    [
        ("factual", ["--relations", "city,job", "--n", "40"]),
        ("bayes", ["--n-draws", "10", "--sweep", "--permutations", "3", "--distractors", "0,2",
                   "--symbol-swap", "--templates", "base,independent"]),
        ("formats", ["--n", "30", "--design", "observational", "--confounding", "2"]),
        ("arith", ["--n", "20", "--steps", "3", "--cot", "both"]),
        ("dilemma", ["--n", "10"]),
    ],
)
def test_family_writes_valid_prompts_equal_to_api(tmp_path, family, args):
    out = tmp_path / f"{family}.parquet"
    ok(gen(family, *args, "-o", out, "--seed", 5))
    assert validate_file(str(out))[1] == []
    df, meta = read_table(str(out), schema="prompts")
    assert meta.schema == "prompts"
    assert meta.provenance[-1]["tool"] == "gen-prompts" and meta.provenance[-1]["seed"] == 5
    assert meta.extra["family"] == family
    # the same table as the Python API with the same options
    opts = {}
    for a, b in zip(args[::1], args[1:] + [None], strict=True):
        if a.startswith("--"):
            name = a[2:].replace("-", "_")
            opt = FAMILIES[family].option(name)
            opts[name] = True if opt.type == "bool" else b
    api = FAMILIES[family].generate(seed=5, **opts)
    assert list(df["prompt_id"]) == list(api["prompt_id"])
    assert list(df["prompt"]) == list(api["prompt"])
    assert list(df["target"]) == list(api["target"])


def test_bayes_sweep_cli_shape(tmp_path):
    out = tmp_path / "b.parquet"
    ok(gen("bayes", "--sweep", "--permutations", "20", "--distractors", "0,1,2,4,8",
           "--symbol-swap", "-o", out))
    df, _ = read_table(str(out))
    assert set(df["distractors"]) == {0, 1, 2, 4, 8} and set(df["symbols"]) == {"XY", "AB"}
    assert sorted(set(df["n_x"])) == list(range(11))
    assert len(df) == 162 * 5 * 2


def test_stdout_and_determinism(tmp_path):
    a = ok(gen("arith", "--n", "10", "-o", "-")).stdout
    b = ok(gen("arith", "--n", "10", "-o", "-")).stdout
    ta, tb = pq.read_table(io.BytesIO(a)), pq.read_table(io.BytesIO(b))
    assert ta.drop_columns([]).to_pandas().equals(tb.to_pandas())
    assert ta.num_rows == 20
    assert b"dolm.schema" in ta.schema.metadata


def test_train_split_cli(tmp_path):
    ev, tr = tmp_path / "ev.parquet", tmp_path / "tr.parquet"
    ok(gen("arith", "--n", "50", "--steps", "2", "-o", ev))
    ok(gen("arith", "--n", "500", "--steps", "2", "--split", "train", "-o", tr))
    e, _ = read_table(str(ev))
    t, _ = read_table(str(tr))
    assert (t["split"] == "train").all()
    assert not set(e["operands"].map(tuple)) & set(t["operands"].map(tuple))


def test_dilemma_import_json_cli(tmp_path):
    base = [{"prompt_id": f"p{i}", "prompt": f"S{i}. Option 1: a. Option 2: b. Answer:",
             "ethical_option": 1 + i % 2} for i in range(4)]
    cf = [{"prompt_id": f"p{i}", "prompt": f"S{i}. Option 1: b. Option 2: a. Answer:",
           "ethical_option": 2 - i % 2} for i in range(4)]
    b, c = tmp_path / "base_prompts.json", tmp_path / "counterfactual_prompts.json"
    b.write_text(json.dumps(base))
    c.write_text(json.dumps(cf))
    out = tmp_path / "d.parquet"
    ok(gen("dilemma", "--import-json", b, c, "-o", out))
    df, meta = read_table(str(out))
    assert list(df["target"]) == [" 1", " 2", " 1", " 2"]
    assert list(df["cf_target"]) == [" 2", " 1", " 2", " 1"]
    assert {i["path"] for i in meta.provenance[-1]["inputs"]} == {str(b), str(c)}


def test_from_file_cli(tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_text("\n".join(json.dumps({"text": f"Q{i} is", "answer": " yes", "k": i})
                             for i in range(5)))
    out = tmp_path / "f.parquet"
    ok(gen("from-file", src, "--map", "prompt=text", "--map", "target=answer", "-o", out))
    df, _ = read_table(str(out), schema="prompts")
    assert list(df["prompt"]) == [f"Q{i} is" for i in range(5)] and list(df["k"]) == list(
        range(5))
    csv = tmp_path / "data.csv"
    pd.DataFrame({"q": ["a", "b"], "t": [" 1", " 2"]}).to_csv(csv, index=False)
    ok(gen("from-file", csv, "--map", "prompt=q", "--map", "target=t", "-o", tmp_path / "c.pq",
           "--family-name", "mine"))
    d2, _ = read_table(str(tmp_path / "c.pq"))
    assert list(d2["family"]) == ["mine", "mine"] and list(d2["target"]) == [" 1", " 2"]


def test_model_tokenizer_equal_token_counterfactuals(tmp_path, tiny_gpt2_dir):
    out = tmp_path / "f.parquet"
    r = ok(gen("factual", "--relations", "city", "--model", tiny_gpt2_dir, "-o", out))
    df, meta = read_table(str(out))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_gpt2_dir))
    n = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert len(df) > 0
    assert all(n(p) == n(c) for p, c in zip(df["prompt"], df["cf_prompt"], strict=True))
    assert (df["prompt_tokens"] == df["prompt"].map(n)).all()
    assert meta.provenance[-1]["model"] is not None
    assert r.returncode == 0


@pytest.mark.parametrize(
    "args,needle",
    [
        (["from-file", "{tmp}/missing.jsonl", "--map", "prompt=text"],
         "missing.jsonl: file not found"),
        (["from-file", "{tmp}/data.jsonl", "--map", "prompt=txt"],
         "data.jsonl: column 'txt' (mapped to prompt) not found"),
        (["from-file", "{tmp}/data.jsonl", "--map", "prompt"],
         "--map: expected COLUMN=FILE_COLUMN"),
        (["bayes", "--n-draws", "ten"], "'ten' is not a valid integer"),
        (["bayes", "--distractors", "1,a"], "--distractors: expected comma-separated integers"),
        (["bayes", "--templates", "base,nope"], "--templates: expected one of"),
        (["formats", "--design", "random"], "'random' is not one of"),
        (["dilemma", "--import-json", "{tmp}/nope.json", "{tmp}/data.jsonl"],
         "nope.json: file not found"),
        (["factual", "--model", "{tmp}/no_such_model"], "no_such_model"),
    ],
)
def test_bad_input_exit_3(tmp_path, args, needle):
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    out = tmp_path / "out.parquet"
    r = gen(*[a.replace("{tmp}", str(tmp_path)) for a in args], "-o", out)
    err = r.stderr.decode()
    assert r.returncode == 3, (r.returncode, err)
    assert needle in err and "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob("*.parquet*"))


def test_usage_errors_exit_2(tmp_path):
    r = gen("bayes")  # no -o
    assert r.returncode == 2 and b"Missing option" in r.stderr
    r = gen("nofamily", "-o", tmp_path / "x.parquet")
    assert r.returncode == 2 and b"No such command" in r.stderr


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "a.parquet"
    ok(gen("arith", "--n", "3", "-o", out))
    before = out.read_bytes()
    r = gen("arith", "--n", "4", "-o", out)
    assert r.returncode == 3 and b"--force" in r.stderr and out.read_bytes() == before
    ok(gen("arith", "--n", "4", "-o", out, "--force"))
    assert len(read_table(str(out))[0]) == 8
