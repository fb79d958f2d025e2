"""Helpers of pipelines/circuit.just.

``same-length IN OUT --model M [--limit N]``: keep the (first N) prompts whose cf_prompt
has the prompt's token length (edge patching is position-wise). ``report DIR``: per task,
Spearman rank correlations of the edge scores between methods, the circuit's faithfulness, and the
smallest top-n (exact ranking) with faithfulness >= 0.8, as a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path


def same_length(src: str, dst: str, model: str, limit: int | None = None) -> None:
    from dolm.formats import read_table, write_table
    from dolm.models import load

    df, _ = read_table(src, schema="prompts")
    lm = load(model)
    tok = lm.tokenizer
    keep = [len(tok(p, add_special_tokens=False)["input_ids"])
            == len(tok(c, add_special_tokens=False)["input_ids"])
            for p, c in zip(df["prompt"], df["cf_prompt"], strict=True)]
    out = df[keep].reset_index(drop=True)
    if limit:
        out = out.head(limit)
    if len(out) == 0:
        sys.exit(f"{src}: no prompt has a counterfactual of its token length")
    write_table(out, dst, schema="prompts", run=None, force=True)
    print(f"{dst}: {len(out)} of {len(df)} prompts", file=sys.stderr)


def report(folder: str) -> None:
    from dolm.formats import read_table
    from dolm_tools.circuit.summary import METHODS, task_summary

    lines = ["| task | prompts | clean metric | rho(eap, exact) | rho(eap-ig, exact) | "
             "rho(eap, eap-ig) | circuit edges | faithfulness | complement ratio | "
             "smallest n with faithfulness >= 0.8 | edges in graph |",
             "|" + "---|" * 11]
    for task in sorted(p.name for p in Path(folder).iterdir() if p.is_dir()):
        d = Path(folder) / task
        if not (d / "faithfulness.parquet").exists():
            continue
        edges = {m: read_table(d / f"edges.{m}.parquet")[0] for m in METHODS}
        meta = read_table(d / "edges.exact.parquet")[1]
        s = task_summary(edges, read_table(d / "faithfulness.parquet")[0])
        rho, circ = s["rho"], s["circuit"]
        lines.append(
            f"| {task} | {meta.extra['n_prompts']} | {meta.extra['clean_metric']:.3f} | "
            f"{rho[('eap', 'exact')]:.3f} | {rho[('eap-ig', 'exact')]:.3f} | "
            f"{rho[('eap', 'eap-ig')]:.3f} | {int(circ['n_edges'])} | "
            f"{circ['faithfulness']:.3f} | {circ['complement_ratio']:.3f} | "
            f"{s['smallest'] if s['smallest'] is not None else 'none'} | "
            f"{s['n_edges_graph']} |")
        curve_txt = ", ".join(f"{n}: {f:.2f}" for n, f in s["curve"])
        lines.append(f"|  | curve (n: faithfulness) {curve_txt} |" + " |" * 9)
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    sl = sub.add_parser("same-length")
    sl.add_argument("src")
    sl.add_argument("dst")
    sl.add_argument("--model", default="toy")
    sl.add_argument("--limit", type=int, default=None)
    rp = sub.add_parser("report")
    rp.add_argument("folder")
    args = ap.parse_args()
    if args.cmd == "same-length":
        same_length(args.src, args.dst, args.model, args.limit)
    else:
        report(args.folder)
