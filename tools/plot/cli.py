"""``dolm-plot``: figures from dolm files, chosen by each file's schema.

    dolm-plot FILE... -o DIR [--format png|svg|pdf] [--only NAME] [--force]
    dolm-plot dag FILE... -o OUT
    dolm-plot report RUN_DIR -o report.html
    dolm-plot list

Several files of one schema are also drawn side by side or overlaid, like with like only
(the same prompt set on several models, a learned DAG beside its truth), labelled by the
model in each file's provenance; outcomes and the prompts they were scored on are joined on
prompt_id. Degenerate figures (one x value, an axis with no data) are never drawn.
"""

from __future__ import annotations

from typing import Any

import click
from dolm.cli import CONTEXT_SETTINGS, DefaultCommandGroup, log, progress, subcommand
from dolm.errors import InputError

FORMATS = ("png", "svg", "pdf")


@click.group(name="dolm-plot", cls=DefaultCommandGroup,
             default_command="files", context_settings=CONTEXT_SETTINGS)
def main() -> None:
    """Figures from dolm files, chosen by each file's schema.

    \b
      dolm-plot FILE... -o DIR      every figure for these files (PNG by default)
      dolm-plot dag FILE... -o OUT  causal diagrams from dag files
      dolm-plot report RUN_DIR -o report.html
      dolm-plot list                which figures each schema gets
    """


def _format_option(f: Any) -> Any:
    return click.option("--format", "fmt", type=click.Choice(FORMATS), default="png",
                        show_default=True, help="Image format.")(f)


@subcommand(main, "files", "plot", outputs=())
@click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Folder for the figures (created if missing).")
@_format_option
@click.option("--only", multiple=True, metavar="NAME",
              help="Draw only this figure (repeatable), e.g. --only trace.")
@click.option("--no-compare", is_flag=True,
              help="Do not draw multi-file comparison figures.")
@click.option("--force", is_flag=True, help="Overwrite existing figures.")
def files(run: Any, files: tuple[str, ...], output: str, fmt: str, only: tuple[str, ...],
          no_compare: bool, force: bool) -> None:
    """Draw every figure FILES support into the folder -o DIR.

    Output names are <file>.<figure>[.<metric>].<format>; figures comparing several
    files (several models on one prompt set, DAGs over the same nodes, fits of one data
    table) are compare.<schema>.<figure>... A degenerate figure (a line plot with a single
    x value, a panel with no data) is skipped with a note on stderr; asked for by name with
    --only, it is an error (exit 3) and nothing is written.
    """
    from dolm_tools.plot.draw import draw_all, load_sources

    sources = load_sources(files, run=run)
    written = draw_all(sources, output, fmt, force, only=only, compare_models=not no_compare,
                       progress=lambda it: progress(it, desc="drawing", unit="fig"),
                       on_skip=lambda exc: log(f"dolm-plot: skipped {exc}"))
    for path in written:
        click.echo(str(path))
    log(f"dolm-plot: {len(written)} figure(s) in {output}")


@subcommand(main, "dag", "plot", outputs=())
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(),
              help="An image file (one input; format from its suffix) or a folder.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Image format (default: the output's suffix, else png).")
@click.option("--force", is_flag=True, help="Overwrite existing figures.")
def dag(run: Any, files: tuple[str, ...], output: str, fmt: str | None, force: bool) -> None:
    """Draw the causal diagrams in dag FILES (treatment, outcome, mediators coloured)."""
    from pathlib import Path

    from dolm_tools.plot import style
    from dolm_tools.plot.draw import load_sources, render
    from dolm_tools.plot.registry import Plot, specs_for

    sources = load_sources(files, run=run)
    for src in sources:
        if src.schema != "dag":
            raise InputError(f"{src.path}: is a {src.schema!r} file, expected a 'dag' file")
    out = Path(output)
    suffix = out.suffix.lower().lstrip(".")
    if suffix in FORMATS:
        if len(sources) > 1:
            raise InputError(f"--output {out}: one image file for {len(sources)} dag files; "
                             "give a folder instead")
        targets = [out]
        fmt = fmt or suffix
    else:
        fmt = fmt or "png"
        targets = [out / f"{s.stem}.dag.{fmt}" for s in sources]
    spec = specs_for("dag", "single")[0]
    for target in targets:
        if target.exists() and not force:
            raise InputError(f"--output {target}: file exists; pass --force to overwrite it")
    parent = targets[0].parent
    if not parent.exists():
        if parent == out and out.parent.exists():
            out.mkdir()
        else:
            raise InputError(f"--output {out}: folder {parent} does not exist")
    for src, target in zip(sources, targets, strict=True):
        fig = render(Plot(spec, src, None, target.stem, [src]))
        style.save(fig, target, fmt, force=True)
        click.echo(str(target))


@subcommand(main, "report", "plot", outputs=("output",))
@click.argument("run_dir", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="The HTML file to write ('-' for stdout).")
@click.option("--force", is_flag=True, help="Overwrite an existing report.")
def report(run: Any, run_dir: str, output: str, force: bool) -> None:
    """One self-contained HTML page for RUN_DIR, organised by study.

    It opens with each study's causal question and headline numbers (95% intervals), then
    per study the answer, the figures that show it and the details collapsed (every other
    figure, the figures not drawn and why, each file's table and provenance); a file index
    closes it. Studies are the folders the pipelines/ recipes write (bayes, dilemma, ...)."""
    from dolm_tools.plot.report import write_report

    n_files, n_figs = write_report(run_dir, output, force,
                                   progress=lambda it: progress(it, desc="drawing", unit="fig"))
    log(f"dolm-plot: report of {n_files} file(s) with {n_figs} figure(s) -> {output}")


@main.command(name="list", context_settings=CONTEXT_SETTINGS)
def list_figures() -> None:
    """List the schemas dolm-plot draws and the figures each gets."""
    from dolm.formats.schema import available_schemas
    from dolm_tools.plot.registry import load_all

    installed = available_schemas()
    rows: dict[str, list[str]] = {}
    for spec in load_all():
        key = " + ".join(spec.schemas)
        tag = {"single": "", "compare": " [several files]", "combo": " [joined]"}[spec.mode]
        rows.setdefault(key, []).append(f"  {spec.name}{tag}: {spec.what}")
    for key in sorted(rows):
        missing = [s for s in key.split(" + ") if s not in installed]
        note = f"  (schema not installed yet: {', '.join(missing)})" if missing else ""
        click.echo(f"{key}{note}")
        for line in rows[key]:
            click.echo(line)
