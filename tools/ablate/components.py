"""Component sets to ablate: parsed from ``--components``, made by ``--scan``, or picked
from an effects file (``--from FILE --top K / --bottom K``).

Components (dolm site names, with ``*`` patterns):

- ``head.L.H``: one attention head (its slice of the input of the output projection)
- ``attn_out.L``: the whole attention layer's output
- ``mlp_out.L``: the MLP's output
- ``layer.L``: the whole block's contribution (``attn_out.L`` and ``mlp_out.L``)

In ``--components``, ``,`` separates sets and ``+`` joins components into one set that
is ablated together; a pattern inside a set adds all it matches to that set
(``head.2.*`` is layer 2's heads together).
"""

from __future__ import annotations

from dataclasses import dataclass

from dolm.errors import InputError

KINDS = ("zero", "mean", "resample")
SCANS = {"heads": "head.*.*", "attn": "attn_out.*", "mlp": "mlp_out.*", "layers": "layer.*"}
FORMS = "head.L.H, attn_out.L, mlp_out.L or layer.L (L, H an index or *)"


@dataclass
class ComponentSet:
    """Components ablated together, the sites they write, and a name."""

    name: str
    components: tuple[str, ...]
    sites: tuple[str, ...]

    @property
    def label(self) -> str:
        return "+".join(self.components)

    @property
    def site(self) -> str | None:
        return self.sites[0] if len(self.sites) == 1 else None

    def layer(self, lm) -> int | None:
        layers = {lm.parse_site(s).layer for s in self.sites}
        return layers.pop() if len(layers) == 1 else None

    def head(self, lm) -> int | None:
        if len(self.sites) != 1:
            return None
        return lm.parse_site(self.sites[0]).head


def expand_component(lm, text: str, option: str) -> list[tuple[str, tuple[str, ...]]]:
    """One component or pattern -> [(component name, sites it writes)]."""
    text = text.strip()
    parts = text.split(".")
    kind = parts[0]
    if kind == "layer":
        if len(parts) != 2:
            raise InputError(f"{option}: component {text!r}: layer takes one index; "
                             f"expected {FORMS}")
        idx = parts[1]
        if idx == "*":
            layers = range(lm.n_layers)
        elif idx.isdigit():
            if int(idx) >= lm.n_layers:
                raise InputError(f"{option}: component {text!r}: layer {idx} out of range "
                                 f"0..{lm.n_layers - 1}")
            layers = [int(idx)]
        else:
            raise InputError(f"{option}: component {text!r}: layer {idx!r} is not an index "
                             f"or *; expected {FORMS}")
        return [(f"layer.{i}", (f"attn_out.{i}", f"mlp_out.{i}")) for i in layers]
    if kind not in ("head", "attn_out", "mlp_out"):
        hint = ""
        if kind in ("attn", "mlp"):
            hint = f" (did you mean {kind + '_out' if kind == 'mlp' else 'attn_out'}.L?)"
        raise InputError(f"{option}: component {text!r} cannot be ablated{hint}; "
                         f"expected {FORMS}")
    try:
        names = lm.expand_sites(text)
    except InputError as exc:
        raise InputError(f"{option}: component {text!r}: {exc}") from None
    return [(n, (n,)) for n in names]


def parse_sets(lm, values, option: str = "--components") -> list[ComponentSet]:
    """``--components`` values -> sets (``,`` separates sets, ``+`` joins components)."""
    out = []
    for value in values or ():
        for chunk in str(value).split(","):
            chunk = chunk.strip()
            if not chunk:
                continue
            comps: list[str] = []
            sites: list[str] = []
            for piece in chunk.split("+"):
                if not piece.strip():
                    raise InputError(f"{option}: empty component in {chunk!r}")
                for name, ss in expand_component(lm, piece, option):
                    if name not in comps:
                        comps.append(name)
                        sites += [s for s in ss if s not in sites]
            name = "+".join(p.strip() for p in chunk.split("+"))
            out.append(ComponentSet(name, tuple(comps), tuple(sites)))
    return out


def scan_sets(lm, scan: str) -> list[ComponentSet]:
    """``--scan heads|attn|mlp|layers``: each component alone."""
    return [ComponentSet(name, (name,), sites)
            for name, sites in expand_component(lm, SCANS[scan], "--scan")]


