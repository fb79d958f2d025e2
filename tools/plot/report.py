"""``dolm-plot report RUN_DIR``: one self-contained HTML page for a run, by study.

The page opens with the studies the run holds and their headline numbers (the answer to
each causal question, with 95% intervals); then one section per study: the question, the
answer in numbers, the figures that show it, and the rest collapsed (every other figure,
the figures not drawn and why, each file's table head and provenance chain). A file index
closes the page. Studies are recognised by folder (see ``dolm_tools.plot.studies``); files
of folders no study claims are reported by folder. Figures are embedded as PNG (palette
quantised); figures compare files only like with like, and degenerate figures are skipped
with the reason.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dolm.errors import InputError
from dolm_tools.plot import style
from dolm_tools.plot.draw import DegenerateFigure, render
from dolm_tools.plot.registry import (
    Plot,
    Source,
    known_schemas,
    label_sources,
    load_source,
    model_label,
    plan,
)
from dolm_tools.plot.studies import STUDIES, Answer, Study, borrowed, study_for_folder

SKIP_SUFFIXES = (".png", ".svg", ".pdf", ".html", ".partial", ".tmp", ".log", ".txt", ".md",
                 ".journal")
HEAD_ROWS = 8
MAX_COLS = 12
KEY_FIGURES = 4


@dataclass
class Entry:
    """One file of the run: loaded for plotting (``source``) or only described."""

    path: Path
    meta: Any
    source: Source | None = None
    note: str = ""
    key: str = ""  # the file's name within its study (e.g. fit/dag.json, dilemma/lens.parquet)


@dataclass
class Group:
    """A study (or an unclaimed folder) of the run: its files, figures and answer."""

    key: str
    title: str
    study: Study | None
    entries: list[Entry] = field(default_factory=list)
    figures: list[tuple[Plot, bytes]] = field(default_factory=list)
    skipped: list[tuple[Plot, str]] = field(default_factory=list)
    answer: Answer = field(default_factory=Answer)
    error: str = ""
    key_count: int = 0  # the first key_count figures show the answer; the rest go in details

    @property
    def anchor(self) -> str:
        return "s-" + "".join(c if c.isalnum() else "-" for c in self.key)


def find_files(run_dir: Path) -> list[Path]:
    """Candidate dolm files under ``run_dir`` (recursive, sorted, hidden files skipped)."""
    out = []
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.lower().endswith(SKIP_SUFFIXES):
                continue
            out.append(Path(root) / name)
    return out


def load_entries(run_dir: Path) -> list[Entry]:
    from dolm.formats import read_meta, sniff

    known = set(known_schemas())
    entries: list[Entry] = []
    for path in find_files(run_dir):
        if sniff(str(path)) == "unknown":
            continue
        meta = read_meta(str(path))
        if meta.schema is None:
            continue
        entry = Entry(path, meta)
        if meta.schema not in known:
            entry.note = f"no figures for schema {meta.schema!r}"
        else:
            try:
                entry.source = load_source(str(path))
            except InputError as exc:
                if "empty" not in str(exc):
                    raise
                entry.note = "empty table: nothing to draw"
        entries.append(entry)
    if not entries:
        raise InputError(f"{run_dir}: no dolm files found (Parquet, HDF5 or JSON with a "
                         "dolm.schema)")
    return entries


def group_entries(run_dir: Path, entries: list[Entry]) -> list[Group]:
    """Files by study: the folder a file lies in names its study (the run folder itself
    when it is a study's); files of other folders are grouped by folder."""
    own = study_for_folder(run_dir.resolve().name)
    groups: dict[str, Group] = {}
    for e in entries:
        rel = e.path.relative_to(run_dir)
        study = borrowed(rel)
        if study is not None:
            e.key = "/".join(rel.parts[-2:])
        elif own is not None:
            study, e.key = own, str(rel.as_posix())
        elif len(rel.parts) > 1 and study_for_folder(rel.parts[0]) is not None:
            study = study_for_folder(rel.parts[0])
            e.key = Path(*rel.parts[1:]).as_posix()
        if study is not None:
            g = groups.setdefault(study.key, Group(study.key, study.title, study))
        else:
            folder = rel.parts[0] if len(rel.parts) > 1 else "."
            e.key = Path(*rel.parts[1:]).as_posix() if folder != "." else rel.as_posix()
            g = groups.setdefault(f"folder:{folder}", Group(
                f"folder:{folder}", f"Files in {folder if folder != '.' else 'the run folder'}",
                None))
        g.entries.append(e)
    order = [s.key for s in STUDIES]
    return sorted(groups.values(), key=lambda g: (order.index(g.key) if g.key in order
                                                  else len(order), g.key))


def truth_sources(entries: list[Entry]) -> list[Source]:
    """The true DAG a variables table carries in its metadata (simulated data), as a
    source to draw beside the DAG learned from it."""
    out = []
    for e in entries:
        src = e.source
        if src is None or src.schema != "variables":
            continue
        dag = (src.meta.extra or {}).get("true_dag")
        if isinstance(dag, dict) and dag.get("nodes"):
            out.append(Source(src.path, "dag", "json", dag, None,
                              stem=f"true graph ({Path(src.path).name})"))
    return out


def plan_group(g: Group) -> list[Plot]:
    sources = [e.source for e in g.entries if e.source is not None]
    label_sources(sources)
    truths = truth_sources(g.entries)
    for s in sources:
        if s.schema == "dag" and truths:
            s.stem = f"learned ({Path(s.path).parent.name}/{Path(s.path).name})"
    plots = plan(sources + truths)
    # a true graph is drawn beside its learned graph, never alone
    return [p for p in plots
            if not (p.spec.mode == "single" and any(p.inputs is t for t in truths))]


def order_figures(g: Group) -> None:
    """The study's key figures first, in the study's order; the rest after."""
    if g.study is None:
        return
    keyed = {id(e.source): e.key for e in g.entries if e.source is not None}

    def rank(item: tuple[Plot, bytes]) -> int:
        plot = item[0]
        names = [keyed.get(id(s), Path(s.path).name) for s in plot.sources]
        for i, (pattern, fig, variant) in enumerate(g.study.key_figures):
            if plot.spec.name == fig and (variant is None or plot.variant == variant) and any(
                    fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(Path(n).name, pattern)
                    for n in names):
                return i
        return len(g.study.key_figures)

    g.figures.sort(key=rank)
    n_key = sum(1 for f in g.figures if rank(f) < len(g.study.key_figures))
    g.key_count = min(n_key, KEY_FIGURES)


def compact_png(png: bytes) -> bytes:
    """The same image as a palette PNG (256 colours): a third of the bytes or less."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        q = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=0)
        buf = io.BytesIO()
        q.save(buf, format="PNG", optimize=True)
    data = buf.getvalue()
    return data if len(data) < len(png) else png


def collect(run_dir: Path, progress: Any = None) -> list[Group]:
    """Load, group by study, draw (skipping degenerate figures) and answer each study."""
    groups = group_entries(run_dir, load_entries(run_dir))
    work = [(g, p) for g in groups for p in plan_group(g)]
    for g, plot in (progress(work) if progress else work):
        try:
            fig = render(plot)
        except DegenerateFigure as exc:
            g.skipped.append((plot, exc.reason))
            continue
        g.figures.append((plot, compact_png(style.figure_bytes(fig, "png"))))
    for g in groups:
        order_figures(g)
        if g.study is not None:
            files = {e.key: e.source for e in g.entries if e.source is not None}
            try:
                g.answer = g.study.answer(files)
            except (KeyError, ValueError, TypeError, AttributeError, IndexError) as exc:
                g.error = (f"the headline numbers could not be read from these files "
                           f"({type(exc).__name__}: {exc})")
    return groups


# ------------------------------------------------------------------ HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1em auto;
max-width:1300px;color:#222;padding:0 1em;font-size:14px}
h1{font-size:1.45em;margin:.3em 0}h2{font-size:1.25em;border-bottom:1px solid #ccc;
margin-top:2em}h3{font-size:1.05em;margin-top:1.2em}
table{border-collapse:collapse;font-size:12.5px;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}code{font-size:12px}caption{text-align:left;font-size:12px;color:#555;
padding:2px 0}
table.overview{width:100%;font-size:13px}table.overview td{padding:4px 8px}
table.overview td.q{color:#444;max-width:430px}table.overview .hl{white-space:nowrap}
table.overview .hl b{font-weight:600}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
.figs{display:flex;flex-wrap:wrap;gap:0 1.2em;align-items:flex-start}
.figs figure{flex:1 1 560px;max-width:100%}.figs figure.wide{flex-basis:100%}
figcaption{font-size:12px;color:#555}.note{color:#a60}.muted{color:#777;font-size:12px}
.question{font-size:15px}.answers{display:flex;flex-wrap:wrap;gap:0 2em;align-items:flex-start}
.cap{font-size:12px;color:#555;margin:.6em 0 0;max-width:560px}
details{margin:.8em 0;border:1px solid #e4e4e4;padding:.3em .8em;
border-radius:4px}summary{cursor:pointer;font-weight:600}
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def anchor(path: Path, run_dir: Path) -> str:
    return "f-" + "".join(c if c.isalnum() else "-" for c in str(path.relative_to(run_dir)))


def img(plot: Plot, png: bytes, prefix: str = "", keys: dict | None = None) -> str:
    """A figure (``keys``: source path -> the file's name within its study, for captions)."""
    data = base64.b64encode(png).decode("ascii")
    name = esc(plot.stem)
    files = ", ".join(dict.fromkeys((keys or {}).get(s.path) or Path(s.path).name
                                    for s in plot.sources))
    cls = ' class="wide"' if style.pixels(plot.size)[0] > 1000 else ""
    return (f'<figure id="{esc(prefix)}{name}"{cls}>'
            f'<img alt="{name}" '
            f'src="data:image/png;base64,{data}"><figcaption><b>{name}</b>: '
            f"{esc(plot.spec.what)} <span class=\"muted\">({esc(files)})</span></figcaption>"
            "</figure>")


def table_head(df: Any) -> str:
    cols = list(df.columns)[:MAX_COLS]
    head = df[cols].head(HEAD_ROWS)
    rows = ["<tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"]
    for rec in head.itertuples(index=False):
        rows.append("<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in rec) + "</tr>")
    more = f" ({len(df.columns) - MAX_COLS} more columns not shown)" if len(df.columns) > \
        MAX_COLS else ""
    return (f'<p class="muted">{len(df)} rows × {len(df.columns)} columns; first '
            f"{len(head)} rows{more}</p><table>{''.join(rows)}</table>")


def _cell(v: Any, n: int = 60) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, list):
        v = "[" + ", ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in v) + "]"
    return style.short(str(v), n)


def key_numbers(obj: Any, prefix: str = "", depth: int = 0, out: list | None = None) -> list:
    """(key, value) for the scalar entries of a JSON summary, two levels deep."""
    out = [] if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "dolm" and depth == 0:
                continue
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, (int, float, str, bool)) or v is None:
                out.append((key, v))
            elif depth < 2 and isinstance(v, dict):
                key_numbers(v, key, depth + 1, out)
            elif isinstance(v, list):
                out.append((key, f"list of {len(v)}"))
    return out


