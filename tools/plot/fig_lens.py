"""Figures for ``lens`` tables (dolm-lens: logit and tuned lens) and the held-out KL of
tuned-lens ``translators``.

A lens table has one row per prompt x lens x layer x position x rank; per-cell values
(entropy, kl_to_final, target_logprob, choice_logprobs, intended, crossing_layer) repeat
over the ranks and are read from the rank-0 row. Option trajectories and crossing layers
are read at each prompt's last position (where the choice is made).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import compare, figure, unique_labels

LINESTYLES = {"logit": "-", "tuned": "--"}
MAX_POSITIONS = 12  # token grid columns
INTENDED, OTHER = "intended option", "best other option"


def _keys(d: Any) -> list[str]:
    return [c for c in ("prompt_id", "layer", "position", "lens") if c in d.columns]


def cells(df: Any) -> Any:
    """One row per (prompt, layer, position, lens): the rank-0 row where ranks are given."""
    d = df
    if "rank" in d.columns and d["rank"].notna().any():
        d = d[d["rank"] == d.groupby(_keys(d))["rank"].transform("min")]
    return d.drop_duplicates(subset=_keys(d))


def last_cells(df: Any) -> Any:
    """Cells at each prompt's last position read."""
    d = cells(df)
    if "position" not in d.columns:
        return d
    return d[d["position"] == d.groupby("prompt_id")["position"].transform("max")]


def lenses(df: Any) -> list[str]:
    if "lens" not in df.columns:
        return ["logit"]
    return sorted(set(df["lens"].dropna().astype(str)), key=lambda s: (s != "logit", s))


def _lens_of(d: Any) -> Any:
    return d["lens"].astype(str) if "lens" in d.columns else np.full(len(d), "logit")


def choice_frame(df: Any) -> Any | None:
    """Last-position cells with the log-prob of the intended option and of the best other
    one (or one column per choice when no option is intended); None without choices."""
    import pandas as pd

    if "choice_logprobs" not in df.columns or not df["choice_logprobs"].notna().any():
        return None
    d = last_cells(df)
    d = d[d["choice_logprobs"].notna()]
    arr = [np.asarray(v, dtype=float) for v in d["choice_logprobs"]]
    if "intended" in d.columns and d["intended"].notna().all():
        idx = d["intended"].astype(int).to_numpy()
        mine = [a[i] for a, i in zip(arr, idx, strict=True)]
        other = [np.max(np.delete(a, i)) if len(a) > 1 else np.nan
                 for a, i in zip(arr, idx, strict=True)]
        wide = pd.DataFrame({INTENDED: mine, OTHER: other}, index=d.index)
    else:
        k = min(len(a) for a in arr)
        wide = pd.DataFrame([a[:k] for a in arr], index=d.index,
                            columns=[f"choice {i}" for i in range(k)])
    keep = _keys(d) + [c for c in ("crossing_layer",) if c in d.columns]
    return pd.concat([d[keep], wide], axis=1)


def options(ch: Any) -> list[str]:
    return [c for c in ch.columns if c in (INTENDED, OTHER) or str(c).startswith("choice ")]


def crossing(ch: Any) -> tuple[float | None, int, int]:
    """(median crossing layer, prompts that cross, prompts whose intended option does not
    lead at the last layer). Uses dolm-lens's per-prompt ``crossing_layer`` when present,
    else the layer from which the mean margin of the last layer's winner stays positive."""
    if "crossing_layer" in ch.columns:
        per = ch.drop_duplicates("prompt_id")["crossing_layer"]
        got = per.dropna().astype(float)
        return (float(got.median()) if len(got) else None), len(got), int(per.isna().sum())
    opts = options(ch)
    if len(opts) < 2:
        return None, 0, 0
    mean = ch.groupby("layer")[opts].mean().sort_index()
    win = mean.iloc[-1].idxmax()
    margin = mean[win] - mean[[o for o in opts if o != win]].max(axis=1)
    for i in range(len(margin)):
        if (margin.iloc[i:] > 0).all():
            return float(margin.index[i]), ch["prompt_id"].nunique(), 0
    return None, 0, ch["prompt_id"].nunique()


def _grid_size(src: Any, _v: Any) -> tuple[float, float]:
    n = len(lenses(src.data))
    nl = src.data["layer"].nunique()
    return C.panels_size(n, height=max(4.6, 0.32 * nl + 1.8), per=6.0)


@figure("lens", "top_tokens", "top token per layer and position (or rank), first prompt",
        size=_grid_size, when=lambda s: C.has(s.data, "token", "prob", "layer"))
