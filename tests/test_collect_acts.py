"""dolm-collect-acts, run as the real executable on a tiny random GPT-2.

Numbers are checked against independent computations with plain Hugging Face forward
passes (teacher-forced log-probs, ranks, choice probabilities, hidden states, eager
attention weights, a greedy loop without cache), and against the tool itself at
another batch size, after a kill + --resume, and after --shard + merge.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

TOOL = "dolm-collect-acts"

PROMPTS = [
    # prompt, target, choices, subject
    ("The capital of France is", " Paris", None, "France"),
    ("the king of the city was", " the blue", [" the", " a", " of"], "king"),
    ("red blue green cat dog bird tree house car book apple water", " fire", None, "dog"),
    ("one two three", " four five", [" four", " one", " two"], "two"),
    ("A B C D", None, [" X", " Y"], "B C"),
    ("the river of Rome is the river of the city of the king of Italy and", " the", None, "Rome"),
    ("Tokyo", " Japan is", [" no", " B"], "Tokyo"),
]


def _env(**kw):
    # tiny models gain nothing from threads; on a shared machine they only add waiting
    return dict(os.environ, DOLM_PROGRESS="0", OMP_NUM_THREADS="1", **kw)


def _run(*args, check=True, **kw):
    env = _env()
    proc = subprocess.run([TOOL, *map(str, args)], capture_output=True, text=True, env=env, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{TOOL} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def _prompts_frame(rows, repeat=1):
    out = []
    for r in range(repeat):
        for i, (prompt, target, choices, subject) in enumerate(rows):
            s = prompt.index(subject)
            out.append(
                {
                    "prompt_id": f"p{r}-{i}",
                    "family": "factual",
                    "prompt": prompt,
                    "target": target,
                    "choices": choices,
                    "spans": json.dumps({"subject": [s, s + len(subject)]}),
                    "split": "eval",
                    **dict.fromkeys(
                        ["foil", "cf_prompt", "cf_target", "cf_foil", "cf_spans", "group_id"]
                    ),
                }
            )
    return pd.DataFrame(out)


def _finished(paths):
    return [p for p in paths if Path(p).exists()]


# ---------------------------------------------------------------- reference (plain HF)


class Reference:
    def __init__(self, model_dir):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
        self.model.eval()

    def ids(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def run(self, prompt, target):
        """Batch-of-one forward with hidden states, attentions, last block output, heads."""
        torch = self.torch
        p = self.ids(prompt)
        t = self.ids(target) if target else []
        grabbed = {}
        blocks = self.model.transformer.h
        h_last = blocks[-1].register_forward_hook(lambda m, a, o: grabbed.update(last=o))
        h_heads = blocks[1].attn.c_proj.register_forward_pre_hook(
            lambda m, a: grabbed.update(heads=a[0])
        )
        try:
            with torch.no_grad():
                out = self.model(
                    torch.tensor([p + t]), output_hidden_states=True, output_attentions=True
                )
        finally:
            h_last.remove()
            h_heads.remove()
        return p, t, out, grabbed

    def span_tokens(self, prompt, start, end):
        off = self.tok(prompt, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        return [i for i, (s, e) in enumerate(off) if e > s and s < end and e > start]

    def greedy(self, prompt, n):
        torch = self.torch
        ids = self.ids(prompt)
        new = []
        for _ in range(n):
            with torch.no_grad():
                nxt = int(self.model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == self.tok.eos_token_id:
                break
            new.append(nxt)
        return self.tok.decode(new, skip_special_tokens=True)


REPEAT = 18  # 126 prompts: halves of 63 = 21 batches of 3, so shards batch like one run


@pytest.fixture(scope="module")
def main_runs(tiny_gpt2_dir, tmp_path_factory):
    """One prompts table (PROMPTS repeated) run once at batch size 3, with everything on.

    The reference computations are batches of one, so the parity tests below are also
    the check that padding/batching changes nothing beyond 1e-4.
    """
    d = tmp_path_factory.mktemp("collect")
    df = _prompts_frame(PROMPTS, repeat=REPEAT)
    df.to_parquet(d / "prompts.parquet")
    common = [
        d / "prompts.parquet", "--model", tiny_gpt2_dir,
        "--sites", "resid_post.*,head.1.*", "--positions", "last,subject",
        "--attention-to", "subject", "--generate", "5", "--batch-size", "3",
    ]  # fmt: skip
    _run(*common, "-o", d / "b3.parquet", "--acts", d / "b3.h5")
    return d, df, Reference(tiny_gpt2_dir), common


def test_target_and_choice_scores_match_plain_forward(main_runs):
    d, df, ref, _ = main_runs
    out = pd.read_parquet(d / "b3.parquet")
    assert list(out["prompt_id"]) == list(df["prompt_id"])
    out = out.iloc[: len(PROMPTS)]
    torch = ref.torch
    for (prompt, target, choices, _), row in zip(PROMPTS, out.itertuples(), strict=True):
        p, t, res, _ = ref.run(prompt, target)
        assert row.n_tokens == len(p)
        logits = res.logits[0]
        last = logits[len(p) - 1]
        if target is None:
            assert pd.isna(row.target_logprob) and pd.isna(row.target_rank)
            assert row.correct is None or pd.isna(row.correct)
        else:
            logp = torch.log_softmax(logits, -1)
            want = sum(float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(t))
            assert row.target_n_tokens == len(t)
            assert row.target_logprob == pytest.approx(want, abs=1e-4)
            assert row.target_rank == int((last > last[t[0]]).sum())
            greedy = all(int(logits[len(p) - 1 + j].argmax()) == tok for j, tok in enumerate(t))
            assert bool(row.correct) == greedy
        if choices is None:
            assert row.choice_probs is None
        else:
            cid = [ref.ids(c)[0] for c in choices]
            raw = torch.softmax(last, -1)[cid].numpy()
            np.testing.assert_allclose(row.choice_probs_raw, raw, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(row.choice_probs, raw / raw.sum(), rtol=1e-4, atol=1e-7)
            assert row.choice_pred == int(np.argmax(raw))


def test_activations_match_hidden_states(main_runs):
    d, df, ref, _ = main_runs
    with h5py.File(d / "b3.h5", "r") as f:
        pid = f["prompt_id"].asstr()[:]
        position = f["position"][:]
        label = f["position_label"].asstr()[:]
        token = f["token_id"][:]
        index = f["prompt_index"][:]
        acts = {k: f[k][:] for k in f if k.startswith(("resid_post", "head"))}
        n_rows = len(pid)
        assert f["resid_post.0"].compression == "gzip"
        assert f["resid_post.0"].chunks is not None
    n_layers = 3
    assert sorted(acts) == sorted(
        [f"resid_post.{i}" for i in range(n_layers)] + [f"head.1.{h}" for h in range(4)]
    )
    at = 0
    for i, (prompt, target, _, subject) in enumerate(PROMPTS):
        p, _, res, grabbed = ref.run(prompt, target)
        s = prompt.index(subject)
        subj = ref.span_tokens(prompt, s, s + len(subject))
        assert subj, subject
        want_pos = [len(p) - 1] + subj
        rows = slice(at, at + len(want_pos))
        at += len(want_pos)
        assert list(pid[rows]) == [df.prompt_id[i]] * len(want_pos)
        assert list(index[rows]) == [i] * len(want_pos)
        assert list(position[rows]) == want_pos
        assert list(label[rows]) == ["last"] + ["subject"] * len(subj)
        assert list(token[rows]) == [p[j] for j in want_pos]
        for layer in range(n_layers):
            hs = grabbed["last"] if layer == n_layers - 1 else res.hidden_states[layer + 1]
            np.testing.assert_allclose(
                acts[f"resid_post.{layer}"][rows], hs[0, want_pos].numpy(), atol=1e-5
            )
        heads = grabbed["heads"][0, want_pos].numpy().reshape(len(want_pos), 4, 8)
        for h in range(4):
            np.testing.assert_allclose(acts[f"head.1.{h}"][rows], heads[:, h], atol=1e-5)
    assert at * REPEAT == n_rows


def test_attention_to_span_matches_eager_attention(main_runs):
    d, _, ref, _ = main_runs
    out = pd.read_parquet(d / "b3.parquet").iloc[: len(PROMPTS)]
    cols = [c for c in out.columns if c.startswith("attn_to.")]
    assert len(cols) == 3 * 4
    for (prompt, target, _, subject), row in zip(PROMPTS, out.to_dict("records"), strict=True):
        p, _, res, _ = ref.run(prompt, target)
        s = prompt.index(subject)
        subj = ref.span_tokens(prompt, s, s + len(subject))
        for layer in range(3):
            mass = res.attentions[layer][0, :, len(p) - 1, subj].sum(-1).numpy()
            for h in range(4):
                assert row[f"attn_to.subject.L{layer}.H{h}"] == pytest.approx(mass[h], abs=1e-5)


def test_generation_matches_greedy_loop(main_runs):
    d, _, ref, _ = main_runs
    out = pd.read_parquet(d / "b3.parquet").iloc[: len(PROMPTS)]
    for (prompt, target, _, _), row in zip(PROMPTS, out.itertuples(), strict=True):
        text = ref.greedy(prompt, 5)
        assert row.generation == text
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        assert row.answer == first
        if target is None:
            assert row.exact_match is None or pd.isna(row.exact_match)
        else:
            assert bool(row.exact_match) == (first == target.strip())


def _assert_close_tables(a, b):
    assert list(a.columns) == list(b.columns)
    for col in a.columns:
        if col in ("choice_probs", "choice_probs_raw"):
            for x, y in zip(a[col], b[col], strict=True):
                assert (x is None) == (y is None)
                if x is not None:
                    np.testing.assert_allclose(x, y, atol=1e-4)
        elif a[col].dtype.kind == "f":
            np.testing.assert_allclose(a[col], b[col], atol=1e-4)
        else:
            assert a[col].tolist() == b[col].tolist(), col


def test_batch_composition_does_not_change_results(main_runs):
    """Each copy of a prompt sat in another batch, beside other lengths: same numbers."""
    d, _, _, _ = main_runs
    a = pd.read_parquet(d / "b3.parquet")
    k = len(PROMPTS)
    first = a.iloc[:k].drop(columns="prompt_id").reset_index(drop=True)
    for r in range(1, REPEAT):
        copy = a.iloc[r * k : (r + 1) * k].drop(columns="prompt_id").reset_index(drop=True)
        _assert_close_tables(first, copy)
    with h5py.File(d / "b3.h5", "r") as f:
        index = f["prompt_index"][:] % k  # the same prompt in every copy
        for site in ("resid_post.2", "head.1.3"):
            acts = f[site][:]
            for i in range(k):
                rows = acts[index == i].reshape(REPEAT, -1, acts.shape[1])
                np.testing.assert_allclose(rows, np.broadcast_to(rows[:1], rows.shape), atol=1e-4)


def test_outputs_validate_and_carry_provenance(main_runs):
    from dolm.formats import read_meta, validate_file

    d, _, _, _ = main_runs
    for name, schema in (("b3.parquet", "outcomes"), ("b3.h5", "activations")):
        found, problems = validate_file(str(d / name))
        assert problems == [] and found == schema
        meta = read_meta(str(d / name))
        assert meta.provenance[-1]["tool"] == "collect-acts"
        assert meta.provenance[-1]["model"]["weights_sha256"]
        assert meta.extra["options"]["sites"][0] == "resid_post.0"


# ---------------------------------------------------------------- resume, shards


def _assert_same(d, a, b):
    ta, tb = pd.read_parquet(d / f"{a}.parquet"), pd.read_parquet(d / f"{b}.parquet")
    pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    with h5py.File(d / f"{a}.h5", "r") as fa, h5py.File(d / f"{b}.h5", "r") as fb:
        assert sorted(fa) == sorted(fb)
        for k in fa:
            assert fa[k].dtype == fb[k].dtype, k
            assert np.array_equal(fa[k][:], fb[k][:]), k


def _kill_mid_run(args, journal: Path) -> None:
    """Start ``args``, SIGKILL it once two batches are committed."""
    env = _env(DOLM_COMMIT_SECONDS="0")  # commit after every batch
    proc = subprocess.Popen(list(map(str, args)), env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if journal.exists() and journal.read_text().count('"commit"') >= 2:
                break
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_resume_shard_and_merge_equal_the_uninterrupted_run(main_runs):
    """Shard 1/2 is killed mid-run and resumed; shard 2/2 runs straight; the resumed
    shard equals the uninterrupted run's rows bit for bit, and so does the merge."""
    d, _, _, common = main_runs
    s1, a1 = d / "s1.parquet", d / "s1.h5"
    journal = Path(str(s1) + ".partial")
    _kill_mid_run([TOOL, *common, "-o", s1, "--acts", a1, "--shard", "1/2"], journal)
    assert _finished([s1, a1]) == []  # nothing that looks complete
    assert journal.exists() and Path(str(a1) + ".partial").exists()
    complete = journal.read_bytes().split(b"\n")[:-1]  # a torn last line does not count
    done = sum(b'"commit"' in line for line in complete)
    half = len(PROMPTS) * REPEAT // 2
    assert 2 <= done < half // 3
    res = _run(*common, "-o", s1, "--acts", a1, "--shard", "1/2", "--resume")
    assert f"resuming after {3 * done} of {half} prompts" in res.stderr
    assert not journal.exists() and not Path(str(a1) + ".partial").exists()

    full = pd.read_parquet(d / "b3.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(s1), full.iloc[:half], check_exact=True)
    with h5py.File(d / "b3.h5", "r") as ff, h5py.File(a1, "r") as fs:
        rows = int((ff["prompt_index"][:] < half).sum())
        assert sorted(ff) == sorted(fs)
        for k in ff:
            assert ff[k].dtype == fs[k].dtype, k
            assert np.array_equal(ff[k][:rows], fs[k][:]), k

    _run(*common, "-o", d / "s2.parquet", "--acts", d / "s2.h5", "--shard", "2/2")
    bad = _run("merge", s1, "-o", d / "m.parquet", check=False)
    assert bad.returncode == 3 and "shards missing: 2/2" in bad.stderr
    twice = _run("merge", s1, s1, "-o", d / "m.parquet", check=False)
    assert twice.returncode == 3 and "given twice" in twice.stderr
    other = _run("merge", s1, d / "b3.parquet", "-o", d / "m.parquet", check=False)
    assert other.returncode == 3 and "not a shard" in other.stderr
    assert _finished([d / "m.parquet"]) == []
    # outcomes to stdout this time (a Parquet table can go down a pipe)
    args = [TOOL, "merge", d / "s2.parquet", s1, "-o", "-", "--acts", d / "merged.h5"]
    proc = subprocess.run(list(map(str, args)), capture_output=True, env=_env())
    assert proc.returncode == 0, proc.stderr.decode()
    (d / "merged.parquet").write_bytes(proc.stdout)
    _assert_same(d, "b3", "merged")


def test_journal_and_writer_resume_units(tmp_path):
    """The durable-state pieces alone: torn tails, fingerprints, truncation, float16."""
    from dolm.errors import InputError
    from dolm_tools.collect_acts.store import ActsWriter, Journal

    j = Journal(tmp_path / "o.partial", {"a": 1})
    j.start()
    j.append([{"prompt_id": "x", "v": 0.1}])
    j.commit(acts_rows=2)
    j.append([{"prompt_id": "y", "v": 0.2}])
    j.commit(acts_rows=3)
    j.close()
    with open(j.path, "a") as fh:
        fh.write('{"row": {"prompt_id": "z"}}\n{"comm')  # a torn tail from a kill
    j2 = Journal(j.path, {"a": 1})
    assert j2.resume() and (j2.n_done, j2.acts_rows) == (2, 3)
    assert [r["prompt_id"] for r in j2.rows()] == ["x", "y"]
    j2.append([{"prompt_id": "w", "v": 1e-300}])
    j2.commit(acts_rows=4)
    assert [r["v"] for r in j2.rows()] == [0.1, 0.2, 1e-300]
    j2.close()
    with pytest.raises(InputError, match="a: 1 then, 2 now"):
        Journal(j.path, {"a": 2}).resume()

    with h5py.File(tmp_path / "a.h5", "w") as fh:
        w = ActsWriter(fh, {"resid_post.0": 4}, "float16")
        w.create()
        coords = {
            "prompt_id": ["x", "x", "y"], "prompt_index": np.array([0, 0, 1]),
            "position": np.array([0, 1, 0]), "position_label": ["all"] * 3,
            "token_id": np.array([5, 6, 7]),
        }  # fmt: skip
        w.append(coords, {"resid_post.0": np.arange(12, dtype=np.float16).reshape(3, 4)})
        digest = w.commit()
        assert fh["resid_post.0"].dtype == np.float16 and fh["resid_post.0"].shape == (3, 4)
        # a committed row that reads back otherwise (a torn or stale chunk) is refused
        fh["resid_post.0"][1, 0] = 99
        assert "differ from what was committed" in w.reopen(3, [(0, 3, digest)])
        fh["resid_post.0"][1, 0] = 4
        assert w.reopen(2, [(0, 3, digest)]) is None
        assert fh["prompt_id"].shape == (2,) and w.rows == 2
        assert "does not hold the 5 committed rows" in w.reopen(5, [])


def test_auto_batch_size_backs_off_on_out_of_memory(tiny_lm, tmp_path, monkeypatch):
    import torch
    from dolm.cli import progress
    from dolm_tools.collect_acts import collect, engine
    from dolm_tools.collect_acts.store import Journal

    lm = tiny_lm("gpt2")
    df = _prompts_frame(PROMPTS, repeat=3)
    settings = engine.Settings()
    items = engine.plan_items(df, lm, settings, where="prompts")
    real, sizes = engine.Scorer.score, []

    def score(self, batch):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, batch)

    monkeypatch.setattr(engine.Scorer, "score", score)
    journal, said = Journal(tmp_path / "o.partial", {}), []
    journal.start()
    collect._loop(lm, settings, items, journal, None, "auto", progress, said.append)
    assert [r["prompt_id"] for r in journal.rows()] == list(df["prompt_id"])
    assert sizes[:3] == [8, 4, 2] and max(sizes[3:]) == 2
    assert any("batch size now 2" in m for m in said)


