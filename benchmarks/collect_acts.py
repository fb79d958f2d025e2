"""Benchmark: dolm-collect-acts writing resid_post.* vs a bare Hugging Face forward loop.

One run, one machine, a randomly initialised GPT-2-small-size model (124M, CPU, fp32,
vocabulary 50257) saved to a temporary folder, prompts of ~32 tokens plus a one-token
target, batch size 8:

- HF loop: ``model(input_ids, attention_mask)`` over the same right-padded prompt +
  target sequences, full logits, ``torch.inference_mode`` (what a user writes by hand);
- HF loop, kept logits: the same with ``logits_to_keep`` set to the positions that are
  scored (what collect-acts asks the model for; shown so the comparison is fair);
- collect-acts in-process: ``dolm-collect-acts PROMPTS --sites 'resid_post.*'
  --acts FILE`` (all 12 layers, last position, float32, gzip) end to end: reading and
  checking the prompts, loading the model, scoring, writing and validating both files;
- collect-acts as an executable at two prompt counts: peak RSS (memory must not grow
  with the number of prompts) and wall time (start-up included; not a throughput).

Each in-process timing is the best of ``--reps``. Writes ``benchmarks/results/
collect_acts.md`` (``--out``). Run: ``python benchmarks/collect_acts.py`` (a few minutes).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# words the tiny tokenizer keeps as one token each (with their leading space)
WORDS = "the capital of France is a city on the river and the tower is red".split()


def build_model(folder: Path, seed: int = 0) -> None:
    from dolm.models.tiny import build_tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = build_tiny_tokenizer("gpt", model_max_length=1024)
    cfg = GPT2Config(
        n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)


def write_prompts(path: Path, n: int, n_words: int, seed: int = 0) -> None:
    import pandas as pd

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = n_words + rng.randint(-3, 3)  # some padding inside each batch
        words = [rng.choice(WORDS) for _ in range(k)]
        words[0] = words[0].capitalize()
        rows.append(
            {
                "prompt_id": f"b{i}", "family": "bench", "prompt": " ".join(words),
                "target": " the", "foil": None, "choices": None, "cf_prompt": None,
                "cf_target": None, "cf_foil": None, "spans": None, "cf_spans": None,
                "group_id": None, "split": "eval",
            }
        )  # fmt: skip
    pd.DataFrame(rows).to_parquet(path)


def hf_loop(model, tok, texts: list[str], batch_size: int, keep: bool) -> float:
    """Seconds for right-padded batched forwards over ``texts`` (prompt + target)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(texts), batch_size):
            enc = tok(texts[lo : lo + batch_size], return_tensors="pt", padding=True)
            kw = {}
            if keep:
                n = enc["attention_mask"].sum(1)
                kw["logits_to_keep"] = torch.unique(n - 2)  # last prompt token
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    return time.perf_counter() - t0


def ours_inprocess(args: list[str]) -> float:
    from dolm_tools.collect_acts.cli import main as cli

    t0 = time.perf_counter()
    try:
        cli.main(args=args, prog_name="dolm-collect-acts")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise RuntimeError(f"dolm-collect-acts exited {exc.code}") from None
    return time.perf_counter() - t0


