"""Figures for ``lens`` tables (dolm-lens: logit and tuned lens).

Written against the planned columns: prompt_id, layer, position, lens ('logit' |
'tuned'), rank, token, prob, target_logprob, choice log-probs (a list column
``choice_logprobs`` or one column per choice ``choice_logprob.<i>``), entropy,
kl_to_final. Per-(prompt, layer, position, lens) values repeat over the top-k ranks;
they are taken from the rank-0 row.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from dolm_tools.plot import common as C
from dolm_tools.plot import style
from dolm_tools.plot.registry import compare, figure, unique_labels

CHOICE_RE = re.compile(r"^choice_logprobs?[._](?P<name>.+)$")
LINESTYLES = {"logit": "-", "tuned": "--"}


def cells(df: Any) -> Any:
    """One row per (prompt, layer, position, lens): the rank-0 row where ranks are given."""
    d = df
    if "rank" in d.columns and d["rank"].notna().any():
        d = d[d["rank"] == d.groupby(_keys(d))["rank"].transform("min")]
    return d.drop_duplicates(subset=_keys(d))


def _keys(d: Any) -> list[str]:
    return [c for c in ("prompt_id", "layer", "position", "lens") if c in d.columns]


def lenses(df: Any) -> list[str]:
    if "lens" not in df.columns:
        return ["logit"]
    return sorted(set(df["lens"].dropna().astype(str)), key=lambda s: (s != "logit", s))


def choice_frame(df: Any) -> Any | None:
    """Cells with one column per choice (``choice 0``, ...), or None without choices."""
    import pandas as pd

    d = cells(df)
    if "choice_logprobs" in d.columns and d["choice_logprobs"].notna().any():
        d = d[d["choice_logprobs"].notna()]
        arr = [list(v) for v in d["choice_logprobs"]]
        k = min(len(a) for a in arr)
        wide = pd.DataFrame([a[:k] for a in arr], index=d.index,
                            columns=[f"choice {i}" for i in range(k)])
        return pd.concat([d[_keys(d)], wide], axis=1)
    cols = [c for c in d.columns if CHOICE_RE.match(str(c))]
    if cols:
        out = d[_keys(d) + cols].copy()
        return out.rename(columns={c: f"choice {CHOICE_RE.match(c)['name']}" for c in cols})
    return None


def _lens_of(d: Any) -> Any:
    return d["lens"].astype(str) if "lens" in d.columns else np.full(len(d), "logit")


def crossing_layer(d: Any) -> tuple[int | None, str | None, Any]:
    """(layer, winning option, per-layer mean margin) where the option that wins at the last
    layer overtakes the others for good; layer None if it never trails."""
    opts = [c for c in d.columns if str(c).startswith("choice ")]
    if len(opts) < 2:
        return None, None, None
    mean = d.groupby("layer")[opts].mean().sort_index()
    win = mean.iloc[-1].idxmax()
    others = [o for o in opts if o != win]
    margin = mean[win] - mean[others].max(axis=1)
    layers = margin.index.to_numpy()
    cross = None
    for i in range(len(layers)):
        if (margin.iloc[i:] > 0).all():
            cross = int(layers[i])
            break
    return cross, str(win), margin


def _first_prompt(df: Any) -> str:
    return str(df["prompt_id"].iloc[0])


def _grid_size(src: Any, _v: Any) -> tuple[float, float]:
    n = len(lenses(src.data))
    nl = src.data["layer"].nunique()
    return C.panels_size(n, height=max(4.6, 0.32 * nl + 1.8), per=6.0)


@figure("lens", "top_tokens", "top token per layer (and position or rank), one prompt",
        size=_grid_size, when=lambda s: C.has(s.data, "token", "prob", "layer"))
def draw_top_tokens(fig: Any, src: Any, _v: Any) -> None:
    from matplotlib.colors import Normalize

    df = src.data
    pid = _first_prompt(df)
    d = df[df["prompt_id"].astype(str) == pid]
    names = lenses(d)
    axes = C.panel_grid(fig, len(names))
    by_pos = "position" in d.columns and d["position"].nunique() > 1
    im = None
    for ax, name in zip(axes, names, strict=True):
        sub = d[_lens_of(d) == name]
        if by_pos:
            sub = cells(sub)
            col, xlabel = "position", "token position"
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
                       Normalize(0, 1), annotate=False)
        for i in range(len(layers)):
            for j in range(len(xs)):
                if text[i, j]:
                    ax.text(j, i, style.short(text[i, j], 9), ha="center", va="center",
                            fontsize=7, color="white" if grid[i, j] > 0.6 else "black")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer")
        ax.set_title(f"{name} lens")
    fig.colorbar(im, ax=axes, label="probability of the token", shrink=0.9)
    C.title(fig, f"Lens: top tokens by layer, prompt {pid}", src.model_label)


@figure("lens", "trajectories", "choice log-probabilities by layer with the crossing layer",
        when=lambda s: choice_frame(s.data) is not None or C.has(s.data, "target_logprob"))
def draw_trajectories(fig: Any, src: Any, _v: Any) -> None:
    ax = fig.subplots()
    ch = choice_frame(src.data)
    if ch is None:
        d = cells(src.data)
        for i, name in enumerate(lenses(d)):
            agg = C.mean_sem(d[_lens_of(d) == name], ["layer"], "target_logprob")
            C.sem_band(ax, agg["layer"], agg["mean"], agg["sem"], style.colour(i),
                       f"target ({name} lens)", ls=LINESTYLES.get(name, ":"))
        ax.set_ylabel("log P(target) (mean ± SEM)")
    else:
        opts = [c for c in ch.columns if str(c).startswith("choice ")]
        for k, name in enumerate(lenses(ch)):
            sub = ch[_lens_of(ch) == name]
            cross, win, _ = crossing_layer(sub)
            for i, o in enumerate(opts):
                agg = C.mean_sem(sub, ["layer"], o)
                C.sem_band(ax, agg["layer"], agg["mean"], agg["sem"], style.colour(i),
                           f"{o} ({name} lens)", ls=LINESTYLES.get(name, ":"))
            if cross is not None:
                ax.axvline(cross, color="0.3", ls=LINESTYLES.get(name, ":"), lw=1)
                ax.annotate(f"{name}: {win} leads from L{cross}", (cross, 1.0),
                            xycoords=("data", "axes fraction"), xytext=(4, -12 - 12 * k),
                            textcoords="offset points", fontsize=8)
        ax.set_ylabel("log P(choice) (mean ± SEM)")
    ax.set_xlabel("layer")
    ax.legend(frameon=False, fontsize=8, loc="lower right")
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
        ax.set_ylabel(f"{lab}, mean ± SEM")
        ax.legend(frameon=False)
    axes[0].set_title("distance to the model's output")
    axes[1].set_title("uncertainty")
    C.title(fig, "Lens quality by layer", src.model_label)


@compare("lens", "crossing", "lens crossing layer and KL by layer per model", size="wide",
         when=lambda s: choice_frame(s.data) is not None or C.has(s.data, "kl_to_final"))
def compare_crossing(fig: Any, srcs: list, _v: Any) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    labels = unique_labels(srcs)
    y = np.arange(len(srcs))
    crosses, depth, used = [], [], set()
    for src in srcs:
        ch = choice_frame(src.data)
        cross = None
        if ch is not None:
            used.add(lenses(ch)[0])
            sub = ch[_lens_of(ch) == lenses(ch)[0]]
            cross = crossing_layer(sub)[0]
        crosses.append(np.nan if cross is None else cross)
        depth.append(C.model_layers(src, src.data) or 1)
    ax1.barh(y, crosses, color=[style.colour(i) for i in range(len(srcs))])
    for yi, c, n in zip(y, crosses, depth, strict=True):
        ax1.text(0 if c != c else c, yi, "  never trails" if c != c else
                 f"  L{int(c)} of {n}", va="center", fontsize=8)
    ax1.set_yticks(y)
    ax1.set_yticklabels(labels)
    ax1.set_xlim(0, max(depth) + 1)
    ax1.invert_yaxis()
    ax1.set_xlabel("crossing layer (winning option leads from here on)")
    ax1.set_title(f"crossing layer ({', '.join(sorted(used)) or 'no choices'} lens)")
    for i, src in enumerate(srcs):
        d = cells(src.data)
        if not C.has(d, "kl_to_final"):
            continue
        for name in lenses(d):
            agg = C.mean_sem(d[_lens_of(d) == name], ["layer"], "kl_to_final")
            ax2.plot(agg["layer"], agg["mean"], LINESTYLES.get(name, ":"), marker="o", ms=3,
                     color=style.colour(i), label=f"{labels[i]} ({name})")
    ax2.set_xlabel("layer")
    ax2.set_ylabel("mean KL to the final distribution (nats)")
    ax2.legend(frameon=False, fontsize=8)
    ax2.set_title("KL to final")
    C.title(fig, "Lens comparison across models", labels)