def test_plan_names_the_prompt_at_fault(tiny_lm):
    """Span and position problems, checked before any forward pass (in-process)."""
    from dolm.errors import InputError
    from dolm_tools.collect_acts.engine import Settings, plan_items

    lm = tiny_lm("gpt2")
    df = _prompts_frame(PROMPTS[:2])
    cases = [
        (Settings(sites=["resid_post.0"], positions=["object_last"]), df,
         "prompt 'p0-0' has no span 'object' (its spans: subject)"),
        (Settings(attention_to=["object"]), df, "--attention-to object: prompt 'p0-0'"),
        (Settings(sites=["resid_post.0"], positions=["subject"]),
         df.assign(spans=json.dumps({"subject": [3, 3]})), "covers no token"),
        (Settings(sites=["resid_post.0"], positions=["subject"]), df.drop(columns="spans"),
         "has no 'spans' column"),
        (Settings(generate=60), df, "(+ 60 generated)"),
    ]  # fmt: skip
    for settings, frame, expect in cases:
        with pytest.raises(InputError) as err:
            plan_items(frame, lm, settings, where="prompts.parquet")
        assert expect in str(err.value)
        assert str(err.value).startswith("prompts.parquet: ")
    items = plan_items(df, lm, Settings(sites=["resid_post.0"], positions=["subject_first", "all"]),
                       where="p")  # fmt: skip
    assert items[0].act_label[0] == "subject_first" and items[0].act_label[1:] == ["all"] * (
        items[0].n
    )


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    _prompts_frame(PROMPTS[:2]).to_parquet(d / "ok.parquet")
    return d