_RSS = (
    "import resource, subprocess, sys, time\n"
    "t0 = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "dt = time.perf_counter() - t0\n"
    "print(rc, dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def ours_subprocess(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one dolm-collect-acts process."""
    env = dict(os.environ, DOLM_PROGRESS="0")
    out = subprocess.run(
        [sys.executable, "-c", _RSS, "dolm-collect-acts", *args],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    rc, dt, rss_kb = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"dolm-collect-acts exited {rc}:\n{out.stderr}")
    return float(dt), int(rss_kb) / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "collect_acts.md"))
    ap.add_argument("--n-small", type=int, default=32, help="prompts, small run")
    ap.add_argument("--n-large", type=int, default=128, help="prompts, large run (timed)")
    ap.add_argument("--words", type=int, default=31, help="words (= tokens) per prompt")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="in-process repetitions (best kept)")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    load0 = os.getloadavg()[0]
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DOLM_PROGRESS", "0")
    with tempfile.TemporaryDirectory(prefix="dolm-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "gpt2-small-random"
        build_model(model_dir)
        small, large = tmp / "small.parquet", tmp / "large.parquet"
        write_prompts(small, args.n_small, args.words, seed=1)
        write_prompts(large, args.n_large, args.words, seed=2)

        import pandas as pd

        df = pd.read_parquet(large)
        texts = [p + t for p, t in zip(df["prompt"], df["target"], strict=True)]
        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.padding_side = "right"
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        n_tokens = int(sum(len(tok(t)["input_ids"]) for t in texts))

        def ours_args(prompts: Path, tag: str) -> list[str]:
            return [
                str(prompts), "--model", str(model_dir), "--batch-size", str(args.batch_size),
                "--sites", "resid_post.*", "-o", str(tmp / f"{tag}.parquet"),
                "--acts", str(tmp / f"{tag}.h5"), "--force",
            ]  # fmt: skip

        hf_loop(model, tok, texts[: args.batch_size], args.batch_size, keep=False)  # warm-up
        t_hf, t_keep, t_ours = [], [], []
        for _ in range(args.reps):  # interleaved, so drift on a shared machine hits all
            t_hf.append(hf_loop(model, tok, texts, args.batch_size, keep=False))
            t_keep.append(hf_loop(model, tok, texts, args.batch_size, keep=True))
            t_ours.append(ours_inprocess(ours_args(large, "inproc")))
        del model

        wall_s, rss_s = ours_subprocess(ours_args(small, "out-small"))
        wall_l, rss_l = ours_subprocess(ours_args(large, "out-large"))
        size_l = os.path.getsize(tmp / "out-large.h5") / 2**20

    best_hf, best_keep, best_ours = min(t_hf), min(t_keep), min(t_ours)
    n = args.n_large
    lines = [
        "# dolm-collect-acts vs a bare Hugging Face forward loop",
        "",
        f"Random GPT-2-small-size model (124M, vocabulary 50257), CPU fp32, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"load average {load0:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
        "(the machine is shared). "
        f"{n} prompts, {n_tokens} tokens (prompt + one-token target, ~{args.words + 1} each), "
        f"batch size {args.batch_size}. collect-acts stores `resid_post.*` (12 layers) at the "
        "last position, float32, gzip, and writes the outcomes table. In-process times are "
        f"the best of {args.reps}, interleaved. Command: `python benchmarks/collect_acts.py`.",
        "",
        "| run | seconds | prompts/s | ratio (HF loop / run) |",
        "| --- | ---: | ---: | ---: |",
        f"| HF loop, full logits | {best_hf:.2f} | {n / best_hf:.1f} | 1.00 |",
        f"| HF loop, logits only where scored | {best_keep:.2f} | {n / best_keep:.1f} | "
        f"{best_hf / best_keep:.2f} |",
        f"| collect-acts in-process, end to end (incl. model load, checks, writes) | "
        f"{best_ours:.2f} | {n / best_ours:.1f} | **{best_hf / best_ours:.2f}** |",
        f"| collect-acts vs the kept-logits loop | | | {best_keep / best_ours:.2f} |",
        "",
        "| executable | prompts | wall s (incl. start-up) | peak RSS MiB |",
        "| --- | ---: | ---: | ---: |",
        f"| dolm-collect-acts | {args.n_small} | {wall_s:.1f} | {rss_s:.0f} |",
        f"| dolm-collect-acts | {args.n_large} | {wall_l:.1f} | {rss_l:.0f} |",
        "",
        f"Peak memory grows {rss_l - rss_s:+.0f} MiB from {args.n_small} to {args.n_large} "
        f"prompts ({(rss_l / rss_s - 1) * 100:+.1f}%): activations are written batch by batch. "
        f"Activations file at {args.n_large} prompts: {size_l:.1f} MiB.",
        "",
        "Targets (issue #2): ratio >= 0.85; memory flat in the number of prompts.",
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
