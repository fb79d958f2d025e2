"""Hostile-but-realistic inputs: every fault ends in a named error and leaves nothing
half-written; crashes resume to the uninterrupted output or start over cleanly.

Each case runs a tool on a tiny random GPT-2 and asserts the exit code (3: the input,
1: the environment), words of the message (the file, column, option or site at fault)
and that no output that looks complete was left behind. Runs that need processes of
their own (two at once, kill -9, a crash on a full disk) use the real executables; the
other cases call the same click commands in-process (``tool``), which spares a cold
import of torch per case.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import run_in_process

ROOT = Path(__file__).resolve().parents[1]
UNITS = pd.DataFrame({"prompt_id": ["a", "b"], "family": ["f", "f"], "prompt": ["x", "y"],
                      "target": [" z", " w"], "correct": [1.0, 0.0]})


def _env(**kw):
    return dict(os.environ, DOLM_PROGRESS="0", OMP_NUM_THREADS="1", **kw)


def dolm(*args, **kw):
    return subprocess.run(list(map(str, args)), capture_output=True, text=True, env=_env(),
                          **kw)


def tool(name: str, *args):
    """``dolm-<name> ARGS`` run in-process (conftest's ``run_in_process``)."""
    return run_in_process(f"dolm-{name}", *args)


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Files in ``folder`` other than ``keep`` (lock files are fine: empty, unlocked)."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in keep and not p.name.endswith(".lock"))


def _prompts(path: Path, n: int = 8, seed: int = 0) -> Path:
    """Word salads the tiny tokenizer reads, with n_x, posterior_b and a binary flag."""
    _crash_module().write_prompts(path, n, seed)
    return path


@pytest.fixture(scope="module")
def kit(tiny_gpt2_dir, tmp_path_factory):
    """prompts (seed 0), their outcomes and activations, a direction file."""
    d = tmp_path_factory.mktemp("bad")
    p = _prompts(d / "prompts.parquet")
    r = dolm("dolm-collect-acts", p, "--model", tiny_gpt2_dir, "-o", d / "out.parquet",
             "--acts", d / "acts.h5", "--sites", "resid_post.1")
    assert r.returncode == 0, r.stderr
    return d, Path(tiny_gpt2_dir)


# ------------------------------------------------------------------ --where


def test_where_grammar_matches_pandas_and_refuses_code(tmp_path):
    from dolm.errors import InputError
    from dolm.where import filter_rows

    df = pd.DataFrame({"n_x": [0, 1, 2, 3, None], "family": ["a", "b", "a", "c", "b"],
                       "p": [0.1, 0.3, 0.5, 0.7, 0.9], "ok": [True, False, True, True, False],
                       "odd name": [1, 2, 3, 4, 5]})
    for q, pandas_q in [
        ("n_x >= 2", None),
        ("p >= 0.25 and p <= 0.75", None),
        ("0.25 <= p <= 0.75", None),
        ("family == 'a' or not n_x < 3", None),
        ("family in ['a', 'c'] and (p > 0.2 | ok)", "family in ['a', 'c'] and (p > 0.2 | ok)"),
        ("family not in [\"b\"]", None),
        ("~ok & p < 1e0", None),
        ("`odd name` != 3", None),
        ("-1 < n_x", None),
    ]:
        got = filter_rows(df, q)
        want = df.query(pandas_q or q, engine="python")
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert len(filter_rows(df, "n_x == null")) == 1
    evil = tmp_path / "pwned"
    for q, words in [
        (f"n_x.__class__.__init__.__globals__['os'].system('touch {evil}')", "unexpected"),
        (f"__import__('os').system('touch {evil}')", "unexpected"),
        ("@os", "unexpected"),
        ("n_x + 1 > 2", "unexpected"),
        ("nope > 1", "no column 'nope'"),
        ("n_x >", "expected a column"),
        ("family", "not a condition"),
        ("family in 'a'", "[list]"),
        ("p < 'x'", "cannot compare"),
        ("", "empty"),
    ]:
        with pytest.raises(InputError, match="--where") as exc:
            filter_rows(df, q)
        assert words in str(exc.value), (q, str(exc.value))
    assert not evil.exists()


def test_where_on_a_tool_refuses_code_and_writes_nothing(kit):
    d, model = kit
    evil = d / "pwned"
    out = d / "steer-where.parquet"
    (d / "dirs.safetensors").unlink(missing_ok=True)
    r = tool("steer", "fit", d / "prompts.parquet", "--model", model, "--sites",
             "resid_post.1", "--label", "flag", "--where",
             f"n_x.__class__.__init__.__globals__['os'].system('touch {evil}')",
             "-o", out)
    assert r.returncode == 3 and "--where" in r.stderr and "unexpected" in r.stderr
    assert not evil.exists() and not out.exists()


# ------------------------------------------------------------------ validate


def _validate(*args):
    return tool("validate", *args)


def test_validate_reads_the_data(kit, tmp_path):
    import h5py

    d, _ = kit
    # a CSV carries no schema: refused unless one is named; garbage is not a CSV
    garbage = tmp_path / "g.csv"
    garbage.write_bytes(bytes(range(250, 256)) + b"\x00\x01\xfe\xff")
    r = _validate(garbage)
    assert r.returncode == 3 and "--schema" in r.stderr
    r = _validate(garbage, "--schema", "prompts")
    assert r.returncode == 3 and "not a CSV text file" in r.stderr
    csv = tmp_path / "p.csv"
    UNITS.to_csv(csv, index=False)
    assert _validate(csv, "--schema", "units").returncode == 0
    r = _validate(csv, "--schema", "outcomes")
    assert r.returncode == 3 and "missing required column" in r.stderr

    # a corrupt gzip chunk: found only by reading the data; --quick says it did not
    bad = tmp_path / "acts.h5"
    shutil.copy(d / "acts.h5", bad)
    with h5py.File(bad, "r") as fh:
        offset = fh["resid_post.1"].id.get_chunk_info(0).byte_offset
    with open(bad, "r+b") as fh:
        fh.seek(offset + 20)
        fh.write(b"\xff" * 64)
    r = _validate(bad)
    assert r.returncode == 3 and "'resid_post.1'" in r.stderr and "cannot be read" in r.stderr
    r = _validate("--quick", bad)
    assert r.returncode == 0 and "quick: data not read" in r.stdout
    assert _validate(d / "acts.h5").returncode == 0

    # NaN activations where the schema forbids them
    nan = tmp_path / "nan.h5"
    shutil.copy(d / "acts.h5", nan)
    with h5py.File(nan, "r+") as fh:
        fh["resid_post.1"][0, 0] = np.nan
    r = _validate(nan)
    assert r.returncode == 3 and "NaN/inf" in r.stderr and "'resid_post.1'" in r.stderr


def _dag(path, nodes, edges):
    obj = {"nodes": nodes, "edges": [{"source": s, "target": t} for s, t in edges],
           "dolm": {"schema": {"name": "dag", "version": 1}, "provenance": []}}
    path.write_text(json.dumps(obj))
    return path


def test_validate_and_psm_refuse_bad_dags(tmp_path):
    ok = _dag(tmp_path / "ok.json", ["a", "b", "c"], [("a", "b"), ("b", "c")])
    assert _validate(ok).returncode == 0
    cyc = _dag(tmp_path / "cyc.json", ["a", "b", "c"], [("a", "b"), ("b", "c"), ("c", "a")])
    r = _validate(cyc)
    assert r.returncode == 3 and "cycle" in r.stderr and "a -> b -> c -> a" in r.stderr
    unk = _dag(tmp_path / "unk.json", ["a", "b"], [("a", "zz")])
    r = _validate(unk)
    assert r.returncode == 3 and "'zz'" in r.stderr and "not in 'nodes'" in r.stderr


def _directions(path, values):
    import torch
    from dolm.formats import save_safetensors

    save_safetensors({"direction.resid_post.1": torch.tensor(values, dtype=torch.float32)},
                     path, schema="directions", run=None, force=True)
    return path


def test_directions_truncated_or_nan_are_named(kit, tmp_path):
    d, model = kit
    good = _directions(tmp_path / "good.safetensors", [1.0] + [0.0] * 31)
    assert _validate(good).returncode == 0
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(good.read_bytes()[:-40])
    r = _validate(trunc)
    assert r.returncode == 3 and "truncated safetensors" in r.stderr
    # NaN cannot be written by save_safetensors' checks? it can: the check is on reading
    nan = _directions(tmp_path / "nan.safetensors", [float("nan")] * 32)
    r = _validate(nan)
    assert r.returncode == 3 and "NaN/inf" in r.stderr and "direction.resid_post.1" in r.stderr
    for bad, words in ((trunc, "truncated"), (nan, "NaN/inf")):
        out = tmp_path / f"apply-{bad.stem}.parquet"
        r = tool("steer", "apply", d / "prompts.parquet", "--directions", bad,
                 "--model", model, "--alphas", "0,1", "-o", out)
        assert r.returncode == 3 and words in r.stderr and str(bad) in r.stderr, r.stderr
        assert not out.exists()


# ------------------------------------------------------------------ joins


def test_stale_prompts_are_refused_by_joins(kit, tmp_path):
    d, model = kit
    stale = _prompts(tmp_path / "prompts2.parquet", seed=1)  # same ids, other rows
    out = tmp_path / "dirs.safetensors"
    fit = ["fit", stale, "--acts", d / "acts.h5", "--sites", "resid_post.1",
           "--label", "flag", "-o", out]
    r = tool("steer", *fit)
    assert r.returncode == 3 and "another prompts table" in r.stderr
    assert "--allow-other-prompts" in r.stderr and not out.exists()
    assert tool("steer", *fit, "--allow-other-prompts").returncode == 0 and out.exists()
    out.unlink()
    # the right prompts join; an explicit --model of another model is refused
    right = ["fit", d / "prompts.parquet", "--acts", d / "acts.h5", "--sites",
             "resid_post.1", "--label", "flag", "-o", out]
    r = tool("steer", *right, "--model", "toy")
    assert r.returncode == 3 and "--allow-model-mismatch" in r.stderr and not out.exists()
    r = tool("steer", *right, "--model", model)
    assert r.returncode == 0, r.stderr

    units = tmp_path / "units.parquet"
    join = [sys.executable, ROOT / "pipelines" / "join_units.py", stale, d / "out.parquet",
            "-o", units]
    r = dolm(*join)
    assert r.returncode == 3 and "--allow-other-prompts" in r.stderr and not units.exists()
    assert dolm(*join, "--allow-other-prompts").returncode == 0


def test_bad_activations_in_steer_fit_are_named(kit, tmp_path):
    import h5py

    d, _ = kit
    nan = tmp_path / "nan.h5"
    shutil.copy(d / "acts.h5", nan)
    with h5py.File(nan, "r+") as fh:
        fh["resid_post.1"][2, :] = np.nan
    out = tmp_path / "dirs.safetensors"
    r = tool("steer", "fit", d / "prompts.parquet", "--acts", nan, "--sites",
             "resid_post.1", "--label", "flag", "-o", out)
    assert r.returncode == 3 and "NaN/inf activations" in r.stderr and "p2" in r.stderr
    assert not out.exists()


# ------------------------------------------------------------------ options, models, psm


def test_named_option_and_model_errors(kit, tmp_path):
    import torch

    d, model = kit
    out = tmp_path / "o.parquet"
    r = tool("gen-prompts", "bayes", "--n", "-5", "-o", out)
    assert r.returncode == 3 and "--n" in r.stderr and not out.exists()
    if not torch.cuda.is_available():
        r = tool("collect-acts", d / "prompts.parquet", "--model", model, "--device",
                 "cuda", "-o", out)
        assert r.returncode == 3 and "--device cuda" in r.stderr and "CUDA" in r.stderr
        assert not out.exists()
    r = tool("collect-acts", d / "prompts.parquet", "--model", model, "--device",
             "gpu", "-o", out)
    assert r.returncode == 3 and "--device gpu" in r.stderr
    broken = tmp_path / "broken-model"
    shutil.copytree(model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    r = tool("collect-acts", d / "prompts.parquet", "--model", broken, "-o", out)
    assert r.returncode == 3 and "--model" in r.stderr and "cannot be read" in r.stderr, r.stderr
    assert not out.exists() and _leftovers(tmp_path, {"broken-model"}) == []


def test_psm_names_an_infinite_covariate(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    df = pd.DataFrame({"t": rng.integers(0, 2, n), "x": rng.normal(size=n),
                       "z": rng.normal(size=n), "y": rng.normal(size=n)})
    df.loc[7, "z"] = np.inf
    table = tmp_path / "u.csv"
    df.to_csv(table, index=False)
    out = tmp_path / "psm.json"
    r = tool("psm", table, "--treatment", "t", "--outcome", "y", "--covariates", "x,z",
             "-o", out)
    assert r.returncode == 3 and "'z'" in r.stderr and "infinite" in r.stderr
    assert "rows 7" in r.stderr
    assert _leftovers(tmp_path, {"u.csv"}) == []


def test_all_or_none_commits_every_output_or_none(tmp_path):
    from dolm.formats import all_or_none, write_json, write_table

    df = UNITS
    with pytest.raises(RuntimeError, match="boom"):
        with all_or_none():
            write_table(df, tmp_path / "one.parquet", "units", None)
            write_json({"nodes": [], "edges": []}, tmp_path / "two.json", "dag", None)
            assert not (tmp_path / "one.parquet").exists()  # not before the block ends
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with all_or_none():
        write_table(df, tmp_path / "one.parquet", "units", None)
        write_json({"nodes": [], "edges": []}, tmp_path / "two.json", "dag", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.parquet", "two.json"]


# ------------------------------------------------------------------ provenance


def test_provenance_records_no_absolute_paths(kit):
    from dolm.formats import read_meta

    d, model = kit
    entry = read_meta(str(d / "out.parquet")).provenance[-1]
    assert entry["argv"][0] == "dolm-collect-acts"
    assert not os.path.isabs(entry["model"]["path"]) and not os.path.isabs(entry["model"]["spec"])
    assert os.path.samefile(entry["model"]["path"], model)  # relative to the working folder


# ------------------------------------------------------------------ one run per output


def test_two_runs_on_one_output_one_completes_the_other_refuses(kit, tmp_path):
    d, model = kit
    p = _prompts(tmp_path / "many.parquet", n=16)
    out, acts = tmp_path / "c.parquet", tmp_path / "c.h5"
    args = ["dolm-collect-acts", p, "--model", model, "-o", out, "--batch-size", "1",
            "--acts", acts, "--sites", "resid_post.*"]
    procs = [subprocess.Popen(list(map(str, args)), env=_env(), stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    res = [(q.wait(), q.stderr.read()) for q in procs]
    assert sorted(c for c, _ in res) == [0, 3], res
    loser = next(e for c, e in res if c == 3)
    assert ("another run is writing" in loser and "pid" in loser) or "file exists" in loser
    assert str(out) in loser or str(acts) in loser, loser
    v = _validate(out, acts)
    assert v.returncode == 0, v.stderr
    assert _leftovers(tmp_path, {"many.parquet", out.name, acts.name}) == []


def test_lock_names_the_holder(tmp_path):
    from dolm.errors import InputError
    from dolm.formats import Run, output_locks

    target = tmp_path / "x.parquet"
    with output_locks([("--output", str(target))], Run("patch")):
        proc = subprocess.run(
            [sys.executable, "-c",
             "from dolm.formats import output_locks\n"
             f"with output_locks([('--output', {str(target)!r})]): pass"],
            capture_output=True, text=True)
        assert proc.returncode != 0 and "another run is writing" in proc.stderr
        assert "dolm-patch" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    with output_locks([("--output", str(target))]):  # released, and taken again
        pass
    assert not (tmp_path / ".x.parquet.lock").exists()
    with pytest.raises(InputError, match="cannot create the lock file"):
        with output_locks([("--output", str(tmp_path / "no" / "x"))]):
            pass


# ------------------------------------------------------------------ crashes


def _crash_module():
    spec = importlib.util.spec_from_file_location("crash_resume",
                                                  ROOT / "benchmarks" / "crash_resume.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kill_9_at_random_moments_resumes_or_restarts_cleanly(tiny_gpt2_dir, tmp_path):
    """Two trials of benchmarks/crash_resume.py (which runs 24+ by hand): gzip and
    uncompressed, a commit after every batch, killed at a random moment."""
    crash = _crash_module()
    rows = crash.run_trials(2, tmp_path, str(tiny_gpt2_dir), seed=int(time.time()) % 1000,
                            n_prompts=16)
    failed = [r for r in rows if r["outcome"] == "FAILED"]
    assert not failed, failed
    assert all(r["identical"] for r in rows), rows


def test_disk_full_is_a_named_error(kit, tmp_path):
    """--acts on a 2 MB tmpfs: a named error (exit 1), no segfault, nothing complete."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    d, model = kit
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount not permitted here: {r.stderr.strip()}")
    try:
        p = _prompts(tmp_path / "many.parquet", n=120)  # ~750 rows x 550 logits: 1.6 MB
        out, acts = mnt / "o.parquet", mnt / "a.h5"
        r = dolm("dolm-collect-acts", p, "--model", model, "-o", out, "--acts", acts,
                 "--sites", "logits,resid_post.*", "--positions", "all",
                 "--compression", "none", "--batch-size", "8")
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert "no space left on the device" in r.stderr and str(mnt) in r.stderr, r.stderr
        assert "--resume" in r.stderr and "Traceback" not in r.stderr
        assert not out.exists() and not acts.exists()
        # more room: --resume continues (or starts over, saying so) and completes
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        r = dolm("dolm-collect-acts", p, "--model", model, "-o", out, "--acts", acts,
                 "--sites", "logits,resid_post.*", "--positions", "all",
                 "--compression", "none", "--batch-size", "8", "--resume")
        assert r.returncode == 0, r.stderr
        assert _validate(out, acts).returncode == 0
        out.unlink()
        acts.unlink()
        subprocess.run(["mount", "-o", "remount,size=2m", str(mnt)], check=True)
        # psm's four outputs (24 + 9 + 18 + 11 kB) on a disk with 40 kB free: none of them
        free = shutil.disk_usage(mnt).free
        (mnt / "filler").write_bytes(b"\0" * (free - 40 * 1024))
        units = tmp_path / "u.csv"
        rng = np.random.default_rng(0)
        pd.DataFrame({"t": rng.integers(0, 2, 400), "x": rng.normal(size=400),
                      "y": rng.normal(size=400)}).to_csv(units, index=False)
        r = dolm("dolm-psm", units, "--treatment", "t", "--outcome", "y", "--covariates",
                 "x", "-o", mnt / "psm.json", "--force")
        assert r.returncode == 1 and "no space left" in r.stderr, r.stderr
        assert not [q.name for q in mnt.iterdir() if "psm" in q.name]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_run_refused_while_the_holder_writes_its_details_still_names_it(tmp_path):
    """The lock's holder writes its pid just after taking the lock; a run refused in that
    instant (an empty lock file) waits for the details instead of saying "another run"."""
    import fcntl
    import threading

    from dolm.errors import InputError
    from dolm.formats.lock import lock_path, output_locks

    out = tmp_path / "o.parquet"
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, details not yet written
    info = {"pid": 4242, "tool": "patch", "run": "r1", "started": "now"}
    late = threading.Timer(0.15, lambda: os.write(fd, json.dumps(info).encode()))
    late.start()
    try:
        with pytest.raises(InputError) as err, output_locks([("--output", str(out))]):
            pass
    finally:
        late.join()
        os.close(fd)
    assert "another run is writing" in str(err.value) and "pid 4242" in str(err.value)
