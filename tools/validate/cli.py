"""``dolm-validate FILE...``: check dolm files against their schemas.

``dolm-validate --model X`` loads model X and runs dolm's identities on it
(:mod:`dolm.models.verify`), printing each; exit 3 when one fails.

Every dataset, row and tensor is read (``--quick``: HDF5 layout only). Exit 0 when
every file is valid, 3 when any is invalid (the first problems are named:
file, column or dataset, expected vs found). A truncated or corrupt Parquet or HDF5
file is reported as such.
"""

from __future__ import annotations

import os
import sys
import tempfile

import click
from dolm.cli import CONTEXT_SETTINGS, DolmCommand


@click.command(name="dolm-validate", cls=DolmCommand, context_settings=CONTEXT_SETTINGS)
@click.argument("files", nargs=-1, required=False, type=click.Path(dir_okay=False))
@click.option("--schema", default=None, help="Check against this schema instead of the file's own.")
@click.option("-q", "--quiet", is_flag=True, help="Print only problems.")
@click.option("--quick", is_flag=True,
              help="HDF5: check layout and metadata only, without reading the datasets.")
@click.option("--model", "model", default=None,
              help="Load this model (toy, folder, hub id) and check dolm's identities on it.")
def main(files: tuple[str, ...], schema: str | None, quiet: bool, quick: bool,
         model: str | None) -> None:
    """Validate FILES against their dolm schemas, reading all their data (every table
    row, HDF5 chunk and tensor; NaN/inf where the schema forbids them; a DAG's graph).
    A CSV/TSV file carries no schema: name one with --schema. With --model X, check a
    model's identities instead."""
    from dolm.formats import validate_file

    if model is not None:
        from dolm.models.verify import validate_model

        sys.exit(validate_model(model, quiet=quiet))
    if not files:
        raise click.UsageError("give FILES to validate, or --model X")

    bad = 0
    for path in files:
        if path == "-":
            name, problems = _validate_stdin(schema, quick)
        else:
            name, problems = validate_file(path, schema=schema, quick=quick)
        if problems:
            bad += 1
            click.echo(f"{path}: INVALID", err=True)
            for p in problems:
                click.echo(f"  {p}", err=True)
        elif not quiet:
            click.echo(f"{path}: ok ({name}{', quick: data not read' if quick else ''})")
    sys.exit(3 if bad else 0)


def _validate_stdin(schema: str | None, quick: bool) -> tuple[str | None, list[str]]:
    """Validate a file read whole from stdin (Parquet's footer is at its end)."""
    from dolm.formats import validate_file

    data = sys.stdin.buffer.read()
    if not data:
        return schema, ["-: standard input is empty"]
    fd, tmp = tempfile.mkstemp(prefix="dolm-validate-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        name, problems = validate_file(tmp, schema=schema, quick=quick)
        return name, [p.replace(tmp, "-") for p in problems]
    finally:
        os.unlink(tmp)
