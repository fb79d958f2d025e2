"""The user guide (mkdocs.yml, docs/): it builds with --strict, and every tool has a page.

The tool reference pages are rendered from the tools' click commands by docs/hooks.py at
build time; these tests check that every installed ``dolm*`` executable gets one, that each
page holds the help of every subcommand and names every option, and that the guide's
install commands and file table keep up with the README and schemas/.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hooks():
    spec = importlib.util.spec_from_file_location("dolm_docs_hooks", ROOT / "docs" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def hooks():
    return _hooks()


@pytest.fixture(scope="module")
def pages(hooks):
    return hooks.tool_pages()


def _installed_tools() -> set[str]:
    """dolm executables installed beside this Python (what pip made from pyproject)."""
    bindir = Path(sys.executable).parent
    return {p.name for p in bindir.glob("dolm*") if p.is_file() and os.access(p, os.X_OK)}


def _commands(cmd: click.Command, name: str, parent=None):
    """(full name, command) of a click command and every subcommand, depth first."""
    ctx = click.Context(cmd, info_name=name, parent=parent)
    yield " ".join(c.info_name for c in _chain(ctx)), cmd
    if isinstance(cmd, click.Group):
        for sub in cmd.list_commands(ctx):
            yield from _commands(cmd.get_command(ctx, sub), sub, ctx)


def _chain(ctx):
    out = []
    while ctx is not None:
        out.append(ctx)
        ctx = ctx.parent
    return reversed(out)


def test_every_installed_tool_has_a_reference_page(hooks, pages):
    installed = _installed_tools()
    assert "dolm" in installed and "dolm-patch" in installed, installed
    missing = installed - set(pages)
    assert not missing, f"tools without a reference page: {sorted(missing)}"
    assert set(pages) == set(hooks.tool_scripts())


def test_each_reference_page_holds_every_subcommand_and_option(hooks, pages):
    n_commands = 0
    for script, ep in hooks.tool_scripts().items():
        obj = hooks._load(ep)
        page = pages[script]
        if not isinstance(obj, click.Command):  # the dispatcher: its usage text
            assert obj.__module__ == "dolm.dispatch"
            assert "dolm tools" in page and "usage: dolm <tool>" in page
            continue
        for full, cmd in _commands(obj, script):
            n_commands += 1
            assert f"Usage: {full} " in page, f"{script}: no help section for {full!r}"
            for param in cmd.params:
                if isinstance(param, click.Option) and not param.hidden:
                    for flag in param.opts:
                        assert flag in page, f"{script}: {full} option {flag} missing"
    # patch, psm, ...; gen-prompts' families, collect-acts run/merge, steer fit/apply, ...
    assert n_commands >= 35, n_commands


def test_reference_nav_lists_every_tool(hooks, pages):
    config = {"nav": [{"Home": "index.md"}, {"Reference": "reference/index.md"}]}
    nav = hooks.on_config(config)["nav"]
    ref = dict(next(iter(item.items())) for item in nav[1]["Reference"])
    assert set(ref) == {"Overview", *pages}
    assert ref["dolm-psm"] == "reference/dolm-psm.md"


def test_getting_started_shows_the_readme_setup_commands(hooks):
    """The install section is filled from the README when the site is built."""
    source = (ROOT / "docs" / "getting-started.md").read_text()
    demo, test = hooks.readme_setup_commands()
    assert demo.rstrip().endswith("just demo") and test.rstrip().endswith("just test")
    rendered = hooks.insert_readme_commands(source)
    install = rendered.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert f"```bash\n{demo}\n```" in install and f"```bash\n{test}\n```" in install
    assert "<!-- README:" not in rendered
    with pytest.raises(ValueError, match="marker"):
        hooks.insert_readme_commands(source.replace("<!-- README:setup-test -->", ""))


def test_every_schema_is_described_in_getting_started():
    guide = (ROOT / "docs" / "getting-started.md").read_text()
    names = sorted(p.name.split(".")[0] for p in (ROOT / "schemas").glob("*.schema.json"))
    missing = [n for n in names if f"| `{n}` |" not in guide]
    assert not missing, f"schemas not in the getting-started file tables: {missing}"


def test_mkdocs_build_strict(tmp_path, pages):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
         "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for script in pages:
        html = (site / "reference" / f"{script}.html").read_text()
        assert f'<h1 id="{script}">{script}<' in html, script
        if script != "dolm":
            assert f"Usage: {script} " in html, script
    index = (site / "index.html").read_text()
    for page in ("getting-started.html", "studies/formats-psm.html", "models.html",
                 "CONVENTIONS.html", "reference/dolm-patch.html"):
        assert page in index, f"{page} not linked from the home page's navigation"
        assert (site / page).is_file()
    # every image a page shows was copied into the site
    for html_file in site.rglob("*.html"):
        for src in re.findall(r'<img[^>]+src="([^"]+)"', html_file.read_text()):
            if not src.startswith(("http:", "https:", "data:")):
                assert (html_file.parent / src).resolve().is_file(), (html_file, src)