def column_tables(obj: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, dict]]:
    """Dicts whose list values have one length (e.g. per-layer KL: layer, logit, tuned)."""
    out: list[tuple[str, dict]] = []
    if not isinstance(obj, dict) or depth > 2:
        return out
    lists = {k: v for k, v in obj.items() if isinstance(v, list) and v
             and all(isinstance(x, (int, float, str, type(None))) for x in v)}
    if len(lists) >= 2 and len({len(v) for v in lists.values()}) == 1 and \
            len(next(iter(lists.values()))) <= 64:
        out.append((prefix, lists))
    for k, v in obj.items():
        if isinstance(v, dict) and not (k == "dolm" and depth == 0):
            out += column_tables(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
    return out


def json_summary(obj: Any, limit: int = 24) -> str:
    pairs = key_numbers(obj)
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_cell(v, 120))}</td></tr>"
                   for k, v in pairs[:limit])
    more = f'<p class="muted">… {len(pairs) - limit} more entries</p>' if len(pairs) > limit \
        else ""
    html_ = f"<table>{rows}</table>{more}" if rows else '<p class="muted">no scalar entries</p>'
    for name, cols in column_tables(obj):
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{esc(_cell(cols[c][i]))}</td>" for c in cols)
                       + "</tr>" for i in range(len(next(iter(cols.values())))))
        html_ += (f'<p class="muted">{esc(name or "values")}</p>'
                  f"<table><tr>{head}</tr>{body}</table>")
    return html_


