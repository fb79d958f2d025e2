"""Helpers of pipelines/circuit.just.

``same-length IN OUT --model M``: keep the prompts whose cf_prompt has the prompt's token
length (edge patching is position-wise). ``report DIR``: per task, Spearman rank
correlations of the edge scores between methods, the circuit's faithfulness, and the
smallest top-n (exact ranking) with faithfulness >= 0.8, as a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path


def same_length(src: str, dst: str, model: str) -> None:
    from dolm.formats import read_table, write_table
    from dolm.models import load

    df, _ = read_table(src, schema="prompts")
    lm = load(model)
    tok = lm.tokenizer
    keep = [len(tok(p, add_special_tokens=False)["input_ids"])
            == len(tok(c, add_special_tokens=False)["input_ids"])
            for p, c in zip(df["prompt"], df["cf_prompt"], strict=True)]
    out = df[keep].reset_index(drop=True)
    if len(out) == 0:
        sys.exit(f"{src}: no prompt has a counterfactual of its token length")
    write_table(out, dst, schema="prompts", run=None, force=True)
    print(f"{dst}: {len(out)} of {len(df)} prompts", file=sys.stderr)


def report(folder: str) -> None:
    import numpy as np
    from dolm.formats import read_table
    from scipy.stats import spearmanr

    lines = ["| task | prompts | clean metric | rho(eap, exact) | rho(eap-ig, exact) | "
             "rho(eap, eap-ig) | circuit edges | faithfulness | complement ratio | "
             "smallest n with faithfulness >= 0.8 | edges in graph |",
             "|" + "---|" * 11]
    for task in sorted(p.name for p in Path(folder).iterdir() if p.is_dir()):
        d = Path(folder) / task
        if not (d / "faithfulness.parquet").exists():
            continue
        sc, meta = {}, None
        for m in ("eap", "eap-ig", "exact"):
            e, meta_m = read_table(d / f"edges.{m}.parquet")
            e = e[e.prompt_id.isna()]
            sc[m] = e.set_index(["src", "dst", e.channel.fillna("-")])["score"]
            meta = meta_m if m == "exact" else meta
        rho = {(a, b): spearmanr(sc[a].abs(), sc[b].loc[sc[a].index].abs()).statistic
               for a, b in (("eap", "exact"), ("eap-ig", "exact"), ("eap", "eap-ig"))}
        f, _ = read_table(d / "faithfulness.parquet")
        circ = f[f.kind == "circuit"].iloc[0]
        curve = f[f.kind == "curve"].sort_values("n_edges")
        ok = curve[curve.faithfulness >= 0.8]
        small = int(ok.n_edges.iloc[0]) if len(ok) else None
        lines.append(
            f"| {task} | {meta.extra['n_prompts']} | {meta.extra['clean_metric']:.3f} | "
            f"{rho[('eap', 'exact')]:.3f} | {rho[('eap-ig', 'exact')]:.3f} | "
            f"{rho[('eap', 'eap-ig')]:.3f} | {int(circ.n_edges)} | {circ.faithfulness:.3f} | "
            f"{circ.complement_ratio:.3f} | {small if small is not None else 'none'} | "
            f"{len(sc['exact'])} |")
        curve_txt = ", ".join(f"{int(r.n_edges)}: {r.faithfulness:.2f}"
                              for r in curve.itertuples())
        lines.append(f"|  | curve (n: faithfulness) {curve_txt} |" + " |" * 9)
        _ = np
    print("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1] == "same-length":
        same_length(sys.argv[2], sys.argv[3], sys.argv[5] if len(sys.argv) > 5 else "toy")
    else:
        report(sys.argv[2])
