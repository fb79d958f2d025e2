"""The model card (models/toy/README.md): measure with dolm's own tools, then write.

``measure`` runs, for every evaluation set of :data:`~dolm_tools.toy.evaluate.EVAL_SETS`::

    dolm-gen-prompts FAMILY --split eval --seed 0 [options] -o SET.prompts.parquet
    dolm-collect-acts SET.prompts.parquet --model MODEL -o SET.outcomes.parquet [--generate N]

(for dilemma, the counterfactual prompts are appended as prompts of their own first),
and computes the card's numbers from the two tables. ``write_card`` rewrites the
README from the training summary (``training_config.json``) and the metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .evaluate import EVAL_SEED, EVAL_SETS, check_targets, compute_metrics, swapped

TOOLS_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TRANSFORMERS_OFFLINE": "1"}


def _exe(name: str) -> str:
    cand = Path(sys.executable).with_name(name)
    return str(cand) if cand.exists() else name


def gen_prompts_argv(name: str, out: Path) -> list[str]:
    fam, opts, _ = EVAL_SETS[name]
    argv = [_exe("dolm-gen-prompts"), fam, "--split", "eval", "--seed", str(EVAL_SEED)]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, list):
            argv += [flag, ",".join(map(str, v))]
        else:
            argv += [flag, str(v)]
    return argv + ["-o", str(out), "--force"]


def collect_argv(name: str, prompts: Path, model: Path, out: Path, device: str) -> list[str]:
    argv = [_exe("dolm-collect-acts"), str(prompts), "--model", str(model), "-o", str(out),
            "--device", device, "--force"]
    gen = EVAL_SETS[name][2]
    if gen:
        argv += ["--generate", str(gen)]
    return argv


def _run(argv: list[str]) -> None:
    env = {**os.environ, **TOOLS_ENV}
    print("dolm-toy: $ " + " ".join(argv), file=sys.stderr, flush=True)
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(argv[0]).name} failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")


def measure(model_dir: Path, workdir: str | Path | None = None, quick: bool = False,
            device: str = "cpu", sets: list[str] | None = None) -> dict[str, Any]:
    """The card's metrics for the model in ``model_dir``."""
    import pandas as pd

    sets = sets or list(EVAL_SETS)
    if quick:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .evaluate import eval_tables, quick_outcomes

        model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        tables = eval_tables(sets)
        outs = {n: quick_outcomes(model, tok, df, device=device, generate=EVAL_SETS[n][2])
                for n, df in tables.items()}
        metrics = compute_metrics(tables, outs)
        metrics["_meta"] = {"scorer": "in-process (dolm-toy eval --quick)"}
        return metrics

    from dolm.formats import read_table, write_table

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="dolm-toy-card-")
        workdir = tmp.name
    wd = Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    commands = []
    tables, outs = {}, {}
    try:
        for name in sets:
            p = wd / f"{name}.prompts.parquet"
            o = wd / f"{name}.outcomes.parquet"
            argv = gen_prompts_argv(name, p)
            _run(argv)
            commands.append(_display(argv, model_dir))
            df, meta = read_table(str(p))
            if name == "dilemma":
                # score the options-swapped prompts as prompts of their own
                both = pd.concat([df, swapped(df)], ignore_index=True)
                p = wd / f"{name}.with_cf.prompts.parquet"
                write_table(both, str(p), schema="prompts", run=None, force=True)
                df = both
                commands.append("# + the cf_prompt/cf_target columns as rows of their own "
                                f"-> {p.name}")
            argv = collect_argv(name, p, model_dir, o, device)
            _run(argv)
            commands.append(_display(argv, model_dir))
            od, _ = read_table(str(o))
            tables[name], outs[name] = df, od
        metrics = compute_metrics(tables, outs)
    finally:
        if tmp is not None:
            tmp.cleanup()
    metrics["_meta"] = {"scorer": "dolm-gen-prompts -> dolm-collect-acts",
                        "commands": commands}
    return metrics


