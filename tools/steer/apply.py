"""Steering: add alpha x a unit direction at a site (or project the direction out), at
the prompt positions one ``--positions`` spec selects (:mod:`dolm.positions`: last, all,
integers, span:NAME, NAME_first, NAME_last), for many alphas in one batched run.

Every (alpha, prompt) pair is one batch row; a row starts at the site's layer from the
cached clean residual stream (:mod:`dolm.variants`). Generation under steering is
greedy, without a key/value cache, the steering applied at every forward: at the
selected prompt positions and every generated one (with ``last``: the positions whose
next token is chosen; with ``all``: everywhere).
"""

from __future__ import annotations

import numpy as np
import torch
from dolm.engine import row_writer, start_layer, writes_embed
from dolm.metrics import Targets, effect_frames, ids_matrix, metrics_table
from dolm.positions import token_mask
from dolm.variants import clean_pass, run_variants


def position_mask(enc, positions: str, spans=None) -> torch.Tensor:
    """(rows, T) bool of the prompt positions steered (the ``--positions`` language)."""
    return torch.from_numpy(token_mask(enc, positions, spans))


def steer_fn(mode: str, u: torch.Tensor):
    """value for :func:`dolm.engine.row_writer`: add alpha*u or remove the u part."""

    def make(alphas: np.ndarray):
        def value_fn(act_rows, sel):
            x = act_rows.float()
            uu = u.to(x.device)
            if mode == "project":
                return x - (x @ uu)[..., None] * uu
            a = torch.as_tensor(alphas[sel.numpy()], dtype=torch.float32, device=x.device)
            return x + a.view(-1, *([1] * (x.dim() - 1))) * uu

        return value_fn

    return make


def run_steering(lm, targets: list[Targets], texts: list[str], site: str, direction: np.ndarray,
                 alphas: list[float], mode: str, positions: str, batch_size="auto",
                 progress=None, spans=None):
    """Clean metrics and metrics per alpha (``[None]`` for project): name -> (N,).
    ``positions``: one spec of :mod:`dolm.positions` (``spans``: each prompt's spans)."""
    names = [t.prompt_id for t in targets]
    enc = lm.encode(texts, names=names, device="cpu")
    n = len(targets)
    start = start_layer(lm, site)
    needs_embed = writes_embed(lm, [site])
    clean = clean_pass(lm, enc, ids_matrix(targets), starts={start}, batch_size=batch_size,
                       needs_embed=needs_embed)
    u = torch.as_tensor(direction, dtype=torch.float32)
    al = list(alphas) if mode == "add" else [None]
    v_alpha = np.repeat(np.asarray([a or 0.0 for a in al], dtype=np.float64), n)
    v_prompt = np.tile(np.arange(n), len(al))
    v_start = np.full(len(v_prompt), start)
    pmask = position_mask(enc, positions, spans)
    make_value = steer_fn(mode, u)

    def make_writes(rows: np.ndarray, t: int) -> dict:
        fn = make_value(v_alpha[rows])
        return {site: row_writer(np.arange(len(rows)), pmask[v_prompt[rows]][:, :t], fn)}

    bar = progress(len(v_prompt)) if progress else None
    reads = run_variants(lm, clean, v_prompt, v_start, make_writes, batch_size,
                         progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    per = [metrics_table(reads[k * n:(k + 1) * n], targets) for k in range(len(al))]
    return metrics_table(clean.read, targets), per, al


@torch.no_grad()
def generate(lm, texts: list[str], names: list[str], site: str, direction: np.ndarray,
             alphas: list, mode: str, positions: str, n_tokens: int,
             batch_size="auto", spans=None) -> list[list[str]]:
    """Greedy continuations under steering: [alpha index][prompt index] -> text.

    Steered: the prompt positions ``positions`` selects and every generated position."""
    from dolm.models.batching import iter_batched, pad_right

    u = torch.as_tensor(direction, dtype=torch.float32)
    make_value = steer_fn(mode, u)
    tok = lm.tokenizer
    enc = lm.encode(texts, names=names, device="cpu")
    base_ids = [enc.input_ids[i, :n].tolist() for i, n in enumerate(enc.lengths)]
    prompt_mask = position_mask(enc, positions, spans)
    eos = tok.eos_token_id
    n = len(texts)
    al = [a if a is not None else 0.0 for a in alphas]
    rows_all = [(k, i) for k in range(len(al)) for i in range(n)]
    out = [["" for _ in range(n)] for _ in al]
    limit = lm.n_ctx

    def fn(a: int, z: int):
        rows = rows_all[a:z]
        seqs = [list(base_ids[i]) for _, i in rows]
        n_prompt = [len(s) for s in seqs]
        alive = [True] * len(rows)
        gen: list[list[int]] = [[] for _ in rows]
        alpha_rows = np.asarray([al[k] for k, _ in rows], dtype=np.float64)
        for _ in range(n_tokens):
            if not any(alive) or (limit and max(len(s) for s in seqs) >= limit):
                break
            ids, mask = pad_right(seqs, lm.pad_id, lm.device)
            pmask = torch.zeros(ids.shape, dtype=torch.bool)
            for r, (s, (_, i)) in enumerate(zip(seqs, rows, strict=True)):
                pmask[r, :n_prompt[r]] = prompt_mask[i, :n_prompt[r]]
                pmask[r, n_prompt[r]:len(s)] = True
            write = {site: row_writer(np.arange(len(seqs)), pmask, make_value(alpha_rows))}
            with lm.trace(write=write):
                res = lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
            last = torch.tensor([len(s) - 1 for s in seqs], device=res.logits.device)
            nxt = res.logits[torch.arange(len(seqs), device=last.device), last].argmax(-1)
            for r, token in enumerate(nxt.tolist()):
                if not alive[r]:
                    continue
                if eos is not None and token == eos:
                    alive[r] = False
                    continue
                seqs[r].append(token)
                gen[r].append(token)
        return [tok.decode(g) for g in gen]

    for a, z, texts_out in iter_batched(len(rows_all), fn, batch_size, max_batch_size=32):
        for (k, i), text in zip(rows_all[a:z], texts_out, strict=True):
            out[k][i] = text
    return out


def effects_rows(lm, targets: list[Targets], site: str, alphas: list, clean: dict,
                 per: list[dict], mode: str, positions: str, label: str,
                 generations: list[list[str]] | None = None):
    import pandas as pd
    from dolm.formats import frame

    pids = [t.prompt_id for t in targets]
    s = lm.parse_site(site)
    frames = []
    for k, (alpha, vals) in enumerate(zip(alphas, per, strict=True)):
        if mode == "add":
            what = f"add {alpha:g} x {label} at {site}@{positions}"
        else:
            what = f"project out {label} at {site}@{positions}"
        fields = dict(tool="steer", intervention=what, site=site, layer=s.layer, head=s.head,
                      kind=mode, alpha=alpha, component=label)
        extra = {"generation": generations[k]} if generations is not None else None
        frames += effect_frames(pids, vals, clean, fields, extra)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["generation"] if generations is not None else [])
    return frame(df, "effects")


def slopes(df) -> dict[str, float]:
    """Least-squares slope of the mean metric over prompts against alpha, per metric."""
    out = {}
    d = df[df["alpha"].notna()]
    for m, g in d.groupby("metric"):
        agg = g.groupby("alpha")["value"].mean()
        if len(agg) >= 2:
            x = agg.index.to_numpy(dtype=float)
            out[str(m)] = float(np.polyfit(x, agg.to_numpy(dtype=float), 1)[0])
    return out