def draw_top_tokens(fig: Any, src: Any, _v: Any) -> None:
    from matplotlib.colors import Normalize

    df = src.data
    pid = str(df["prompt_id"].iloc[0])
    d = df[df["prompt_id"].astype(str) == pid]
    names = lenses(d)
    axes = C.panel_grid(fig, len(names))
    by_pos = "position" in d.columns and d["position"].nunique() > 1
    # one colour scale for every panel, up to the largest probability shown (a weak model's
    # grid is not washed out by a fixed 0..1 scale)
    top = float(np.nanmax(d["prob"].to_numpy(dtype=float))) if len(d) else 1.0
    norm = Normalize(0, min(1.0, max(0.05, np.ceil(top * 20) / 20)))
    im = None
    for ax, name in zip(axes, names, strict=True):
        sub = d[_lens_of(d) == name]
        if by_pos:
            sub = cells(sub)
            keep = sorted(sub["position"].unique())[-MAX_POSITIONS:]
            sub = sub[sub["position"].isin(keep)]
            col, xlabel = "position", "token position" + (
                f" (last {MAX_POSITIONS})" if d["position"].nunique() > MAX_POSITIONS else "")
        else:
            col, xlabel = "rank", "rank (0 = top)"
        layers = sorted(sub["layer"].unique())
        xs = sorted(sub[col].unique())
        grid = np.full((len(layers), len(xs)), np.nan)
        text = np.full((len(layers), len(xs)), "", dtype=object)
        for r in sub.itertuples(index=False):
            i, j = layers.index(r.layer), xs.index(getattr(r, col))
            grid[i, j] = r.prob
            text[i, j] = repr(str(r.token))[1:-1]
        im = C.heatmap(ax, grid, [int(x) for x in xs], [int(x) for x in layers], "Blues",
                       norm, annotate=False)
        for i in range(len(layers)):
            for j in range(len(xs)):
                if text[i, j]:
                    ax.text(j, i, style.short(text[i, j], 9), ha="center", va="center",
                            fontsize=7, color="white" if norm(grid[i, j]) > 0.6 else "black")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer")
        ax.set_title(f"{name} lens")
    fig.colorbar(im, ax=axes, label="probability of the top token", shrink=0.9)
    C.title(fig, f"Lens: top token by layer, prompt {pid}", src.model_label)


@figure("lens", "trajectories", "log-probability of the intended and the best other option by "
        "layer (last position), with the crossing layer",
        when=lambda s: choice_frame(s.data) is not None or C.has(s.data, "target_logprob"))
def draw_trajectories(fig: Any, src: Any, _v: Any) -> None:
    ax = fig.subplots()
    ch = choice_frame(src.data)
    if ch is None:
        d = last_cells(src.data)
        for i, name in enumerate(lenses(d)):
            agg = C.mean_sem(d[_lens_of(d) == name], ["layer"], "target_logprob")
            C.sem_band(ax, agg["layer"], agg["mean"], agg["sem"], style.colour(i),
                       f"target ({name} lens)", ls=LINESTYLES.get(name, ":"))
        ax.set_ylabel("log P(target) at the last position (mean ± SEM)")
    else:
        opts = options(ch)
        for name in lenses(ch):
            sub = ch[_lens_of(ch) == name]
            for i, o in enumerate(opts):
                agg = C.mean_sem(sub, ["layer"], o)
                C.sem_band(ax, agg["layer"], agg["mean"], agg["sem"], style.colour(i),
                           f"{o} ({name} lens)", ls=LINESTYLES.get(name, ":"))
            cross, n_cross, n_never = crossing(sub)
            if cross is not None:
                never = f", {n_never} never lead" if n_never else ""
                ax.axvline(cross, color="0.3", ls=LINESTYLES.get(name, ":"), lw=1,
                           label=f"{name}: median crossing L{cross:g} ({n_cross} prompts"
                           f"{never})")
        ax.set_ylabel("log P(option) at the last position (mean ± SEM)")
    ax.set_xlabel("layer")
    ax.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12),
              ncol=2)
    C.title(fig, f"Lens: option trajectories ({C.n_prompts(src.data)} prompts)", src.model_label)


@figure("lens", "kl", "KL to the final distribution and entropy by layer, per lens",
        size="wide", when=lambda s: C.has(s.data, "kl_to_final") or C.has(s.data, "entropy"))