def h5_summary(path: str) -> str:
    import h5py

    rows = []
    with h5py.File(path, "r") as fh:
        for name in sorted(fh.keys()):
            ds = fh[name]
            if hasattr(ds, "shape"):
                rows.append(f"<tr><td>{esc(name)}</td><td>{esc(tuple(ds.shape))}</td>"
                            f"<td>{esc(ds.dtype)}</td></tr>")
    shown = rows[:30]
    more = f'<p class="muted">… {len(rows) - 30} more datasets</p>' if len(rows) > 30 else ""
    return ("<table><tr><th>dataset</th><th>shape</th><th>dtype</th></tr>"
            f"{''.join(shown)}</table>{more}")


def provenance(chain: list[dict]) -> str:
    if not chain:
        return '<p class="note">no provenance recorded</p>'
    head = ("<tr><th>#</th><th>tool</th><th>argv</th><th>inputs</th><th>model</th>"
            "<th>seed</th><th>started</th><th>duration</th></tr>")
    rows = []
    for i, e in enumerate(chain):
        inputs = "<br>".join(
            f"{esc(x.get('path'))} <code>{esc((x.get('sha256') or '')[:12])}</code>"
            for x in e.get("inputs") or [])
        m = e.get("model")
        model = "" if not m else esc(model_label(m)) + (
            f" <code>{esc(str(m.get('weights_sha256') or '')[:12])}</code>"
            if m.get("weights_sha256") else "")
        argv = " ".join(str(a) for a in e.get("argv") or [])
        dur = e.get("duration_s")
        rows.append(
            f"<tr><td>{i + 1}</td><td>{esc(e.get('tool'))} {esc(e.get('version') or '')}</td>"
            f"<td><code>{esc(style.short(argv, 200))}</code></td><td>{inputs}</td>"
            f"<td>{model}</td><td>{esc(e.get('seed'))}</td><td>{esc(e.get('started') or '')}"
            f"</td><td>{'' if dur is None else f'{float(dur):.2f} s'}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def file_details(e: Entry, run_dir: Path) -> str:
    rel = e.path.relative_to(run_dir)
    model = model_label(e.meta.model_entry())
    parts = [f'<details id="{anchor(e.path, run_dir)}"><summary>{esc(rel)} '
             f'<span class="muted">— {esc(e.meta.schema)} v{esc(e.meta.version)}, model '
             f"{esc(model)}</span></summary>"]
    if e.note:
        parts.append(f'<p class="note">{esc(e.note)}</p>')
    src = e.source
    if src is not None and src.kind == "table":
        parts.append(table_head(src.data))
    elif src is not None and src.kind in ("json", "safetensors"):
        parts.append(json_summary(src.data))
    elif src is not None and src.kind == "hdf5":
        parts.append(h5_summary(src.data))
    elif e.meta.schema is not None and e.path.suffix == ".json":
        try:
            parts.append(json_summary(json.loads(e.path.read_text())))
        except ValueError:
            pass
    parts.append("<h3>Provenance</h3>" + provenance(e.meta.provenance))
    parts.append("</details>")
    return "\n".join(parts)


def headline_cell(g: Group) -> str:
    if g.error:
        return f'<span class="note">{esc(g.error)}</span>'
    if not g.answer.headline:
        return '<span class="muted">no summary numbers in these files</span>'
    return "<br>".join(f'<span class="hl">{esc(k)}: <b>{esc(v)}</b></span>'
                       for k, v in g.answer.headline)


def overview(groups: list[Group]) -> str:
    rows = []
    for g in groups:
        q = g.study.question.split("? ")[0].rstrip("?") + "?" if g.study else \
            f"{len(g.entries)} files no study claims"
        rows.append(f'<tr><td><a href="#{g.anchor}"><b>{esc(g.title)}</b></a></td>'
                    f'<td class="q">{esc(q)}</td><td>{headline_cell(g)}</td></tr>')
    return ('<table class="overview" id="studies"><tr><th>study</th><th>causal question</th>'
            "<th>answer (95% CI)</th></tr>" + "".join(rows) + "</table>")


def group_section(g: Group, run_dir: Path) -> str:
    n_key = g.key_count if g.study else min(len(g.figures), KEY_FIGURES)
    key, rest = g.figures[:n_key], g.figures[n_key:]
    parts = [f'<section><h2 id="{g.anchor}">{esc(g.title)}</h2>']
    if g.study is not None:
        parts.append(f'<p class="question"><b>Question.</b> {esc(g.study.question)}</p>')
        if g.error:
            parts.append(f'<p class="note">{esc(g.error)}</p>')
        if g.answer.tables or g.answer.notes:
            parts.append('<p><b>Answer.</b></p><div class="answers">' + "".join(g.answer.tables)
                         + "</div>" + "".join(f"<p>{esc(n)}</p>" for n in g.answer.notes))
    prefix = g.anchor + "-"
    keys = {str(e.path): e.key for e in g.entries}
    if key:
        parts.append('<div class="figs">' + "".join(img(p, png, prefix, keys) for p, png in key)
                     + "</div>")
    files = g.entries
    summary = (f"Details: {len(rest)} more figure(s), {len(g.skipped)} not drawn, "
               f"{len(files)} file(s) with their provenance")
    parts.append(f"<details><summary>{esc(summary)}</summary>")
    if rest:
        parts.append('<div class="figs">' + "".join(img(p, png, prefix, keys) for p, png in rest)
                     + "</div>")
    if g.skipped:
        parts.append("<h3>Figures not drawn</h3><ul>" + "".join(
            f"<li><b>{esc(p.stem)}</b> ({esc(', '.join(Path(s.path).name for s in p.sources))})"
            f": {esc(reason)}</li>" for p, reason in g.skipped) + "</ul>")
    parts.append("<h3>Files</h3>" + "".join(file_details(e, run_dir) for e in files))
    parts.append("</details></section>")
    return "\n".join(parts)


def file_index(groups: list[Group], run_dir: Path) -> str:
    rows = []
    for g in groups:
        for e in g.entries:
            src = e.source
            size = (f"{len(src.data)} rows" if src is not None and src.kind == "table" else "")
            n_fig = sum(1 for p, _ in g.figures if any(s.path == str(e.path) for s in p.sources))
            rows.append(f'<tr><td><a href="#{anchor(e.path, run_dir)}">'
                        f"{esc(e.path.relative_to(run_dir))}</a></td><td>{esc(e.meta.schema)}</td>"
                        f'<td>{esc(size)}</td><td><a href="#{g.anchor}">{esc(g.title)}</a></td>'
                        f"<td>{n_fig}</td></tr>")
    return ('<h2 id="files">File index</h2><table><tr><th>file</th><th>schema</th><th>size</th>'
            "<th>study</th><th>figures</th></tr>" + "".join(rows) + "</table>")


def build_html(run_dir: Path, groups: list[Group]) -> str:
    from dolm import __version__

    n_fig = sum(len(g.figures) for g in groups)
    n_files = sum(len(g.entries) for g in groups)
    n_skip = sum(len(g.skipped) for g in groups)
    models = sorted({model_label(e.meta.model_entry()) for g in groups for e in g.entries
                     if e.meta.model_entry()})
    name = run_dir.resolve().name or str(run_dir)
    body = [f"<h1>dolm report: {esc(name)}</h1>",
            f'<p class="muted">{len(groups)} studies, {n_fig} figures ({n_skip} degenerate '
            f'ones not drawn), <a href="#files">{n_files} files</a>; model '
            f"{esc(', '.join(models) or 'none recorded')}; drawn by dolm-plot "
            f"{esc(__version__)} from <code>{esc(run_dir)}</code></p>",
            overview(groups)]
    body.extend(group_section(g, run_dir) for g in groups)
    body.append(file_index(groups, run_dir))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>dolm report: {esc(name)}</title><style>{CSS}</style></head>"
            f"<body>\n{chr(10).join(body)}\n</body></html>\n")


def write_report(run_dir: str | Path, output: str | Path, force: bool,
                 progress: Any = None) -> tuple[int, int]:
    """Build the report; return (files, figures)."""
    from dolm.formats import atomic_path

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise InputError(f"{run_dir}: folder not found")
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a folder (give the run directory)")
    if str(output) != "-" and Path(output).exists() and not force:
        raise InputError(f"--output {output}: file exists; pass --force to overwrite it")
    style.setup()
    groups = collect(run_dir, progress)
    text = build_html(run_dir, groups)
    if str(output) == "-":
        import sys

        sys.stdout.write(text)
    else:
        with atomic_path(output, force) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return sum(len(g.entries) for g in groups), sum(len(g.figures) for g in groups)
