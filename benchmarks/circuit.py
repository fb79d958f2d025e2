"""Benchmark: edge scoring on a randomly initialised GPT-2-small-size model (CPU, fp32).

One run, one machine, side by side:

- the floor: one forward + backward pass of the HF model (loss at the read positions);
- EAP over every edge (~32k head-level edges: q/k/v counted separately): the clean pass
  with gradients, the corrupted pass, one backward, and the edge products;
- EAP-IG with ``--steps`` steps;
- exact edge patching of ``--exact-edges`` edges (the last layers' receivers first) with
  start-at-layer batching, against a naive loop of one full graph pass per edge;
- memory: the bytes per token of the senders' outputs (clean + corrupted) and of the
  receivers' input gradients that EAP holds.

Writes ``benchmarks/results/circuit.md`` (``--out``). Run: ``python benchmarks/circuit.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from patch import WORDS, build_model  # noqa: E402  (the same GPT-2-small-size model)


def timed(fn, reps: int = 1) -> float:
    """Best CPU seconds of this process over ``reps`` runs (the machine is shared: CPU
    time, not wall time; run with OMP_NUM_THREADS=1)."""
    best = float("inf")
    for _ in range(reps):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "circuit.md"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--exact-edges", type=int, default=96)
    args = ap.parse_args()
    import pandas as pd
    from dolm.circuits.scores import Scorer, prepare
    from dolm.models import load

    tmp = Path(tempfile.mkdtemp())
    build_model(tmp / "m")
    lm = load(str(tmp / "m"))
    words = WORDS[:16]
    cf = list(reversed(words))
    def text(ws):  # every word with its leading space: one token each
        return "".join(" " + w for w in ws)

    df = pd.DataFrame({"prompt_id": [f"p{i}" for i in range(args.batch)],
                       "prompt": [text(words[i:] + words[:i]) for i in range(args.batch)],
                       "cf_prompt": [text(cf[i:] + cf[:i]) for i in range(args.batch)],
                       "target": [" the"] * args.batch, "foil": [" a"] * args.batch})
    data = prepare(lm, df, "bench", "logit_diff", "cf")
    sc = Scorer(lm, data, "logit_diff", batch_size=args.batch)
    g = sc.g
    t_tok = int(data.lengths.max())

    def fwd_bwd():
        x = data.ids
        with torch.enable_grad():
            emb = lm.model.transformer.wte(x).detach().requires_grad_()
            out = lm.model(inputs_embeds=emb).logits
            rows = torch.arange(x.shape[0])
            out[rows, data.positions].sum().backward()

    t_fb = timed(fwd_bwd, 2)
    t_eap = timed(lambda: sc.attribution(1), 2)
    t_ig = timed(lambda: sc.attribution(args.steps), 1)
    k = args.exact_edges
    chosen = list(range(len(g.edges) - k, len(g.edges)))  # receivers of the last layers
    sc1 = Scorer(lm, data, "logit_diff", batch_size=1)
    t_exact = timed(lambda: sc1.exact(chosen[:k], rows_per_batch=32), 1)
    clean, corrupt = sc1.base(0, 1)
    ids, pos, _ = sc1._b(0, 1)

    def naive():
        for e in chosen[:k]:
            m = g.mask([e])[None]
            with torch.no_grad():
                sc1.runner.run(ids, pos, patch=corrupt.outs, mask=m)

    t_naive = timed(naive, 1)
    per_tok = 4 * lm.d_model * (2 * g.n_senders + g.n_receivers)
    rows = [
        ("model", f"GPT-2-small-size random ({lm.n_layers} layers x {lm.n_heads} heads, "
                  f"d={lm.d_model}, vocab {lm.d_vocab}), fp32, CPU"),
        ("graph", f"{g.n_senders} senders, {g.n_receivers} receivers, {len(g.edges)} edges"),
        ("batch", f"{args.batch} prompts x {t_tok} tokens"),
        ("one forward + backward (HF)", f"{t_fb:.2f} s CPU"),
        ("EAP, all edges", f"{t_eap:.2f} s = {t_eap / t_fb:.2f} x forward+backward"),
        (f"EAP-IG ({args.steps} steps), all edges", f"{t_ig:.2f} s = {t_ig / t_fb:.2f} x"),
        (f"exact, {k} edges x 1 prompt (start-at-layer batches)",
         f"{t_exact:.2f} s = {k / t_exact:.1f} edges/s"),
        (f"naive, {k} edges x 1 prompt (one full pass per edge)",
         f"{t_naive:.2f} s = {k / t_naive:.1f} edges/s ({t_naive / t_exact:.1f}x slower)"),
        ("memory held per token (clean + corrupt sender outputs, receiver gradients)",
         f"{per_tok / 2**20:.2f} MiB"),
    ]
    text = "# Circuit edge scoring benchmark\n\n" + \
        f"{platform.platform()}, torch {torch.__version__}, " \
        f"{torch.get_num_threads()} threads, CPU seconds of this process, load average " \
        f"{os.getloadavg()[0]:.1f} at the end\n\n| what | result |\n|---|---|\n" + \
        "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