def draw_kl(fig: Any, src: Any, _v: Any) -> None:
    d = cells(src.data)
    axes = fig.subplots(1, 2)
    for ax, col, lab in ((axes[0], "kl_to_final", "KL(final ‖ lens) (nats)"),
                         (axes[1], "entropy", "entropy (nats)")):
        if not C.has(d, col):
            C.no_data(ax, f"no {col} column")
            continue
        for i, name in enumerate(lenses(d)):
            agg = C.mean_sem(d[_lens_of(d) == name], ["layer"], col)
            C.sem_band(ax, agg["layer"], agg["mean"], agg["sem"], style.colour(i),
                       f"{name} lens")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{lab}, mean ± SEM over prompts")
        ax.legend(frameon=False)
    where = "all positions read" if "position" in d.columns and d["position"].nunique() > 1 \
        else "the position read"
    axes[0].set_title(f"distance to the model's output ({where})")
    axes[1].set_title("uncertainty")
    C.title(fig, "Lens quality by layer", src.model_label)


@compare("lens", "crossing", "lens crossing layer and KL by layer per model", size="wide",
         when=lambda s: choice_frame(s.data) is not None or C.has(s.data, "kl_to_final"))
def compare_crossing(fig: Any, srcs: list, _v: Any) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    labels = unique_labels(srcs)
    y = np.arange(len(srcs))
    crosses, depth, notes, used = [], [], [], set()
    for src in srcs:
        ch = choice_frame(src.data)
        cross, n_cross, n_never = None, 0, 0
        if ch is not None:
            name = lenses(ch)[0]
            used.add(name)
            cross, n_cross, n_never = crossing(ch[_lens_of(ch) == name])
        crosses.append(np.nan if cross is None else cross)
        depth.append(C.model_layers(src, src.data) or 1)
        notes.append(f"{n_never} never lead" if n_never else "")
    ax1.barh(y, crosses, color=[style.colour(i) for i in range(len(srcs))])
    for yi, c, n, note in zip(y, crosses, depth, notes, strict=True):
        text = "  no crossing" if c != c else f"  L{c:g} of {n}"
        ax1.text(0 if c != c else c, yi, text + (f" ({note})" if note else ""), va="center",
                 fontsize=8)
    ax1.set_yticks(y)
    ax1.set_yticklabels(labels)
    ax1.set_xlim(0, max(depth) + 1)
    ax1.invert_yaxis()
    ax1.set_xlabel("median crossing layer (intended option leads from here on)")
    ax1.set_title(f"crossing layer ({', '.join(sorted(used)) or 'no choices'} lens)")
    for i, (src, label) in enumerate(zip(srcs, labels, strict=True)):
        d = cells(src.data)
        if not C.has(d, "kl_to_final"):
            continue
        for name in lenses(d):
            agg = C.mean_sem(d[_lens_of(d) == name], ["layer"], "kl_to_final")
            ax2.plot(agg["layer"], agg["mean"], LINESTYLES.get(name, ":"), marker="o", ms=3,
                     color=style.colour(i), label=f"{label} ({name})")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("mean KL to the final distribution (nats)")
    ax2.legend(frameon=False, fontsize=8)
    ax2.set_title("KL to final")
    C.title(fig, f"Lens comparison, {C.how_many(srcs)}", labels)


# ------------------------------------------------------------------ translators


def heldout(src: Any) -> dict | None:
    kl = (src.data or {}).get("heldout_kl")
    return kl if isinstance(kl, dict) and kl.get("layer") and kl.get("logit") else None


@figure("translators", "heldout_kl", "held-out KL to the final distribution per layer: logit "
        "vs tuned lens", when=lambda s: heldout(s) is not None)
def draw_heldout(fig: Any, src: Any, _v: Any) -> None:
    kl = heldout(src)
    ax = fig.subplots()
    layers = np.asarray(kl["layer"])
    width = 0.4
    for i, name in enumerate(("logit", "tuned")):
        if kl.get(name):
            vals = np.asarray(kl[name], dtype=float)
            ax.bar(layers + (i - 0.5) * width, vals, width, color=style.colour(i),
                   label=f"{name} lens")
            for x, v in zip(layers + (i - 0.5) * width, vals, strict=True):
                ax.text(x, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean KL(final ‖ lens) on held-out tokens (nats)")
    n = kl.get("n_tokens")
    ax.legend(frameon=False, title=f"{n} held-out tokens" if n else None)
    spec = (src.data or {}).get("model_spec")
    C.title(fig, "Tuned lens: held-out KL by layer", src.model_label if src.model else
            str(spec or "not recorded"))