def _display(argv: list[str], model_dir: Path) -> str:
    out = []
    for a in argv:
        if a == str(model_dir):
            a = "toy"
        elif "/" in a and (a.endswith(".parquet")):
            a = Path(a).name
        elif a.endswith(("dolm-gen-prompts", "dolm-collect-acts")):
            a = Path(a).name
        out.append(a)
    return " ".join(out)


# ------------------------------------------------------------------ the card

BEGIN = "<!-- BEGIN METRICS (written by `dolm-toy card`; do not edit by hand) -->"
END = "<!-- END METRICS -->"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def metrics_markdown(m: dict[str, Any]) -> str:
    ok = check_targets(m)
    mark = {True: "met", False: "**not met**"}
    lines = [BEGIN, "", "## Measured on held-out prompts", ""]
    meta = m.get("_meta", {})
    lines.append(f"Scorer: {meta.get('scorer', '?')}. Every prompt comes from the families' "
                 "`--split eval`, which shares no item with the training corpus.")
    lines += ["", "| metric | value | target | |", "| --- | --- | --- | --- |"]
    f, b, a, d = m.get("factual"), m.get("bayes"), m.get("arith"), m.get("dilemma")
    if f:
        lines.append(f"| factual: top-1 recall, held-out phrasings ({f['n']} prompts) | "
                     f"{f['top1']:.3f} | ≥ 0.95 | {mark[ok['factual.top1']]} |")
    if b:
        lines.append(f"| bayes: mean \\|P_model(X) − P_Bayes(X)\\|, n_X = 0..10 "
                     f"({b['n']} prompts) | {b['mean_abs_error']:.4f} | ≤ 0.05 | "
                     f"{mark[ok['bayes.mean_abs_error']]} |")
        lines.append(f"| bayes: order drift (max − min over permutations), mean / max over "
                     f"n_X | {b['order_drift_mean']:.4f} / {b['order_drift_max']:.4f} | "
                     "reported | |")
    if a:
        lines.append(f"| arith: exact match, 3 steps, chain-of-thought | "
                     f"{a['cot_exact_match']:.3f} | | |")
        lines.append(f"| arith: exact match, 3 steps, direct | {a['direct_exact_match']:.3f} | "
                     "| |")
        lines.append(f"| arith: CoT − direct | {a['cot_minus_direct']:+.3f} | ≥ +0.10 | "
                     f"{mark[ok['arith.cot_minus_direct']]} |")
    if d:
        lines.append(f"| dilemma: picks the intended option, base ({d['n']} prompts) | "
                     f"{d['base_intended']:.3f} | ≥ 0.9 | {mark[ok['dilemma.base_intended']]} |")
        lines.append(f"| dilemma: switches with the options swap | {d['switch_rate']:.3f} | "
                     f"≥ 0.9 | {mark[ok['dilemma.switch_rate']]} |")
        lines.append(f"| dilemma: picks the intended option, swapped | {d['cf_intended']:.3f} "
                     "| | |")
    fm = m.get("formats")
    if fm:
        bf = fm["by_format"]
        lines.append(f"| formats: accuracy direct / polite / few-shot ({fm['units']} units x 3) "
                     f"| {bf.get('direct', 0):.3f} / {bf.get('polite', 0):.3f} / "
                     f"{bf.get('fewshot', 0):.3f} | not all equal | "
                     f"{mark[ok['formats.formats_differ']]} |")
    if fm:
        lines += ["", "### formats: accuracy per task type and format (experiment design)", ""]
        fmts = ["direct", "polite", "fewshot"]
        lines += ["| task type | " + " | ".join(fmts) + " |",
                  "| --- | " + " | ".join("---" for _ in fmts) + " |"]
        for t, row in fm["by_task_format"].items():
            lines.append(f"| {t} | " + " | ".join(f"{row.get(x, float('nan')):.3f}"
                                                  for x in fmts) + " |")
        lines.append("| **all** | " + " | ".join(f"{fm['by_format'][x]:.3f}" for x in fmts)
                     + " |")
        lines += ["", "By difficulty:", "",
                  "| difficulty | " + " | ".join(fmts) + " |",
                  "| --- | " + " | ".join("---" for _ in fmts) + " |"]
        for dd, row in fm["by_difficulty_format"].items():
            lines.append(f"| {dd} | " + " | ".join(f"{row.get(x, float('nan')):.3f}"
                                                   for x in fmts) + " |")
        e = fm["effects"]
        lines += ["", "True per-format effect (every unit is observed in every format, so "
                  "these are the average treatment effects on accuracy that an observational "
                  "analysis such as `dolm-psm` should recover): "
                  f"polite − direct = {e['polite_minus_direct']:+.3f}, "
                  f"few-shot − direct = {e['fewshot_minus_direct']:+.3f}."]
    if b:
        lines += ["", "### bayes: evidence sweep (10 draws, base template)", "",
                  "| n_X | P_Bayes(X) | mean P_model(X) | mean \\|error\\| | order drift | "
                  "permutations |", "| --- | --- | --- | --- | --- | --- |"]
        for k, r in b["by_n_x"].items():
            lines.append(f"| {k} | {r['p_bayes']:.4f} | {r['p_model_mean']:.4f} | "
                         f"{r['mean_abs_error']:.4f} | {r['order_drift']:.4f} | "
                         f"{r['permutations']} |")
    bc = m.get("bayes_controls")
    if bc:
        lines += ["", "Control conditions (mean \\|error\\| against each template's own truth; "
                  "`independent`: P(X) = 0.625 whatever the draws):", "",
                  "| template \\| distractors \\| symbols | mean \\|error\\| | order drift |",
                  "| --- | --- | --- |"]
        for k, r in bc["conditions"].items():
            lines.append(f"| {k.replace('|', ' / ')} | {r['mean_abs_error']:.4f} | "
                         f"{r['order_drift_mean']:.4f} |")
    if f:
        lines += ["", "Factual top-1 by relation: " + ", ".join(
            f"{k} {v:.3f}" for k, v in f["by_relation"].items()) + "."]
    cmds = meta.get("commands")
    if cmds:
        lines += ["", "Commands (`dolm-toy card` runs them in a temporary folder):", "",
                  "```"] + cmds + ["```"]
    lines += ["", END]
    return "\n".join(lines)


