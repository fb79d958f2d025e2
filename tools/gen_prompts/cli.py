"""``dolm-gen-prompts FAMILY [options] -o prompts.parquet``: write a prompts table.

One subcommand per task family of ``dolm.tasks`` (factual, bayes, formats, arith,
dilemma, from-file); each family's options become click options, built from the family's
option descriptions, so the CLI and the Python API cannot drift apart::

    dolm-gen-prompts bayes --n-draws 10 --sweep --permutations 20 --distractors 0,1,2,4,8 \\
        --symbol-swap -o bayes.parquet
    dolm-gen-prompts dilemma --import-json base_prompts.json counterfactual_prompts.json \\
        -o dilemma.parquet
    dolm-gen-prompts from-file data.jsonl --map prompt=text --map target=answer -o p.parquet

``-o -`` writes the Parquet table to stdout. ``--model`` (optional) uses that model's
tokenizer: factual counterfactual subjects then have the same token length, formats
``prompt_length`` counts its tokens, and every row gets ``prompt_tokens``.
"""

from __future__ import annotations

from typing import Any

import click
from dolm.cli import log, output_option, seed_option, subcommand, tool_group
from dolm.errors import InputError
from dolm.tasks import FAMILIES
from dolm.tasks.base import Option

TOOL = "gen-prompts"


@tool_group(TOOL)
def main() -> None:
    """Generate a prompts table from a task family (or a user's file)."""


def _click_option(opt: Option) -> Any:
    """A click option from a family's option description."""
    default_txt = opt.default
    if isinstance(default_txt, list):
        default_txt = ",".join(map(str, default_txt))
    if opt.type == "bool":
        flag = opt.flag[2:]
        return click.option(f"--{flag}/--no-{flag}", opt.name, default=bool(opt.default),
                            show_default=True, help=opt.help)
    kind: Any = {"int": int, "float": float, "str": str}.get(opt.type, str)
    if opt.type == "int" and opt.name == "n":  # a count of rows: --n -5 is refused (exit 3)
        kind = click.IntRange(min=1)
    metavar = None
    if opt.type == "choice":
        kind = click.Choice(list(opt.choices or ()))
    elif opt.type.endswith("_list"):
        metavar = "A,B,..."
    help_txt = opt.help
    if opt.type == "str_list" and opt.choices:
        help_txt += f" (of: {', '.join(opt.choices)})"
    return click.option(opt.flag, opt.name, type=kind, default=default_txt,
                        show_default=default_txt is not None, metavar=metavar, help=help_txt)


def _common(f: Any) -> Any:
    f = click.option("--revision", default=None, help="Revision of --model.")(f)
    f = click.option("--model", default=None,
                     help="Optional: use this model's tokenizer for token lengths "
                     "(toy, a local folder, or a hub id).")(f)
    f = click.option("--split", type=click.Choice(["eval", "train"]), default="eval",
                     show_default=True,
                     help="eval: held-out evaluation prompts; train: toy-model training "
                     "material (disjoint from eval).")(f)
    f = seed_option(f)
    f = output_option(f, help="Output prompts table (Parquet; '-' for stdout).")
    return f


def _tokenizer(run: Any, model: str | None, revision: str | None) -> Any:
    if not model:
        return None
    from dolm.models import load

    lm = load(model, revision=revision)
    run.set_model(lm.info)
    return lm.tokenizer


def _write(run, family: str, df, output: str, force: bool, tokenizer, options: dict) -> None:
    from dolm.formats import write_table
    from dolm.tasks.base import token_count

    if len(df) == 0:
        raise InputError(f"{family}: the options give no prompts; expected at least one row")
    if tokenizer is not None and "prompt_tokens" not in df.columns:
        df["prompt_tokens"] = [token_count(tokenizer, p) for p in df["prompt"]]
    dropped = df.attrs.get("dropped_no_cf")
    if dropped:
        log(f"dolm-gen-prompts: {family}: {dropped} prompt(s) left out: no counterfactual "
            "subject of equal token length")
    extra = {"family": family, "options": options}
    write_table(df, output, schema="prompts", run=run, force=force, extra=extra)
    if output != "-":
        log(f"dolm-gen-prompts: {family}: wrote {len(df)} prompts to {output}")


def _make_family_command(name: str, skip: tuple[str, ...] = ()) -> Any:
    fam = FAMILIES[name]

    def cmd(run, output, force, seed, split, model, revision, **kw):
        tok = _tokenizer(run, model, revision)
        options = {k: v for k, v in kw.items() if v is not None}
        df = fam.generate(split=split, seed=seed, tokenizer=tok, **options)
        _write(run, name, df, output, force, tok, options)

    cmd.__name__ = name.replace("-", "_")
    cmd.__doc__ = fam.help
    f: Any = cmd
    for opt in reversed(fam.options):
        if opt.name not in skip:
            f = _click_option(opt)(f)
    return f


def _register(name: str, skip: tuple[str, ...] = (), extra_params=()) -> None:
    f = _make_family_command(name, skip)
    for p in extra_params:
        f = p(f)
    subcommand(main, name, TOOL)(_common(f))


for _name in ("factual", "bayes", "formats", "arith"):
    _register(_name)


# dilemma: --import-json BASE CF instead of the two import options
@subcommand(main, "dilemma", TOOL)
@_common
@click.option("--import-json", "import_json", nargs=2, default=None,
              type=click.Path(dir_okay=False), metavar="BASE CF",
              help="Import researchers' base_prompts.json and counterfactual_prompts.json "
              "(lists of {prompt_id, prompt, ethical_option}) instead of generating.")
@_click_option(FAMILIES["dilemma"].option("n"))
def dilemma(run, output, force, seed, split, model, revision, import_json, n):
    """Two-option scenarios with the intended option and an options-swapped counterfactual."""
    tok = _tokenizer(run, model, revision)
    options: dict[str, Any] = {"n": n}
    if import_json:
        base, cf = import_json
        options.update(import_base=base, import_cf=cf)
        for p in (base, cf):
            run.add_input(p)
    df = FAMILIES["dilemma"].generate(split=split, seed=seed, tokenizer=tok, **options)
    _write(run, "dilemma", df, output, force, tok, {k: v for k, v in options.items() if v})


@subcommand(main, "from-file", TOOL)
@_common
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--map", "mapping", multiple=True, metavar="COLUMN=FILE_COLUMN",
              help="Map a prompts column to a column of the file (repeatable), e.g. "
              "--map prompt=text --map target=answer.")
@click.option("--family-name", default="from-file", show_default=True,
              help="Value of the family column.")
def from_file(run, output, force, seed, split, model, revision, path, mapping, family_name):
    """A user's JSONL/JSON/CSV/Parquet file, its columns mapped onto the prompts table."""
    from pathlib import Path

    if not Path(path).exists():
        raise InputError(f"{path}: file not found")
    tok = _tokenizer(run, model, revision)
    run.add_input(path)
    df = FAMILIES["from-file"].generate(split=split, seed=seed, tokenizer=tok, path=path,
                                        map=list(mapping) or None, family_name=family_name)
    _write(run, "from-file", df, output, force, tok,
           {"path": path, "map": list(mapping), "family_name": family_name})


if __name__ == "__main__":  # pragma: no cover
    main()
