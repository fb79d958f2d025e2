"""Train the toy model from scratch: task corpus -> BPE tokenizer -> small GPT-2.

Deterministic from the seed on a given device (CPU runs repeat bit for bit; CUDA
runs use deterministic kernels where PyTorch has them).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .corpus import build_pool, required_tokens
from .data import collate, encode_example
from .tokenizer import REQUIRED_TOKENS, check_single_tokens, train_tokenizer


def _seed_everything(seed: int, device: str) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        # the fused attention kernels' backward passes are not deterministic
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def build_model(cfg: dict, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = cfg["model"]
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=int(m["n_positions"]),
        n_embd=int(m["n_embd"]),
        n_layer=int(m["n_layer"]),
        n_head=int(m["n_head"]),
        n_inner=int(m.get("n_inner", 4 * int(m["n_embd"]))),
        activation_function=m.get("activation", "gelu_new"),
        resid_pdrop=float(m.get("dropout", 0.0)),
        embd_pdrop=float(m.get("dropout", 0.0)),
        attn_pdrop=float(m.get("dropout", 0.0)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    return model


def _lr_at(step: int, tcfg: dict) -> float:
    lr = float(tcfg["lr"])
    warm = int(tcfg.get("warmup_steps", 0))
    total = int(tcfg["steps"])
    floor = float(tcfg.get("min_lr_ratio", 0.1))
    if step < warm:
        return lr * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def batch_loss(model, batch, device):
    """Cross-entropy of the model against the (soft) targets in ``batch``.

    Returns (weighted sum of the per-target losses with ``batch["w"]``, per-target loss
    tensor); logits are computed only at the target positions."""
    import torch

    ids = batch["input_ids"].to(device, non_blocking=True)
    mask = batch["attention_mask"].to(device, non_blocking=True)
    hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    h = hidden[batch["b"].to(device), batch["t"].to(device)]
    logp = torch.log_softmax(model.lm_head(h).float(), dim=-1)
    tgt_ids = batch["tgt_ids"].to(device)
    tgt_p = batch["tgt_p"].to(device)
    per = -(tgt_p * logp.gather(1, tgt_ids)).sum(1)
    return (per * batch["w"].to(device)).sum(), per


def train(
    cfg: dict,
    out_dir: str | Path,
    device: str = "auto",
    seed: int | None = None,
    show_progress: bool = True,
    command: str | None = None,
    eval_fn=None,
) -> dict:
    """Train from scratch and write the HF folder to ``out_dir``. Returns a summary."""
    import torch
    from tqdm.auto import tqdm

    t_start = time.time()
    cpu_start = time.process_time()
    device = resolve_device(device)
    seed = int(cfg.get("seed", 0) if seed is None else seed)
    cfg = dict(cfg)
    cfg["seed"] = seed
    _seed_everything(seed, device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tcfg = cfg["train"]
    fams = cfg["families"]
    names = [n for n in fams if float(fams[n].get("weight", 0)) > 0]

    def log(msg):
        print(f"dolm-toy: {msg}", file=sys.stderr, flush=True)

    # 1. corpus (train split only; evaluation prompts come from the eval split)
    pools = {}
    for i, name in enumerate(names):
        t0 = time.time()
        pools[name] = build_pool(name, fams[name], seed=seed * 1000 + i)
        log(f"{name}: {len(pools[name])} training examples ({time.time() - t0:.1f}s)")

    # 2. tokenizer
    t0 = time.time()
    rng_tok = np.random.default_rng(seed)
    tok_texts = []
    per_fam = int(cfg["tokenizer"].get("examples_per_family", 3000))
    for name in names:
        pool = pools[name]
        idx = rng_tok.choice(len(pool), size=min(per_fam, len(pool)), replace=False)
        tok_texts.extend(pool[j].prompt + pool[j].continuation for j in sorted(idx))
    tokenizer = train_tokenizer(
        tok_texts,
        vocab_size=int(cfg["tokenizer"]["vocab_size"]),
        required=sorted(set(REQUIRED_TOKENS) | set(required_tokens(names))),
        n_positions=int(cfg["model"]["n_positions"]),
    )
    log(f"tokenizer: {len(tokenizer)} tokens ({time.time() - t0:.1f}s)")

    # 3. encode
    t0 = time.time()
    by_example = tcfg.get("loss_normalization", "example") == "example"
    cache: dict[str, int] = {}
    enc = {}
    n_pos = int(cfg["model"]["n_positions"])
    for i, name in enumerate(names):
        enc[name] = [encode_example(e, tokenizer, i, cache) for e in pools[name]]
        longest = max(len(e.ids) for e in enc[name])
        if longest > n_pos:
            raise ValueError(f"{name}: an example has {longest} tokens > n_positions={n_pos}")
        mean_len = float(np.mean([len(e.ids) for e in enc[name]]))
        # loss weight of each target: an example counts once ("example"), or, for a
        # family with token_level = true, each target token counts the same within it
        n_t = np.array([len(e.tgt_pos) for e in enc[name]], dtype=np.float64)
        token_level = bool(fams[name].get("token_level", False)) or not by_example
        for e, n in zip(enc[name], n_t, strict=True):
            e.weight = 1.0 / (n_t.mean() if token_level else n)
        log(f"{name}: mean {mean_len:.1f} tokens, max {longest}, "
            f"{n_t.mean():.1f} targets/example")
    log(f"encoded ({time.time() - t0:.1f}s)")

    # 4. model
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters on {device}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": float(tcfg.get("weight_decay", 0.0))},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=float(tcfg["lr"]),
        betas=tuple(tcfg.get("betas", (0.9, 0.98))),
        eps=1e-8,
    )

    # 5. loop
    weights = np.array([float(fams[n]["weight"]) for n in names])
    weights = weights / weights.sum()
    rng = np.random.default_rng(seed + 1)
    steps = int(tcfg["steps"])
    bs = int(tcfg["batch_size"])
    clip = float(tcfg.get("grad_clip", 1.0))
    log_every = int(tcfg.get("log_every", 50))
    eval_every = int(tcfg.get("eval_every", 0))
    rows = []
    acc_loss = np.zeros(len(names))
    acc_n = np.zeros(len(names))
    tokens_seen = 0
    t_loop = time.time()
    cpu_loop = time.process_time()
    model.train()
    bar = tqdm(range(steps), desc="dolm-toy train", file=sys.stderr, disable=not show_progress,
               mininterval=1.0, dynamic_ncols=True)
    evals = []
    # micro-batches only save padding (the gradient is the same): worth it on a CPU
    n_micro = tcfg.get("micro_batches", "auto")
    n_micro = (4 if device == "cpu" else 1) if n_micro == "auto" else max(1, int(n_micro))
    for step in bar:
        fam_idx = rng.choice(len(names), size=bs, p=weights)
        batch_items = []
        for f in fam_idx:
            pool = enc[names[f]]
            batch_items.append(pool[int(rng.integers(len(pool)))])
        # sort by length and split into micro-batches: little padding, same gradient
        batch_items.sort(key=lambda e: len(e.ids))
        chunks = [c for c in np.array_split(np.arange(bs), n_micro) if len(c)]
        lr = _lr_at(step, tcfg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for chunk in chunks:
            items = [batch_items[i] for i in chunk]
            batch = collate(items, tokenizer.pad_token_id)
            tokens_seen += int(batch["attention_mask"].sum())
            w = np.concatenate([np.full(len(e.tgt_pos), e.weight / bs) for e in items])
            batch["w"] = torch.from_numpy(w.astype(np.float32))
            loss, per = batch_loss(model, batch, device)
            loss.backward()
            fam_t = batch["family"].numpy()
            # logged: KL(target || model) = cross-entropy - target entropy (0 at optimum)
            tp = batch["tgt_p"].numpy()
            ent = -(tp * np.log(np.where(tp > 0, tp, 1.0))).sum(1)
            per_np = per.detach().float().cpu().numpy() - ent
            np.add.at(acc_loss, fam_t, per_np)
            np.add.at(acc_n, fam_t, 1)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            row = {
                "step": step + 1,
                "loss": float(acc_loss.sum() / max(1, acc_n.sum())),
                "lr": lr,
                "tokens": tokens_seen,
                "elapsed_s": round(time.time() - t_loop, 2),
            }
            for i, n in enumerate(names):
                row[f"loss_{n}"] = float(acc_loss[i] / acc_n[i]) if acc_n[i] else float("nan")
            rows.append(row)
            acc_loss[:] = 0
            acc_n[:] = 0
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if eval_fn is not None and eval_every and ((step + 1) % eval_every == 0):
            model.eval()
            with torch.no_grad():
                res = eval_fn(model, tokenizer, device)
            evals.append({"step": step + 1, **res})
            log(f"step {step + 1}: {json.dumps(res)}")
            model.train()
    bar.close()
    train_s = time.time() - t_loop
    total_s = time.time() - t_start
    train_cpu_s = time.process_time() - cpu_loop
    total_cpu_s = time.process_time() - cpu_start
    log(f"trained {steps} steps in {train_s:.1f}s ({steps / train_s:.2f} steps/s, "
        f"{tokens_seen / train_s:,.0f} tokens/s)")

    # 6. save
    model.eval()
    model = model.to("cpu")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    check_single_tokens(tokenizer, REQUIRED_TOKENS)
    write_loss_curve(rows, names, out_dir)
    import torch as _t
    import transformers

    summary = {
        "command": command,
        "seed": seed,
        "device": device,
        "device_name": (_t.cuda.get_device_name(0) if device.startswith("cuda")
                        else platform.processor() or platform.machine()),
        "threads": _t.get_num_threads(),
        "torch": _t.__version__,
        "transformers": transformers.__version__,
        "n_params": n_params,
        "vocab_size": len(tokenizer),
        "steps": steps,
        "tokens_seen": tokens_seen,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(total_s, 1),
        # CPU time of this process (all threads): on a busy shared machine the wall time
        # overstates what the run needs; cpu / threads is the uncontended wall time
        "train_cpu_seconds": round(train_cpu_s, 1),
        "total_cpu_seconds": round(total_cpu_s, 1),
        "steps_per_second": round(steps / train_s, 3),
        "final_loss": rows[-1]["loss"] if rows else None,
        "pool_sizes": {n: len(pools[n]) for n in names},
        "evals": evals,
        "config": cfg,
    }
    with open(out_dir / "training_config.json", "w") as f:
        json.dump(summary, f, indent=2, default=str)
        f.write("\n")
    return summary


def write_loss_curve(rows: list[dict], names: list[str], out_dir: Path) -> None:
    import csv

    if not rows:
        return
    cols = list(rows[0].keys())
    with open(out_dir / "loss_curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], color="black", lw=2, label="all")
    for n in names:
        ax.plot(steps, [r[f"loss_{n}"] for r in rows], lw=1, label=n)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(target || model) per target token (nats)")
    ax.set_title("toy model training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curve.png")
    plt.close(fig)
