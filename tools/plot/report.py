"""``dolm-plot report RUN_DIR``: one self-contained HTML page for a run.

Every figure dolm-plot can draw from the run's files (embedded as base64 PNG), a short
table per file (the head of a table, the key numbers of a JSON summary, the datasets of
an HDF5 file) and each file's provenance chain (tool, argv, inputs, model, seed,
duration). Files of schemas plot has no figure for are listed with their provenance.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dolm.errors import InputError
from dolm_tools.plot import style
from dolm_tools.plot.draw import render
from dolm_tools.plot.registry import (
    Plot,
    Source,
    known_schemas,
    label_sources,
    load_source,
    model_label,
    plan,
)

SKIP_SUFFIXES = (".png", ".svg", ".pdf", ".html", ".partial", ".tmp", ".log", ".txt", ".md",
                 ".journal")
HEAD_ROWS = 8
MAX_COLS = 12


@dataclass
class Entry:
    """One file of the run: loaded for plotting (``source``) or only described."""

    path: Path
    meta: Any
    source: Source | None = None
    note: str = ""
    figures: list[tuple[Plot, bytes]] = field(default_factory=list)


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


def collect(run_dir: Path, progress: Any = None) -> tuple[list[Entry], list[tuple[Plot, bytes]]]:
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
    sources = [e.source for e in entries if e.source is not None]
    label_sources(sources)
    plots = plan(sources)
    by_src = {id(e.source): e for e in entries if e.source is not None}
    across: list[tuple[Plot, bytes]] = []
    it = progress(plots) if progress else plots
    for plot in it:
        fig = render(plot)
        png = style.figure_bytes(fig, "png")
        if plot.spec.mode == "single":
            by_src[id(plot.inputs)].figures.append((plot, png))
        else:
            across.append((plot, png))
    return entries, across


# ------------------------------------------------------------------ HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ccc;margin-top:2em}
h3{font-size:1.05em;margin-top:1.4em}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}code{font-size:12px}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:12px;color:#555}.note{color:#a60}.muted{color:#777;font-size:12px}
nav li{font-size:13px}
"""


def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def anchor(path: Path, run_dir: Path) -> str:
    return "f-" + "".join(c if c.isalnum() else "-" for c in str(path.relative_to(run_dir)))


def img(plot: Plot, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    name = esc(plot.stem)
    return (f'<figure id="{name}"><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{name}</b>: {esc(plot.spec.what)}</figcaption></figure>")


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


def file_section(e: Entry, run_dir: Path) -> str:
    rel = e.path.relative_to(run_dir)
    model = model_label(e.meta.model_entry())
    parts = [f'<h2 id="{anchor(e.path, run_dir)}">{esc(rel)}</h2>',
             f"<p>schema <b>{esc(e.meta.schema)}</b> v{esc(e.meta.version)} · model "
             f"<b>{esc(model)}</b></p>"]
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
    parts.extend(img(p, png) for p, png in e.figures)
    parts.append("<h3>Provenance</h3>" + provenance(e.meta.provenance))
    return "\n".join(parts)


def build_html(run_dir: Path, entries: list[Entry], across: list[tuple[Plot, bytes]]) -> str:
    from dolm import __version__

    n_fig = len(across) + sum(len(e.figures) for e in entries)
    nav = "".join(
        f'<li><a href="#{anchor(e.path, run_dir)}">{esc(e.path.relative_to(run_dir))}</a> '
        f"— {esc(e.meta.schema)}, {len(e.figures)} figure(s)</li>" for e in entries)
    if across:
        nav = (f'<li><a href="#across">Across files</a> — {len(across)} figure(s) comparing '
               "models or joining tables</li>") + nav
    body = [f"<h1>dolm report: {esc(run_dir.name or run_dir)}</h1>",
            f'<p class="muted">{len(entries)} files, {n_fig} figures; drawn by dolm-plot '
            f"{esc(__version__)} from <code>{esc(run_dir)}</code></p>",
            f"<nav><ul>{nav}</ul></nav>"]
    if across:
        body.append('<h2 id="across">Across files (models compared, tables joined)</h2>')
        body.extend(img(p, png) for p, png in across)
    body.extend(file_section(e, run_dir) for e in entries)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>dolm report: {esc(run_dir.name)}</title><style>{CSS}</style></head>"
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
    style.setup()
    entries, across = collect(run_dir, progress)
    text = build_html(run_dir, entries, across)
    if str(output) == "-":
        import sys

        sys.stdout.write(text)
    else:
        with atomic_path(output, force) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return len(entries), len(across) + sum(len(e.figures) for e in entries)
