"""MkDocs hook: one reference page per dolm tool, rendered from its click ``--help``.

The tools are read from ``[project.scripts]`` in ``pyproject.toml`` (the same list pip
installs as executables), their click commands are imported and their help is rendered
with click's own formatter at build time, so the pages cannot go stale. Each tool gets
``reference/dolm-<tool>.md`` (the tool's help, then one section per subcommand) and the
"Reference" entry of the nav is filled with them. ``tool_pages()`` is importable without
MkDocs (tests/test_docs.py uses it).
"""

from __future__ import annotations

import importlib
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_DIR = "reference"
HELP_WIDTH = 80  # the help as printed in an 80-column terminal; fits the page width


def tool_scripts(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """Executable name -> entry point (``module:attr``) for every ``dolm*`` script."""
    with open(pyproject, "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    return {name: ep for name, ep in sorted(scripts.items()) if name.startswith("dolm")}


def _load(entry_point: str):
    module, _, attr = entry_point.partition(":")
    return getattr(importlib.import_module(module), attr)


def _help(cmd, ctx_name: str, parent=None) -> tuple[str, object]:
    import click

    ctx = click.Context(
        cmd, info_name=ctx_name, parent=parent, terminal_width=HELP_WIDTH,
        max_content_width=HELP_WIDTH,
    )
    return cmd.get_help(ctx), ctx


def _fence(text: str) -> str:
    return "```text\n" + text.rstrip() + "\n```\n"


def _subcommands(cmd, ctx) -> list[tuple[str, object]]:
    import click

    if not isinstance(cmd, click.Group):
        return []
    return [(name, cmd.get_command(ctx, name)) for name in cmd.list_commands(ctx)]


def render_click(script: str, cmd) -> str:
    """Markdown reference page of one click command (and its subcommands, recursively)."""
    text, ctx = _help(cmd, script)
    summary = (cmd.get_short_help_str(limit=200) or "").strip()
    lines = [f"# {script}", "", summary or "(no description)", ""]
    subs = _subcommands(cmd, ctx)
    default = getattr(cmd, "default_command", None)
    if subs:
        lines.append("Subcommands: " + ", ".join(
            f"[`{name}`](#{script}-{name})" for name, _ in subs) + ".")
        if default:
            lines.append(
                f"With no subcommand named, `{script} ARGS` runs `{script} {default} ARGS`.")
        lines.append("")
    lines += [f"`{script} --help`:", "", _fence(text)]

    def walk(group_ctx, items, prefix: str, depth: int) -> None:
        for name, sub in items:
            full = f"{prefix} {name}"
            sub_text, sub_ctx = _help(sub, name, parent=group_ctx)
            anchor = full.replace(" ", "-")
            lines.extend([f"{'#' * depth} `{full}` {{#{anchor}}}", "",
                          (sub.get_short_help_str(limit=200) or "").strip(), "",
                          f"`{full} --help`:", "", _fence(sub_text)])
            walk(sub_ctx, _subcommands(sub, sub_ctx), full, min(depth + 1, 4))

    walk(ctx, subs, script, 2)
    return "\n".join(lines)


def render_dispatcher(script: str, entry_point: str) -> str:
    """The ``dolm`` dispatcher is not a click command: its page shows its usage text."""
    module = importlib.import_module(entry_point.partition(":")[0])
    doc = (module.__doc__ or "").strip().replace("``", "`")
    return "\n".join([
        f"# {script}", "", doc, "", f"`{script} --help`:", "", _fence(module.USAGE),
    ])


def tool_pages(scripts: dict[str, str] | None = None) -> dict[str, str]:
    """Executable name -> Markdown of its reference page, for every dolm executable."""
    import click

    pages = {}
    for script, ep in (tool_scripts() if scripts is None else scripts).items():
        obj = _load(ep)
        if isinstance(obj, click.Command):
            pages[script] = render_click(script, obj)
        else:
            pages[script] = render_dispatcher(script, ep)
    return pages


def _index(pages: dict[str, str]) -> str:
    rows = ["| tool | what it does |", "| --- | --- |"]
    for script, md in pages.items():
        summary = md.split("\n")[2].strip()  # every page: "# title", "", summary
        rows.append(f"| [`{script}`]({script}.md) | {summary} |")
    return "\n".join([
        "# Tool reference", "",
        "One page per executable, rendered from the tool's own `--help` when this site is "
        "built (`docs/hooks.py`), so it always matches the installed version. Every tool "
        "also runs as `dolm <tool> ...`.", "",
        *rows, "",
        "Options shared by every tool that loads a model (`--model`, `--revision`, `--dtype`, "
        "`--device`, `--device-map`, `--load-in-4bit/--load-in-8bit`, `--batch-size`, "
        "`--trust-remote-code`), exit codes and file conventions are described in "
        "[Getting started](../getting-started.md#conventions-every-tool-shares).", "",
    ])


def readme_setup_commands(readme: Path = ROOT / "README.md") -> list[str]:
    """The README's two set-up commands (demo, test), as its "## Set up" section has them."""
    section = readme.read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)
    if len(blocks) != 2:
        raise ValueError(f"{readme}: expected 2 bash blocks under '## Set up', found {len(blocks)}")
    return blocks


def insert_readme_commands(markdown: str) -> str:
    """Replace the ``<!-- README:setup-demo -->`` / ``setup-test`` markers with the README's
    commands, so the guide's install section never drifts from the README."""
    for marker, cmd in zip(("setup-demo", "setup-test"), readme_setup_commands(), strict=True):
        tag = f"<!-- README:{marker} -->"
        if tag not in markdown:
            raise ValueError(f"getting-started.md: marker {tag} missing")
        markdown = markdown.replace(tag, f"```bash\n{cmd}\n```")
    return markdown


# ------------------------------------------------------------------ MkDocs events

_PAGES: dict[str, str] = {}


def on_config(config):
    """Render the pages once and put them under the nav's "Reference" entry."""
    _PAGES.clear()
    _PAGES.update(tool_pages())
    entries = [{"Overview": f"{REFERENCE_DIR}/index.md"}]
    entries += [{script: f"{REFERENCE_DIR}/{script}.md"} for script in _PAGES]
    nav = config.get("nav") or []
    for i, item in enumerate(nav):
        if isinstance(item, dict) and "Reference" in item:
            nav[i] = {"Reference": entries}
            break
    else:
        nav.append({"Reference": entries})
    config["nav"] = nav
    return config


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == "getting-started.md":
        return insert_readme_commands(markdown)
    return markdown


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, f"{REFERENCE_DIR}/index.md", content=_index(_PAGES)))
    for script, md in _PAGES.items():
        files.append(File.generated(config, f"{REFERENCE_DIR}/{script}.md", content=md))
    return files
