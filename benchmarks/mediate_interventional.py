"""dolm-mediate interventional: CPU seconds of the patched runs (``run_pairs``) and the
layer-passes they need, on the toy model and the chain-of-thought study's shape.

    python benchmarks/mediate_interventional.py [--n 40] [--sites head.*.*]

Data: ``dolm.tasks`` arith problems, each direct (control) and with a teacher-forced chain
of thought (treated), paired by ``group_id``; mediators ``--sites`` at the last prompt
token (``--anchor prompt``), as in ``pipelines/cot_mediation.just``. Prints CPU and wall
seconds of ``run_pairs`` (one thread, median of ``--reps``) and the block-passes: every
patched run from layer 0 (a full forward) against starting each at its site's layer. Run
it once with this tree and once with an older one on ``PYTHONPATH`` to compare.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="problems (pairs)")
    ap.add_argument("--sites", default="head.*.*", help="mediator sites (a pattern)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch-size", default="16")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from dolm.models import load
    from dolm.tasks import generate
    from dolm_tools.mediate import interventional as iv

    lm = load("toy", dtype="float32", device="cpu")
    df = generate("arith", n=args.n, cot="both", steps=[1, 2, 3], seed=0)
    pairs, _ = iv.make_pairs(df, treatment="cot", pair_by="group_id", control_value=None,
                             treat_value=None, text_column="text")
    prep = iv.prepare(lm, pairs, "last", anchor="prompt")
    sites = lm.expand_sites(args.sites)
    cpus, walls = [], []
    res = None
    for _ in range(args.reps):
        c0, t0 = time.process_time(), time.perf_counter()
        res = iv.run_pairs(lm, prep, sites, args.batch_size)
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - t0)
    layers = [lm.parse_site(s).layer for s in sites]
    full = 2 * len(pairs) * len(sites) * lm.n_layers
    needed = 2 * len(pairs) * sum(lm.n_layers - lyr for lyr in layers)
    checksum = float(abs(res["CM1"][..., 0]).sum() + abs(res["TM0"][..., 0]).sum())
    print(f"pairs {len(pairs)}, sites {len(sites)} ({args.sites}), layers {lm.n_layers}, "
          f"torch threads 1")
    print(f"run_pairs: CPU {statistics.median(cpus):.2f} s, wall {statistics.median(walls):.2f} s "
          f"(median of {args.reps})")
    print(f"patched block-passes: {full} from layer 0, {needed} from each site's layer")
    print(f"checksum (sum |CM1| + |TM0|, target_logprob): {checksum:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