def rank_components(df, path: str, metric: str | None, kind: str | None,
                    rank_by: str) -> tuple[str, list[tuple[str, float, int]]]:
    """Mean score per single component of an effects table, ranked high to low.

    Rows: the metric's, without a steering strength, with one site (``site``), and of
    ``kind`` when given. Score: mean over rows of ``value - clean_value`` (``rank_by``
    effect, the change the intervention made) or of ``value``. Returns (metric,
    [(site, score, n_rows)]).
    """
    import pandas as pd

    need = [c for c in ("metric", "value", "site") if c not in df.columns]
    if need:
        raise InputError(f"--from {path}: missing column(s) {', '.join(need)}")
    d = df[df["site"].notna()]
    if "alpha" in d.columns:
        d = d[d["alpha"].isna()]
    metrics = sorted(set(d["metric"].astype(str)))
    if not metrics:
        raise InputError(f"--from {path}: no rows with a site to rank")
    if metric is None:
        if len(metrics) > 1:
            raise InputError(f"--by: {path} has several metrics ({', '.join(metrics)}); "
                             "name the one to rank by")
        metric = metrics[0]
    if metric not in metrics:
        raise InputError(f"--by {metric}: {path} has no rows with this metric (it has "
                         f"{', '.join(metrics)})")
    d = d[d["metric"] == metric]
    if "kind" in d.columns:
        kinds = sorted(set(d["kind"].dropna().astype(str)))
        if kind is not None:
            if kind not in kinds:
                raise InputError(f"--from-kind {kind}: {path} has no {metric} rows of this "
                                 f"kind (it has {', '.join(kinds) or 'none'})")
            d = d[d["kind"] == kind]
        elif len(kinds) > 1:
            raise InputError(f"--from-kind: {path} mixes kinds {', '.join(kinds)} for "
                             f"{metric}; name the one to rank by")
    if "component" in d.columns:
        d = d[~d["component"].fillna("").astype(str).str.contains("+", regex=False)]
    if rank_by == "effect":
        if "clean_value" not in d.columns or d["clean_value"].isna().all():
            raise InputError(f"--rank-by effect: {path} has no clean_value for {metric}; "
                             "use --rank-by value")
        score = pd.to_numeric(d["value"]) - pd.to_numeric(d["clean_value"])
    else:
        score = pd.to_numeric(d["value"])
    g = pd.DataFrame({"site": d["site"].astype(str), "s": score}).dropna()
    agg = g.groupby("site")["s"].agg(["mean", "size"]).reset_index()
    agg = agg.sort_values(["mean", "site"], ascending=[False, True], kind="mergesort")
    return metric, [(r.site, float(r.mean), int(r.size)) for r in agg.itertuples()]


def check_counts(ranked: list, metric: str, path: str, top: int | None,
                 bottom: int | None) -> None:
    """``--top/--bottom K``: a positive K no larger than the components the file offers."""
    for opt, k in (("--top", top), ("--bottom", bottom)):
        if k is None:
            continue
        if k < 1:
            raise InputError(f"{opt} {k}: expected a positive number of components")
        if k > len(ranked):
            raise InputError(f"{opt} {k}: {path} offers only {len(ranked)} component(s) with "
                             f"metric {metric}")


def pick_sets(lm, ranked: list[tuple[str, float, int]], metric: str, path: str,
              top: int | None, bottom: int | None, rank_by: str) -> list[ComponentSet]:
    """The top-K and bottom-K components, each selection one set ablated together."""
    check_counts(ranked, metric, path, top, bottom)
    out = []
    for opt, k, chosen in (("--top", top, ranked[:top or 0]),
                           ("--bottom", bottom, list(reversed(ranked))[:bottom or 0])):
        if k is None:
            continue
        comps, sites = [], []
        for site, _, _ in chosen:
            try:
                names = expand_component(lm, site, f"--from {path}")
            except InputError as exc:
                raise InputError(f"{exc} (is the effects file from another model?)") from None
            for name, ss in names:
                comps.append(name)
                sites += [s for s in ss if s not in sites]
        word = "top" if opt == "--top" else "bottom"
        label = f"{word}{k}[{metric}{' value' if rank_by == 'value' else ''}]"
        out.append(ComponentSet(label, tuple(comps), tuple(sites)))
    return out
