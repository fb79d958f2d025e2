"""kill -9 at random moments, then --resume: does dolm-collect-acts always end with the
uninterrupted run's output (or start over cleanly)?

    python benchmarks/crash_resume.py [--trials 24] [--seed 0] \
        [--out benchmarks/results/crash_resume.md]

Each trial picks a compression (gzip, none) and a commit interval (DOLM_COMMIT_SECONDS 0,
0.05, 0.3, 2) in turn, starts a run of a tiny random GPT-2 over a small prompt set with
activations at every position (every commit rewrites the same HDF5 chunk: the case that
used to leave an unreadable partial), SIGKILLs it at a random moment of its scoring
phase, and runs ``--resume`` until it exits. The finished outcomes table and every
activation dataset are compared with one uninterrupted (gzip) run's, byte for byte once
decoded (the compression must not change the data). A trial counts as ``resumed`` when
the resume reused committed work, ``restarted`` when it started over (and said so),
``finished`` when the kill came after the run ended. ``tests/test_bad_inputs.py`` runs
a few trials of the same function.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOOL = "dolm-collect-acts"
WORDS = ("red blue green cat dog bird tree house car book apple water the king of the city "
         "was one two three four five").split()
INTERVALS = ("0", "0.05", "0.3", "2")
COMPRESSIONS = ("gzip", "none")


def write_prompts(path: Path, n: int, seed: int = 0) -> None:
    """A prompts table the tiny tokenizer reads: word salads with one-word targets, and
    columns to select and label by (n_x, posterior_b, flag)."""
    import pandas as pd
    from dolm.formats import write_table

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        rows.append({"prompt_id": f"p{i}", "family": "salad", "prompt": " ".join(words),
                     "target": " " + rng.choice(WORDS), "split": "eval",
                     "n_x": i % 3, "posterior_b": i / n, "flag": i % 2 == 0,
                     **dict.fromkeys(["foil", "choices", "cf_prompt", "cf_target", "cf_foil",
                                      "spans", "cf_spans", "group_id"])})
    write_table(pd.DataFrame(rows), path, schema="prompts", run=None, force=True)


def _env(interval: str | None = None) -> dict[str, str]:
    env = dict(os.environ, DOLM_PROGRESS="0", OMP_NUM_THREADS="1")
    if interval is not None:
        env["DOLM_COMMIT_SECONDS"] = interval
    return env


def _args(prompts: Path, model: str, out: Path, acts: Path, compression: str) -> list[str]:
    return [TOOL, str(prompts), "--model", model, "-o", str(out), "--acts", str(acts),
            "--sites", "resid_post.*,embed", "--positions", "all", "--batch-size", "2",
            "--compression", compression]


def same_output(a: tuple[Path, Path], b: tuple[Path, Path]) -> str | None:
    """None when two (outcomes, acts) pairs hold the same data byte for byte, else why."""
    import h5py
    import pyarrow.parquet as pq

    ta, tb = pq.read_table(a[0]), pq.read_table(b[0])
    if not ta.replace_schema_metadata(None).equals(tb.replace_schema_metadata(None)):
        return "outcomes tables differ"
    with h5py.File(a[1], "r") as fa, h5py.File(b[1], "r") as fb:
        if sorted(fa) != sorted(fb):
            return f"datasets differ: {sorted(fa)} vs {sorted(fb)}"
        for k in fa:
            x, y = fa[k][:], fb[k][:]
            if x.dtype != y.dtype or x.shape != y.shape:
                return f"dataset {k}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
            if x.dtype.kind == "O":
                if list(x) != list(y):
                    return f"dataset {k} differs"
            elif x.tobytes() != y.tobytes():
                return f"dataset {k} differs"
    return None


def reference(work: Path, prompts: Path, model: str, compression: str) -> tuple[Path, Path, float]:
    """An uninterrupted run; returns its outputs and the seconds its scoring took."""
    out, acts = work / f"ref-{compression}.parquet", work / f"ref-{compression}.h5"
    journal = Path(str(out) + ".partial")
    proc = subprocess.Popen(_args(prompts, model, out, acts, compression), env=_env("0"),
                            stderr=subprocess.PIPE, text=True)
    start = None
    while proc.poll() is None:
        if start is None and journal.exists():
            start = time.monotonic()
        time.sleep(0.002)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed: {proc.stderr.read()}")
    return out, acts, time.monotonic() - (start or time.monotonic())


def trial(work: Path, prompts: Path, model: str, compression: str, interval: str,
          scoring_s: float, ref: tuple[Path, Path], rng: random.Random, k: int) -> dict[str, Any]:
    """One kill -9 + resume; returns what happened and whether the output matched."""
    out, acts = work / f"t{k}.parquet", work / f"t{k}.h5"
    journal = Path(str(out) + ".partial")
    args = _args(prompts, model, out, acts, compression)
    proc = subprocess.Popen(args, env=_env(interval), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and not journal.exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        t0 = time.monotonic()
        delay = rng.uniform(0, scoring_s * 1.1)
        while proc.poll() is None and time.monotonic() - t0 < delay:
            time.sleep(0.001)
        finished = proc.poll() is not None
        ran = time.monotonic() - t0
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    row: dict[str, Any] = {"trial": k, "compression": compression, "commit_s": interval,
                           "kill_after_s": round(delay, 3), "ran_s": round(ran, 3)}
    looks_done = [p.name for p in (out, acts) if p.exists()]
    if finished or len(looks_done) == 2:
        row["outcome"] = "finished"
    else:
        if looks_done:
            row.update(outcome="FAILED", why=f"half-written: only {looks_done} exist")
            return row
        res = subprocess.run([*args, "--resume"], env=_env(interval), capture_output=True,
                             text=True)
        if res.returncode != 0:
            row.update(outcome="FAILED", why=f"resume exit {res.returncode}: "
                       f"{res.stderr.strip()[-300:]}")
            return row
        if "starting over" in res.stderr or "no partial run" in res.stderr:
            row["outcome"] = "restarted"
            row["why"] = res.stderr.strip().splitlines()[0][:200]
        else:
            row["outcome"] = "resumed"
    if Path(str(out) + ".partial").exists() or Path(str(acts) + ".partial").exists():
        row.update(outcome="FAILED", why="partial files left after the resume")
        return row
    diff = same_output((out, acts), ref)
    row["identical"] = diff is None
    if diff is not None:
        row.update(outcome="FAILED", why=diff)
    for p in (out, acts):
        p.unlink(missing_ok=True)
    return row


def run_trials(n: int, work: Path, model: str, seed: int = 0, n_prompts: int = 24) -> list[dict]:
    """``n`` kill -9 trials over every (compression, commit interval) in turn."""
    rng = random.Random(seed)
    prompts = work / "prompts.parquet"
    write_prompts(prompts, n_prompts, seed)
    # one uninterrupted run is the reference of every trial: the comparison reads the
    # decoded data, which the compression must not change
    ref = reference(work, prompts, model, COMPRESSIONS[0])
    refs = dict.fromkeys(COMPRESSIONS, ref)
    combos = [(c, i) for i in INTERVALS for c in COMPRESSIONS]
    rows = []
    for k in range(n):
        c, i = combos[k % len(combos)]
        out, acts, scoring = refs[c]
        rows.append(trial(work, prompts, model, c, i, scoring, (out, acts), rng, k))
        if rows[-1]["outcome"] == "finished":  # the machine got faster: aim the kills earlier
            refs[c] = (out, acts, min(scoring, rows[-1]["ran_s"]))
    return rows


def summarise(rows: list[dict]) -> dict[str, int]:
    keys = ("resumed", "restarted", "finished", "FAILED")
    out = {k: sum(r["outcome"] == k for r in rows) for k in keys}
    out["trials"] = len(rows)
    out["identical"] = sum(bool(r.get("identical")) for r in rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--out", default=None, help="write a markdown report here")
    a = ap.parse_args()
    from dolm.models.tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="dolm-crash-") as tmp:
        work = Path(tmp)
        model = str(build_tiny_model(work / "tiny", "gpt2"))
        t0 = time.monotonic()
        rows = run_trials(a.trials, work, model, a.seed, a.prompts)
        took = time.monotonic() - t0
    summary = summarise(rows)
    for r in rows:
        print(json.dumps(r), file=sys.stderr)
    print(json.dumps(summary))
    if a.out:
        lines = ["# kill -9 + --resume trials (benchmarks/crash_resume.py)", "",
                 f"{a.trials} trials, seed {a.seed}, {a.prompts} prompts, {took:.0f} s", "",
                 "| " + " | ".join(summary) + " |", "|" + "---|" * len(summary),
                 "| " + " | ".join(str(v) for v in summary.values()) + " |", "",
                 "| trial | compression | commit s | kill after s | outcome | identical | note |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['trial']} | {r['compression']} | {r['commit_s']} | "
                         f"{r['kill_after_s']} | {r['outcome']} | {r.get('identical', '')} | "
                         f"{r.get('why', '')} |")
        Path(a.out).write_text("\n".join(lines) + "\n")
    sys.exit(1 if summary["FAILED"] else 0)


if __name__ == "__main__":
    main()