def _bad(d, name, rows=None, frame=None):
    if frame is None:
        frame = _prompts_frame(rows)
    frame.to_parquet(d / name)
    return d / name


@pytest.mark.parametrize(
    "case",
    [
        "missing-file",
        "missing-column",
        "wrong-type",
        "truncated-parquet",
        "unknown-model",
        "unknown-site",
        "too-long",
        "multi-token-choice",
        "output-exists",
    ],
)
def test_bad_input_exits_3_and_leaves_nothing(case, bad_dir, tiny_gpt2_dir, in_process):
    """The click command in-process (its own error handling and exit codes; no cold import
    of torch per case)."""
    d = bad_dir / case
    d.mkdir()
    prompts = bad_dir / "ok.parquet"
    extra: list = []
    expect = ""
    if case == "missing-file":
        prompts, expect = d / "nope.parquet", "nope.parquet: file not found"
    elif case == "missing-column":
        prompts = _bad(d, "p.parquet", frame=_prompts_frame(PROMPTS[:2]).drop(columns=["prompt"]))
        expect = "'prompt'"
    elif case == "wrong-type":
        frame = _prompts_frame(PROMPTS[:2])
        frame["prompt_id"] = [1, 2]
        prompts, expect = _bad(d, "p.parquet", frame=frame), "'prompt_id'"
    elif case == "truncated-parquet":
        data = (bad_dir / "ok.parquet").read_bytes()
        (d / "p.parquet").write_bytes(data[: len(data) // 2])
        prompts, expect = d / "p.parquet", "truncated or corrupt Parquet"
    elif case == "unknown-model":
        extra, expect = ["--model", d / "no-such-model"], "no-such-model"
    elif case == "unknown-site":
        extra, expect = ["--sites", "resid_pots.*"], "valid sites"
    elif case == "too-long":
        prompts = _bad(d, "p.parquet", [(" ".join(["one two three"] * 30), " four", None, "one")])
        expect = "longer than the model's context of 64"
    elif case == "multi-token-choice":
        prompts = _bad(d, "p.parquet", [("A B C", " D", [" X", " Zqxjvw"], "B")])
        expect = "' Zqxjvw' is"
    elif case == "output-exists":
        (d / "out.parquet").write_bytes(b"keep")
        expect = "pass --force"
    model = [] if case == "unknown-model" else ["--model", tiny_gpt2_dir]
    acts = [] if "--sites" in extra else ["--sites", "resid_post.0"]
    proc = in_process(TOOL, prompts, *model, "-o", d / "out.parquet", "--acts",
                      d / "acts.h5", *acts, *extra)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.startswith("dolm-collect-acts: error:"), proc.stderr
    assert expect in proc.stderr
    assert "Traceback" not in proc.stderr
    left = sorted(p.name for p in d.iterdir() if p.name.startswith(("out", "acts")))
    assert left == (["out.parquet"] if case == "output-exists" else [])
    if case == "output-exists":
        assert (d / "out.parquet").read_bytes() == b"keep"
