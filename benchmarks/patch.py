"""Benchmark: dolm-patch's resid_pre (layer x position) grid vs TransformerLens and the floor.

One run, one machine, on a randomly initialised GPT-2-small-size model (124M, CPU, fp32):

- ours: ``dolm_tools.patch`` exact patching of the 12 x 16 resid_pre grid of one
  16-token prompt pair (cache runs included), batch size 32;
- TransformerLens 3.9: ``transformer_lens.patching.get_act_patch_resid_pre`` on the same
  weights (``convert_gpt2_weights``, no folding), prompt pair and grid (one full forward
  per cell); the two grids are compared value by value;
- plain HF: the same 192 variants as full HF forwards in batches of 32;
- the layer floor: the layer-passes the grid needs (sum over cells of n_layers - start
  layer) times one layer-pass measured at the batch size used (32 rows x 16 tokens);
- the token floor: the token-layer passes it needs when positions before the patched one
  are not recomputed (their keys/values come from the clean run: sum over cells of
  (n_layers - l) x (T - p)) times one token-layer pass (the same layer-pass / (32 x 16)).

Writes ``benchmarks/results/patch.md`` (``--out``). Needs ``transformer_lens==3.9.0``.
Run: ``python benchmarks/patch.py`` (a few minutes on 2 cores; TransformerLens dominates).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# 16 words that the tiny tokenizer keeps as one token each (with their leading space)
WORDS = "the capital of France is a city on the river and the tower is red the".split()


def build_model(folder: Path, seed: int = 0, n_layer: int = 12, d_model: int = 768) -> None:
    from dolm.models.tiny import build_tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = build_tiny_tokenizer("gpt", model_max_length=1024)
    cfg = GPT2Config(n_layer=n_layer, n_head=12, n_embd=d_model, n_positions=1024,
                     vocab_size=50257,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def tl_model(hf_model):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
        act_fn=c.activation_function, normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", default_prepend_bos=False, device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_state_dict(convert_gpt2_weights(hf_model, cfg), strict=False)
    return model.eval()


class Timing:
    """Wall-clock and process CPU seconds of repeated runs (medians)."""

    def __init__(self, wall: list[float], cpu: list[float]):
        self.walls, self.cpus = wall, cpu
        self.wall = statistics.median(wall)
        self.cpu = statistics.median(cpu)


def timed(fn, reps: int = 1):
    walls, cpus, out = [], [], None
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return Timing(walls, cpus), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "patch.md"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of ours and the floor")
    ap.add_argument("--skip-tl", action="store_true", help="leave TransformerLens out")
    ap.add_argument("--n-layer", type=int, default=12, help="smaller models for a smoke test")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for every run (default 1: on a shared machine the "
                         "CPU seconds of one thread are the stable measure of work)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from dolm.models import load
    from dolm_tools.patch.prepare import Prompt
    from dolm_tools.patch.run import Options, Patcher

    bs = args.batch_size
    load0 = os.getloadavg()[0]
    tmp = tempfile.TemporaryDirectory(prefix="dolm-bench-patch-")
    folder = Path(tmp.name) / "gpt2-small-random"
    build_model(folder, n_layer=args.n_layer, d_model=args.d_model)
    lm = load(str(folder), dtype="float32", device="cpu")
    tokf = lm.tokenizer
    clean = " " + " ".join(WORDS)
    corrupt = clean.replace("France", "Italy")
    ec, ex = lm.encode([clean]), lm.encode([corrupt])
    t = ec.lengths[0]
    assert t == 16 and ex.lengths[0] == 16, (ec.lengths, ex.lengths)
    tid = tokf(" Paris", add_special_tokens=False)["input_ids"][0]
    fid = tokf(" Rome", add_special_tokens=False)["input_ids"][0]
    prompt = Prompt("bench", clean, corrupt, " Paris", " Rome", tid, fid, None, None, None,
                    {}, {})
    opts = Options(sites="resid_pre", positions="all", metric="logit_diff", batch_size=bs)
    n_layers = lm.n_layers
    n_cells = n_layers * t

    # ---- ours (one warm-up on a small grid, then the full grid)
    Patcher(lm, [prompt], Options(sites=f"resid_pre.{lm.n_layers - 1}", positions="last",
                                       batch_size=bs)).run()

    def ours():
        rows, _ = Patcher(lm, [prompt], opts).run()
        return rows

    t_ours, rows = timed(ours, args.reps)
    grid = torch.zeros(n_layers, t, dtype=torch.float64)
    for r in rows:
        if r["metric"] == "logit_diff":
            grid[r["layer"], r["position"]] = r["value"]
    layer_passes = sum(n_layers - lyr for lyr in range(n_layers)) * t
    token_passes = sum((n_layers - lyr) * (t - p) for lyr in range(n_layers) for p in range(t))

    # ---- the floor: one layer-pass at the batch size used
    ctx = lm.layer_context(torch.ones(1, t, dtype=torch.long))
    h = torch.randn(bs, t, lm.d_model)

    @torch.no_grad()
    def one_pass():
        for lyr in range(n_layers):  # each layer on the same input, as the floor counts
            lm.run_layers(h, lyr, lyr + 1, ctx)

    one_pass()
    t_all_layers, _ = timed(one_pass, max(args.reps, 3))
    t_layer = Timing([x / n_layers for x in t_all_layers.walls],
                     [x / n_layers for x in t_all_layers.cpus])
    k = layer_passes / bs
    floor = Timing([k * x for x in t_layer.walls], [k * x for x in t_layer.cpus])
    k_tok = token_passes / (bs * t)
    floor_tok = Timing([k_tok * x for x in t_layer.walls], [k_tok * x for x in t_layer.cpus])

    # ---- plain HF forwards of the 192 variants, batches of bs
    ids = ex.input_ids.repeat(bs, 1)

    @torch.no_grad()
    def hf():
        for _ in range((n_cells + bs - 1) // bs):
            lm.model(input_ids=ids, use_cache=False)

    t_hf, _ = timed(hf, 1)

    # ---- TransformerLens
    t_tl, max_diff = None, None
    if not args.skip_tl:
        from transformer_lens import patching

        tl = tl_model(lm.model)
        clean_tok = ec.input_ids.cpu()
        cor_tok = ex.input_ids.cpu()

        def metric(logits):
            return logits[0, -1, tid] - logits[0, -1, fid]

        def run_tl():
            with torch.no_grad():
                _, cache = tl.run_with_cache(clean_tok)
                return patching.get_act_patch_resid_pre(tl, cor_tok, cache, metric)

        t_tl, tl_grid = timed(run_tl, 1)
        max_diff = float((tl_grid.double() - grid).abs().max())

    def row(name, t):
        return f"| {name} | {t.wall:.2f} | {t.cpu:.2f} |"

    def ratio(name, a, b, target=""):
        return f"| {name} | {a.wall / b.wall:.2f}x | {a.cpu / b.cpu:.2f}x | {target} |"

    lines = [
        "# dolm-patch benchmark: resid_pre grid (layer x position)",
        "",
        "Produced by `python benchmarks/patch.py` in one run on one machine. Wall-clock and "
        "process CPU seconds are both given: on a shared machine the wall clock includes "
        "waiting for the CPU, the CPU seconds are the work done.",
        "",
        f"- model: randomly initialised GPT-2 ({n_layers} layers, d_model {lm.d_model}, "
        f"vocab 50257, "
        f"{sum(p.numel() for p in lm.model.parameters()) / 1e6:.0f}M parameters), fp32, CPU",
        f"- grid: resid_pre x {n_layers} layers x {t} positions = {n_cells} cells, one "
        f"{t}-token prompt pair, metric logit difference at the last position",
        f"- batch size {bs}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"{os.cpu_count()} cores, load average {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end ({platform.machine()})",
        "",
        "| run | wall s | CPU s |",
        "| --- | ---: | ---: |",
        row(f"dolm-patch, exact (median of {len(t_ours.walls)}; cache runs included)", t_ours),
        row(f"layer floor: {layer_passes} layer-passes / {bs} x one layer-pass at batch {bs} "
            f"({t_layer.wall * 1000:.0f} ms wall, {t_layer.cpu * 1000:.0f} ms CPU)", floor),
        row(f"token floor: {token_passes} token-layer passes / ({bs} x {t}) x the same "
            "layer-pass (prefix keys/values reused)", floor_tok),
        row(f"plain HF forwards, {n_cells} variants in batches of {bs}", t_hf),
    ]
    if t_tl is not None:
        lines.append(row("TransformerLens 3.9 `get_act_patch_resid_pre` (clean cache "
                         "included)", t_tl))
    lines += ["", "| ratio | wall | CPU | target |", "| --- | ---: | ---: | --- |"]
    if t_tl is not None:
        lines.append(ratio("TransformerLens / dolm-patch (speed-up)", t_tl, t_ours, ">= 25x"))
    lines.append(ratio("dolm-patch / token floor", t_ours, floor_tok, "<= 1.5x"))
    lines.append(ratio("dolm-patch / layer floor", t_ours, floor, ""))
    lines.append(ratio("plain HF forwards / dolm-patch", t_hf, t_ours))
    lines += ["", f"Prefix KV reuse: {'on' if lm.supports_prefix_kv() else 'off'} "
              "(`lm.supports_prefix_kv()`; cells are ordered by first patched position and "
              "each batch steps only positions p..T-1, p its smallest)."]
    if max_diff is not None:
        lines += ["", f"Largest difference between the two grids' logit differences: "
                  f"{max_diff:.2e}."]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    sys.stdout.write(text)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
