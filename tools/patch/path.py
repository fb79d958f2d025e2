"""``dolm-patch --mode path``: path patching from senders to receivers (IOI-style), on the
edge-level pass of :mod:`dolm.circuits` (every other path frozen to the reference run)."""

from __future__ import annotations


def run_path(run, *, df, prompts, lm, senders, receivers, channels, direction, metric,
             output, force, seed, batch_size) -> None:
    """Write one effects row per prompt and metric for the path S -> R."""
    import numpy as np
    import pandas as pd
    from dolm.circuits.path import path_edges, path_patch
    from dolm.circuits.scores import Scorer, metric_of, prepare
    from dolm.errors import InputError
    from dolm.formats import frame, write_table
    from dolm.metrics import effect_frames

    if not senders or not receivers:
        raise InputError("--mode path: give --senders and --receivers (node patterns, e.g. "
                         "--senders 'head.0.*' --receivers head.1.0 --channels k)")
    if direction == "denoise":  # the reference is the counterfactual run
        if "cf_prompt" not in df.columns:
            raise InputError(f"{prompts}: --mode path needs a cf_prompt column")
        df = df.copy()
        df["prompt"], df["cf_prompt"] = df["cf_prompt"], df["prompt"]
    want = "logit_diff" if metric in ("auto", "logit_diff") else metric
    try:
        data = prepare(lm, df, prompts, want, "cf")
    except InputError:
        if metric != "auto":
            raise
        want = "prob_target"
        data = prepare(lm, df, prompts, want, "cf")
    bs = 16 if batch_size == "auto" else int(batch_size)
    sc = Scorer(lm, data, want, seed=seed, batch_size=bs)
    edges = path_edges(sc.g, senders, receivers, channels)
    ref, patched = path_patch(sc, edges)
    names = ["logit_diff", "prob_target"] if want == "logit_diff" else ["prob_target"]

    def mets(logits):
        return {m: metric_of(logits, data.target, data.foil, m).double().numpy()
                for m in names}

    clean, values = mets(ref), mets(patched)
    label = f"path {senders} -> {receivers}" + (f" [{channels}]" if "head" in receivers
                                                 else "")
    fields = {"tool": "patch", "intervention": label, "site": None, "layer": None,
              "position": None, "head": None, "kind": "path", "alpha": None}
    frames = effect_frames(data.prompt_ids, values, clean, fields)
    out = frame(pd.concat(frames, ignore_index=True), "effects")
    extra = {"mode": "path", "senders": senders, "receivers": receivers,
             "channels": channels, "direction": direction, "metric": want,
             "n_edges": len(edges), "mean_effect": float(np.mean(values[want] - clean[want]))}
    write_table(out, output, schema="effects", run=run, force=force, extra=extra)
