"""The Ray executor on this machine: 2 workers vs 1, and Ray (1 worker) vs in-process.

    python benchmarks/ray.py            # on an idle 2-core machine: about 6 minutes
    python benchmarks/ray.py --smoke    # a tiny model, 16 prompts: checks that it runs

A random GPT-2-small-size model (12 layers, d_model 768, 12 heads; the tiny test
tokenizer, so the vocabulary is ~550 rather than 50k) scores word-salad prompts of
``--words`` tokens with ``dolm-collect-acts`` (outcomes + resid_post.* at the last
position), one torch thread per worker (``OMP_NUM_THREADS=1`` for the driver, the
in-process run and every Ray worker), three ways side by side:

- in-process,
- ``--executor ray --shards 4`` on a local cluster of 1 CPU (1 worker),
- the same on a local cluster of 2 CPUs (2 workers).

Wall times are end to end (process start, imports, model load, shards, merge); each
local cluster is started before its run and not timed (a cluster is already up when a
user runs dolm on it). ``--prompts`` sizes the work so that compute, not the fixed
start-up costs, dominates (the 1.7x target needs that): 400 prompts is ~100 CPU-seconds
of forward passes. With ``--reps R`` the three runs are repeated, interleaved, and the
fastest of each is kept. The three outputs are compared (they must be equal). A last
run writes every position of resid_post and resid_mid for ``--merge-prompts`` prompts to
measure the merge cost per GB (from the driver's log line). The load average before
every run is recorded beside the numbers: above 0.5 the machine was not idle and the
result says so.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# this file is named ray.py: keep its folder off the path so `import ray` finds Ray
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

WORDS = ("red blue green cat dog bird tree house car book apple water the king of the city "
         "was one two three four five").split()


def write_prompts(path: Path, n: int, words: int, seed: int = 0) -> None:
    import pandas as pd
    from dolm.formats import write_table

    rng = random.Random(seed)
    rows = [{"prompt_id": f"p{i}", "family": "salad",
             "prompt": " ".join(rng.choice(WORDS) for _ in range(words)),
             "target": " " + rng.choice(WORDS), "split": "eval",
             **dict.fromkeys(["foil", "choices", "cf_prompt", "cf_target", "cf_foil", "spans",
                              "cf_spans", "group_id"])} for i in range(n)]
    write_table(pd.DataFrame(rows), path, schema="prompts", run=None, force=True)


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", DOLM_PROGRESS="0", RAY_AUTH_MODE="disabled",
                RAY_USAGE_STATS_ENABLED="0", HF_HUB_DISABLE_PROGRESS_BARS="1")


def timed(argv: list[str]) -> tuple[float, str]:
    t0 = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, env=env())
    dt = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{r.stderr}")
    return dt, r.stderr


def on_cluster(cpus: int, argv: list[str]) -> tuple[float, str]:
    """Run ``argv`` + --ray-address on a fresh local cluster of ``cpus`` CPUs."""
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    info = ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                    configure_logging=False)
    try:
        return timed([*argv, "--ray-address", info.address_info["gcs_address"]])
    finally:
        ray.shutdown()


def same(a: Path, b: Path) -> bool:
    import pyarrow.parquet as pq

    return pq.read_table(a).replace_schema_metadata(None).equals(
        pq.read_table(b).replace_schema_metadata(None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=400)
    ap.add_argument("--words", type=int, default=60)
    ap.add_argument("--batch-size", default="4")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--merge-prompts", type=int, default=48)
    ap.add_argument("--smoke", action="store_true",
                    help="a 2-layer d_model-64 model and 16 prompts: checks that it runs")
    ap.add_argument("--out", default=None,
                    help="results file [default: benchmarks/results/ray.md; --smoke: none]")
    a = ap.parse_args()
    os.environ.update(env())  # the local clusters' workers inherit one thread each
    from dolm.models.tiny import build_tiny_model

    size = dict(n_layers=2, d_model=64, n_heads=4) if a.smoke else dict(
        n_layers=12, d_model=768, n_heads=12)
    if a.smoke:  # 4 prompts a shard: one batch of 4, as in one process (equal outputs)
        a.prompts, a.merge_prompts = 16, 16
    out = a.out or (None if a.smoke else "benchmarks/results/ray.md")
    tmp = Path(tempfile.mkdtemp(prefix="dolm-ray-bench-"))
    model = str(build_tiny_model(tmp / "model", "gpt2", n_ctx=128, **size))
    prompts, few = tmp / "prompts.parquet", tmp / "few.parquet"
    write_prompts(prompts, a.prompts, a.words)
    write_prompts(few, a.merge_prompts, a.words)
    base = ["dolm-collect-acts", str(prompts), "--model", model, "--batch-size", a.batch_size,
            "--sites", "resid_post.*", "--force"]
    ray_args = ["--executor", "ray", "--shards", "4"]
    runs = {"in": (0, []), "r1": (1, ray_args), "r2": (2, ray_args)}
    best = dict.fromkeys(runs, float("inf"))
    loads = []
    for _ in range(a.reps):
        for name, (cpus, extra) in runs.items():
            loads.append(os.getloadavg()[0])
            argv = [*base, "-o", str(tmp / f"{name}.parquet"), "--acts",
                    str(tmp / f"{name}.h5"), *extra]
            t, _ = on_cluster(cpus, argv) if cpus else timed(argv)
            best[name] = min(best[name], t)
            print(f"{name}: {t:.1f} s (load {loads[-1]:.2f})", flush=True)
    t_in, t_r1, t_r2 = best["in"], best["r1"], best["r2"]
    equal = same(tmp / "in.parquet", tmp / "r1.parquet") and same(tmp / "in.parquet",
                                                                   tmp / "r2.parquet")
    # merge cost: every position of two sites per layer, merged by the driver
    loads.append(os.getloadavg()[0])
    _, err = on_cluster(2, ["dolm-collect-acts", str(few), "--model", model, "--batch-size",
                            a.batch_size, "--sites", "resid_post.*,resid_mid.*", "--positions",
                            "all", "--compression", "none", "-o", str(tmp / "m.parquet"),
                            "--acts", str(tmp / "m.h5"), *ray_args])
    m = re.search(r"merged \d+ shards \(([\d.]+) MB\) in ([\d.]+) s", err)
    mb, ms = (float(m.group(1)), float(m.group(2))) if m else (float("nan"), float("nan"))
    idle = max(loads) <= 0.5
    rows = [
        ("in-process, 1 thread", t_in, "1.00"),
        ("ray, 1 worker (1 CPU), 4 shards", t_r1, f"{t_r1 / t_in:.2f}"),
        ("ray, 2 workers (2 CPUs), 4 shards", t_r2, f"{t_r2 / t_in:.2f}"),
    ]
    shape = (f"{size['n_layers']} x {size['d_model']}" + (" (--smoke)" if a.smoke else ""))
    lines = [
        f"# Ray executor: {a.prompts} prompts x {a.words} tokens, random GPT-2-size model "
        f"({shape}), collect-acts outcomes + resid_post.* (last position)",
        "",
        f"- machine: {os.cpu_count()} CPUs; 1-min load average before each run: "
        + ", ".join(f"{x:.2f}" for x in loads)
        + ("" if idle else " — NOT IDLE: the speed numbers below are not valid for the "
           "targets"),
        f"- fastest of {a.reps} interleaved repetition(s); outputs equal to the in-process "
        f"run (4 shards of whole batches: --prompts a multiple of 4 x --batch-size): {equal}",
        "",
        "| run | wall s | vs in-process |",
        "| --- | ---: | ---: |",
        *[f"| {n} | {t:.1f} | {r} |" for n, t, r in rows],
        "",
        f"- 2 workers vs 1 worker: speed-up {t_r1 / t_r2:.2f}x (target >= 1.7x)",
        f"- Ray 1 worker vs in-process: overhead {100 * (t_r1 / t_in - 1):+.0f}% "
        "(target <= 10%, model load included)",
        f"- merge (driver, HDF5 uncompressed, resid_post+resid_mid at all positions, "
        f"{a.merge_prompts} prompts): {mb:.0f} MB in {ms:.2f} s = "
        f"{ms / (mb / 1024) if mb == mb and mb else float('nan'):.1f} s/GB",
    ]
    text = "\n".join(lines) + "\n"
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    print(text)
    if not equal:
        sys.exit("the Ray outputs differ from the in-process output")


if __name__ == "__main__":
    main()
