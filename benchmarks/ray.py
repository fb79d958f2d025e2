"""The Ray executor on this machine: 2 workers vs 1, and Ray (1 worker) vs in-process.

    python benchmarks/ray.py [--prompts 48] [--words 60] [--out benchmarks/results/ray.md]

A random GPT-2-small-size model (12 layers, d_model 768, 12 heads; the tiny test
tokenizer, so the vocabulary is ~550 rather than 50k) scores word-salad prompts of
``--words`` tokens with ``dolm-collect-acts`` (outcomes + resid_post.* at the last
position), one torch thread per worker, three ways side by side:

- in-process (``OMP_NUM_THREADS=1``),
- ``--executor ray --shards 4`` on a local cluster of 1 CPU (1 worker),
- the same on a local cluster of 2 CPUs (2 workers).

Wall times are end to end (process start, imports, model load, shards, merge). The
outputs of the three runs are compared (they must be equal). A last run writes every
position of every layer to measure the merge cost per GB (from the driver's log line).
The machine's load average is recorded beside the numbers: on a shared machine they are
what they are.
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


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--words", type=int, default=60)
    ap.add_argument("--batch-size", default="4")
    ap.add_argument("--out", default="benchmarks/results/ray.md")
    a = ap.parse_args()
    from dolm.models.tiny import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="dolm-ray-bench-"))
    model = str(build_tiny_model(tmp / "gpt2-small", "gpt2", n_layers=12, d_model=768,
                                 n_heads=12, n_ctx=128))
    prompts = tmp / "prompts.parquet"
    write_prompts(prompts, a.prompts, a.words)
    base = ["dolm-collect-acts", str(prompts), "--model", model, "--batch-size", a.batch_size,
            "--sites", "resid_post.*"]
    ray_args = ["--executor", "ray", "--shards", "4"]
    rows = []
    loads = [load()]
    t_in, _ = timed([*base, "-o", str(tmp / "in.parquet"), "--acts", str(tmp / "in.h5")])
    loads.append(load())
    t_r1, _ = on_cluster(1, [*base, "-o", str(tmp / "r1.parquet"), "--acts", str(tmp / "r1.h5"),
                             *ray_args])
    loads.append(load())
    t_r2, _ = on_cluster(2, [*base, "-o", str(tmp / "r2.parquet"), "--acts", str(tmp / "r2.h5"),
                             *ray_args])
    loads.append(load())
    equal = same(tmp / "in.parquet", tmp / "r1.parquet") and same(tmp / "in.parquet",
                                                                   tmp / "r2.parquet")
    # merge cost: every position of every layer, merged by the driver
    _, err = on_cluster(2, ["dolm-collect-acts", str(prompts), "--model", model, "--batch-size",
                            a.batch_size, "--sites", "resid_post.*,resid_mid.*", "--positions",
                            "all", "--compression", "none", "-o", str(tmp / "m.parquet"),
                            "--acts", str(tmp / "m.h5"), *ray_args])
    loads.append(load())
    m = re.search(r"merged \d+ shards \(([\d.]+) MB\) in ([\d.]+) s", err)
    mb, ms = (float(m.group(1)), float(m.group(2))) if m else (float("nan"), float("nan"))
    rows = [
        ("in-process, 1 thread", t_in, "1.00"),
        ("ray, 1 worker (1 CPU), 4 shards", t_r1, f"{t_r1 / t_in:.2f}"),
        ("ray, 2 workers (2 CPUs), 4 shards", t_r2, f"{t_r2 / t_in:.2f}"),
    ]
    lines = [
        f"# Ray executor: {a.prompts} prompts x {a.words} tokens, random GPT-2-small-size "
        "model (12 x 768), collect-acts outcomes + resid_post.* (last position)",
        "",
        f"- machine: {os.cpu_count()} CPUs; load average (1/5/15 min) before/between runs: "
        + " | ".join(loads),
        f"- outputs equal to the in-process run: {equal}",
        "",
        "| run | wall s | vs in-process |",
        "| --- | ---: | ---: |",
        *[f"| {n} | {t:.1f} | {r} |" for n, t, r in rows],
        "",
        f"- 2 workers vs 1 worker: speed-up {t_r1 / t_r2:.2f}x (target >= 1.7x)",
        f"- Ray 1 worker vs in-process: overhead {100 * (t_r1 / t_in - 1):+.0f}% "
        "(target <= 10%, model load included)",
        f"- merge (driver, HDF5 uncompressed, resid_post+resid_mid at all positions): "
        f"{mb:.0f} MB in {ms:.2f} s = {ms / (mb / 1024) if mb == mb and mb else float('nan'):.1f}"
        " s/GB",
    ]
    text = "\n".join(lines) + "\n"
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
