"""The figure registry: schema name -> small figure functions.

A figure function draws on a Figure it is given (so every figure of a kind has the same
pixel size) and is registered with a decorator:

- ``@figure(schema, name, ...)``: one file -> one figure (per variant, e.g. per metric).
- ``@compare(schema, name, ...)``: several files of one schema (e.g. one per model) ->
  one figure, side by side or overlaid, labelled by each file's model.
- ``@combo((primary, partner, ...), name, ...)``: files of several schemas joined on
  ``prompt_id`` (e.g. outcomes + the prompts they were scored on) -> one figure that
  overlays every model.

``plan(sources)`` turns loaded files into the list of figures to draw.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dolm.errors import InputError

Size = str | tuple[float, float]


@dataclass
class Source:
    """One loaded dolm file: its data (DataFrame, dict, or HDF5 path) and metadata."""

    path: str
    schema: str
    kind: str  # table | json | hdf5 | safetensors (data: its dolm.extra metadata)
    data: Any
    meta: Any  # dolm.formats.FileMeta
    stem: str = ""  # file-name stem for outputs, unique among the files of one plot run

    @property
    def model(self) -> dict[str, Any] | None:
        return self.meta.model_entry() if self.meta is not None else None

    @property
    def model_label(self) -> str:
        return model_label(self.model)


def model_label(entry: dict[str, Any] | None) -> str:
    """A short name for the model recorded in a provenance chain."""
    if not entry:
        return "none recorded"
    spec = str(entry.get("spec") or entry.get("name") or entry.get("architecture") or "?")
    if "/" in spec and Path(spec).exists():
        spec = Path(spec).name
    rev = entry.get("revision")
    if rev and str(rev) not in ("main", "None"):
        spec += f"@{str(rev)[:8]}"
    return spec


@dataclass(frozen=True)
class FigureSpec:
    name: str
    schemas: tuple[str, ...]
    mode: str  # single | compare | combo
    draw: Callable[..., None]
    what: str
    size: Size | Callable[..., Size] = "single"
    when: Callable[[Any], bool] | None = None
    variants: Callable[[Any], Sequence[str | None]] | None = None
    together: bool = False  # combo: every bundle in one figure (it groups them itself)

    def applies(self, inputs: Any) -> bool:
        return True if self.when is None else bool(self.when(inputs))

    def variants_for(self, inputs: Any) -> list[str | None]:
        return list(self.variants(inputs)) if self.variants else [None]

    def size_for(self, inputs: Any, variant: str | None = None) -> Size:
        if callable(self.size):
            return self.size(inputs, variant)
        return self.size


FIGURES: list[FigureSpec] = []


def _register(spec: FigureSpec) -> Callable:
    for old in FIGURES:
        if (old.name, old.schemas, old.mode) == (spec.name, spec.schemas, spec.mode):
            raise ValueError(f"figure {spec.name!r} for {spec.schemas} registered twice")
    FIGURES.append(spec)
    return spec.draw


def figure(schema: str, name: str, what: str, size: Any = "single", when=None, variants=None):
    """Register ``draw(fig, src: Source, variant)`` for one file of ``schema``."""
    return lambda f: _register(FigureSpec(name, (schema,), "single", f, what, size, when, variants))


def compare(schema: str, name: str, what: str, size: Any = "single", when=None, variants=None):
    """Register ``draw(fig, srcs: list[Source], variant)`` for several files of ``schema``.

    ``when(src)`` picks the files that take part; the figure is drawn when two or more do.
    """
    return lambda f: _register(
        FigureSpec(name, (schema,), "compare", f, what, size, when, variants)
    )


def combo(schemas: tuple[str, ...], name: str, what: str, size: Any = "single", when=None,
          variants=None, together: bool = False):
    """Register ``draw(fig, bundles: list[dict[schema, Source]], variant)``.

    The first schema is the primary one: one bundle per primary file, each with the
    partner file of every other schema that shares the most ``prompt_id`` values. Bundles
    share a figure when they are like with like (see ``like_with_like``), or all of them
    when ``together`` (the figure groups them itself, e.g. by model).
    """
    return lambda f: _register(FigureSpec(name, tuple(schemas), "combo", f, what, size, when,
                                          variants, together))


def load_all() -> list[FigureSpec]:
    """Import every figure module (each registers its figures) and return the registry."""
    from dolm_tools.plot import (  # noqa: F401
        fig_activations,
        fig_circuit,
        fig_cunit,
        fig_dag,
        fig_dla,
        fig_effects,
        fig_lens,
        fig_mediation,
        fig_patch,
        fig_prompts,
        fig_psm,
        fig_steer,
    )

    return FIGURES


def known_schemas() -> list[str]:
    """Schemas dolm-plot draws (those with at least one single-file or compare figure)."""
    load_all()
    return sorted({s for f in FIGURES for s in f.schemas})


def specs_for(schema: str, mode: str) -> list[FigureSpec]:
    load_all()
    return [f for f in FIGURES if f.mode == mode and f.schemas[0] == schema]


# ------------------------------------------------------------------ planning


@dataclass
class Plot:
    """One figure to draw: the spec, its inputs, the variant and the output stem."""

    spec: FigureSpec
    inputs: Any  # Source | list[Source] | list[dict[str, Source]]
    variant: str | None
    stem: str
    sources: list[Source] = field(default_factory=list)

    @property
    def size(self) -> Size:
        return self.spec.size_for(self.inputs, self.variant)

    def filename(self, fmt: str) -> str:
        return f"{self.stem}.{fmt}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(text)).strip("_") or "x"


def _stem(*parts: str | None) -> str:
    return ".".join(_slug(p) for p in parts if p)


def plan(sources: list[Source], compare_models: bool = True) -> list[Plot]:
    """Every figure for these files: per file, per schema group, and joined combos."""
    load_all()
    plots: list[Plot] = []
    by_schema: dict[str, list[Source]] = {}
    for src in sources:
        by_schema.setdefault(src.schema, []).append(src)
    for src in sources:
        for spec in specs_for(src.schema, "single"):
            if spec.applies(src):
                for v in spec.variants_for(src):
                    plots.append(Plot(spec, src, v, _stem(src.stem, spec.name, v), [src]))
    if compare_models:
        for schema, group in by_schema.items():
            if len(group) < 2:
                continue
            for spec in specs_for(schema, "compare"):
                for fit in like_with_like([s for s in group if spec.applies(s)]):
                    for v in spec.variants_for(fit):
                        plots.append(Plot(spec, fit, v, _stem("compare", schema, spec.name, v),
                                          fit))
    for spec in (f for f in FIGURES if f.mode == "combo"):
        primary, *partners = spec.schemas
        if primary not in by_schema or any(p not in by_schema for p in partners):
            continue
        complete = []
        for src in by_schema[primary]:
            bundle = {primary: src}
            for p in partners:
                match = best_partner(src, by_schema[p])
                if match is not None:
                    bundle[p] = match
            if len(bundle) == len(spec.schemas):
                complete.append(bundle)
        # one figure per group of like files (several models on one prompt set), else per file
        if spec.together and complete:
            grouped = [[b[primary] for b in complete]]
        else:
            grouped = like_with_like([b[primary] for b in complete]) if compare_models else []
        in_groups = {id(s) for g in grouped for s in g}
        sets = [[b for b in complete if any(b[primary] is x for x in g)] for g in grouped]
        sets += [[b] for b in complete if id(b[primary]) not in in_groups]
        for bundles in sets:
            if not spec.applies(bundles):
                continue
            stem = (bundles[0][primary].stem if len(bundles) == 1
                    else "all" if spec.together else "compare")
            used = [s for b in bundles for s in b.values()]
            for v in spec.variants_for(bundles):
                plots.append(Plot(spec, bundles, v, _stem(stem, spec.name, v), used))
    return plots


#: schemas whose files written from the same inputs are variants of one fit, drawn together
#: (e.g. cunit ablation fits of one data table); for other schemas the same inputs do not
#: make files alike (mediation summaries of two outcome metrics, probes of two labels)
FITS_OF_ONE_TABLE = frozenset({"cunit_metrics"})


def like_key(src: Source) -> Any:
    """What files must share to be drawn together: the prompt set of a table, the node
    set of a DAG, else, for fits (``FITS_OF_ONE_TABLE``), the input files (by sha256) of the
    step that wrote them; None otherwise."""
    if src.schema == "dag" and isinstance(src.data, dict):
        return ("nodes", frozenset(str(n) for n in src.data.get("nodes") or []))
    ids = _prompt_ids(src)
    if ids:
        return ("prompts", frozenset(ids))
    if src.schema not in FITS_OF_ONE_TABLE:
        return None
    chain = src.meta.provenance if src.meta is not None else []
    inputs = (chain[-1].get("inputs") or []) if chain else []
    shas = frozenset(str(i.get("sha256")) for i in inputs if i.get("sha256"))
    return ("inputs", shas) if shas else None


def like_with_like(srcs: list[Source]) -> list[list[Source]]:
    """Groups of two or more files that may share one comparison figure.

    Like with like only: the same prompt set, each file from a different model (the same
    study on several models; several files of one model are not "models compared"); the
    same nodes (a learned DAG beside its own truth); or the same inputs (e.g. several fits
    of one data table).
    """
    groups: dict[Any, list[Source]] = {}
    for s in srcs:
        groups.setdefault(like_key(s), []).append(s)
    out = []
    for key, group in groups.items():
        if len(group) < 2:
            continue
        if key is None or key[0] == "prompts":
            labels = [s.model_label for s in group if s.model]
            if len(labels) < len(group) or len(set(labels)) < len(group):
                continue
        out.append(group)
    return out


def best_partner(src: Source, candidates: list[Source]) -> Source | None:
    """The candidate table sharing the most ``prompt_id`` values with ``src`` (None if none)."""
    ids = _prompt_ids(src)
    best, best_n = None, 0
    for cand in candidates:
        n = len(ids & _prompt_ids(cand))
        if n > best_n:
            best, best_n = cand, n
    return best


def _prompt_ids(src: Source) -> set[str]:
    df = src.data
    if src.kind != "table" or "prompt_id" not in getattr(df, "columns", []):
        return set()
    return set(df["prompt_id"].astype(str))


def label_sources(sources: list[Source]) -> None:
    """Give each source a unique output stem (file name without suffix)."""
    stems: dict[str, int] = {}
    for src in sources:
        base = _slug(_file_stem(src.path))
        n = stems.get(base, 0)
        stems[base] = n + 1
        src.stem = base if n == 0 else f"{base}_{n + 1}"
def unique_labels(srcs: list[Source]) -> list[str]:
    """Model labels for files drawn together, with the file stem added where two coincide."""
    labels = [s.model_label if s.model else s.stem for s in srcs]
    return [lab if labels.count(lab) == 1 else f"{lab} ({s.stem})"
            for s, lab in zip(srcs, labels, strict=True)]


def _file_stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".parquet", ".pq", ".json", ".h5", ".hdf5", ".safetensors", ".csv", ".tsv",
                   ".jsonl"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


# ------------------------------------------------------------------ loading


def load_source(path: str, run: Any = None) -> Source:
    """Read and validate one dolm file for plotting (exit 3 on anything plot cannot use)."""
    import os

    from dolm.formats import read_h5, read_json, read_meta, read_table
    from dolm.formats.schema import available_schemas, schema_kind

    if path != "-" and not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, expected a dolm file (use `dolm-plot report`)")
    meta = read_meta(path)
    known = known_schemas()
    if meta.schema is None:
        raise InputError(
            f"{path}: not a dolm file (no dolm.schema metadata); dolm-plot draws these "
            f"schemas: {', '.join(known)}"
        )
    if meta.schema not in known:
        raise InputError(
            f"{path}: dolm-plot does not know how to draw schema {meta.schema!r}; "
            f"it knows: {', '.join(known)}"
        )
    if meta.schema not in available_schemas():
        raise InputError(f"{path}: schema {meta.schema!r} is not installed in schemas/")
    kind = schema_kind(meta.schema)
    if kind == "table":
        df, meta = read_table(path, run=run)
        if len(df) == 0:
            raise InputError(f"{path}: empty {meta.schema!r} table (no rows to plot)")
        return Source(path, meta.schema, "table", df, meta)
    if kind == "hdf5":
        fh, meta = read_h5(path, run=run)
        fh.close()
        return Source(path, meta.schema, "hdf5", path, meta)
    if kind == "safetensors":  # the metadata only: plot never loads the tensors
        from dolm.formats import describe_safetensors
        from dolm.formats.schema import check_json, load_schema

        problems = check_json(describe_safetensors(path), load_schema(meta.schema, meta.version),
                              path)
        if problems:
            raise InputError("\n  ".join(problems[:8]))
        if run is not None:
            run.add_input(path, meta)
        return Source(path, meta.schema, "safetensors", meta.extra, meta)
    obj, meta = read_json(path, run=run)
    return Source(path, meta.schema, "json", obj, meta)