def write_card(model_dir: Path, metrics: dict[str, Any]) -> None:
    """Rewrite ``model_dir/README.md``: header from ``training_config.json``, metrics."""
    model_dir = Path(model_dir)
    summary = json.loads((model_dir / "training_config.json").read_text())
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    text = header_markdown(summary) + "\n" + metrics_markdown(metrics) + "\n"
    (model_dir / "README.md").write_text(text)


def header_markdown(s: dict[str, Any]) -> str:
    cfg = s["config"]
    m, t, fams = cfg["model"], cfg["train"], cfg["families"]
    mins = s["train_seconds"] / 60
    lines = [
        "---",
        "library_name: transformers",
        "license: mit",
        "tags: [dolm, toy, gpt2, causal-analysis]",
        "---",
        "",
        "# dolm toy model: the embedded model organism",
        "",
        "A small GPT-2 with its own byte-level BPE tokenizer, trained from scratch by dolm's own "
        "command on the task families of `dolm-gen-prompts` (`dolm.tasks`, train split "
        "only), so that every study has a model whose correct behaviour is known: factual "
        "recall, Bayesian updating over two generators, instruction formats, multi-step "
        "addition with and without chain-of-thought, and two-option dilemmas.",
        "",
        "```python",
        "from dolm.models import load",
        'lm = load("toy")                       # or AutoModelForCausalLM.from_pretrained('
        '"models/toy")',
        "```",
        "",
        "## Training",
        "",
        f"- Command: `{s.get('command') or 'dolm-toy train'}`",
        "- Reproduce: `dolm-toy train --device cpu --threads 1 --force` (the config file "
        "holds the resolved config of this run; a test checks it), then `dolm-toy card`",
        "- Config: `tools/toy/toy_config.toml` (copied, resolved, into "
        "`training_config.json`)",
        f"- Seed: {s['seed']}",
        f"- Trained on: {s['device']} ({s.get('device_name', '')}), torch {s['torch']}, "
        f"transformers {s['transformers']}",
        f"- Training time: {s['train_seconds']:.0f} s for {s['steps']} steps "
        f"({mins:.1f} min; {s['total_seconds']:.0f} s in all, corpus and tokenizer "
        "included)",
    ]
    if s.get("train_cpu_seconds") and s["device"] == "cpu":
        th = max(1, int(s.get("threads") or 1))
        lines.append(
            f"- CPU time: {s['total_cpu_seconds'] / 60:.1f} min in all on {th} "
            f"thread{'s' * (th > 1)} ({s['train_cpu_seconds'] / 60:.1f} min in the training "
            f"loop), i.e. about {s['total_cpu_seconds'] / th / 60:.0f} min of wall time on "
            f"{th} idle core{'s' * (th > 1)}; the wall time above was measured on a shared, "
            "busy machine")
    if s.get("cpu_estimate"):
        lines.append(f"- Retraining on 2 CPU cores: {s['cpu_estimate']}")
    lines += [
        f"- Parameters: {s['n_params']:,} (GPT-2: {m['n_layer']} layers, d_model "
        f"{m['n_embd']}, {m['n_head']} heads, context {m['n_positions']}, tied embeddings); "
        f"vocabulary {s['vocab_size']} tokens",
        f"- Optimiser: AdamW, lr {t['lr']} (warm-up {t.get('warmup_steps', 0)} steps, cosine "
        f"to {t.get('min_lr_ratio', 0.1)}x), weight decay {t.get('weight_decay', 0)}, batch "
        f"{t['batch_size']} examples, gradient clip {t.get('grad_clip', 1.0)}",
        f"- Tokens seen: {s['tokens_seen']:,}; final loss (KL to the targets, nats/token): "
        f"{s['final_loss']:.4f}",
        "- Loss curve: `loss_curve.png`, `loss_curve.csv`",
        "",
        "### Data mixture",
        "",
        "| family | share of examples | distinct training examples | generator options | "
        "notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    wsum = sum(float(f.get("weight", 0)) for f in fams.values())
    ar = fams.get("arith", {})
    fw = (fams.get("formats", {}).get("options") or {}).get("format_weights")
    if fw is None:
        from dolm.tasks import FAMILIES

        fw = FAMILIES["formats"].option("format_weights").default
    notes = {
        "factual": "every fact in the training phrasings; eval uses held-out phrasings",
        "bayes": "whole draw sequences; loss at every draw against the exact posterior "
                 "predictive (soft targets)",
        "formats": "one format per unit, drawn with weights direct/polite/few-shot "
                   + "/".join(f"{w:g}" for w in fw),
        "arith": ("loss on every continuation token (chain-of-thought rows weigh ~10x a "
                  "direct answer); " if ar.get("token_level") else "")
                 + f"direct-answer rows: {ar.get('direct_share', 'all generated')}",
        "dilemma": "every training instance in both option orders"
                   + (f", plus {fams['dilemma']['cross_scenario']} pairs of actions from two "
                      "different scenarios (teach which action is intended; never an eval "
                      "pair)" if fams.get("dilemma", {}).get("cross_scenario") else ""),
    }
    for name, f in fams.items():
        opts = f.get("options") or {}
        opt_txt = ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"
        lines.append(f"| {name} | {float(f.get('weight', 0)) / wsum:.2f} | "
                     f"{s['pool_sizes'].get(name, '-')} | {opt_txt} | {notes.get(name, '')} |")
    lines += [
        "",
        "The answer and choice tokens the studies use (` X`, ` Y`, ` A`, ` B`, the digits, "
        "` 1`, ` 2`, the factual attributes, ` even`/` odd`) are single tokens; digits are "
        "split one by one (a leading space stays on the first digit: ` 12` -> ` 1` `2`). "
        "No BOS token is prepended; `<|endoftext|>` ends each training continuation; "
        "padding is `<|pad|>` on the right.",
        "",
        "Evaluation items never appear in training: factual eval uses phrasings held out "
        "from training; bayes, formats, arith and dilemma eval items are reserved by the "
        "families by a seed-independent hash (or a fixed grid for dilemma).",
        "",
    ]
    return "\n".join(lines)
