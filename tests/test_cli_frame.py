"""dolm.cli: exit codes (0 ok, 1 failure, 2 usage, 3 invalid input), --force, the dispatcher."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

TOOL = textwrap.dedent(
    """
    import sys, click
    from dolm.cli import tool, output_option, seed_option, model_options, parse_float_list
    from dolm.errors import InputError

    @tool("demo")
    @click.argument("what")
    @click.option("--alphas", default="1")
    @click.option("--n", type=int, default=1)
    @model_options
    @output_option
    @seed_option
    def main(run, what, alphas, n, model_opts, output, force, seed):
        parse_float_list(alphas, "--alphas")
        if what == "bad":
            raise InputError("prompts.parquet: column 'x': expected integers")
        if what == "boom":
            raise ZeroDivisionError("division by zero")
        if what == "pipe":
            for _ in range(100000):
                print("y" * 100)
        if what == "info":
            print(run.tool, run.seed, model_opts.batch_size, model_opts.model)
            return
        open(output, "w").write("done")

    main()
    """
)


def run_demo(tmp_path, *args):
    script = tmp_path / "demo_tool.py"
    script.write_text(TOOL)
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)


def test_ok_and_options(tmp_path):
    r = run_demo(tmp_path, "info", "-o", str(tmp_path / "o"), "--seed", "7", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["demo", "7", "4", "toy"]


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["bad", "-o", "X"], 3, "column 'x': expected integers"),
        (["ok", "-o", "X", "--alphas", "1,two"], 3, "--alphas: expected comma-separated numbers"),
        (["ok", "-o", "X", "--n", "abc"], 3, "'abc' is not a valid integer"),
        (["ok", "-o", "X", "--batch-size", "0"], 3, "positive integer or 'auto'"),
        (["ok"], 2, "Missing option"),
        (["ok", "-o", "X", "--nope"], 2, "No such option"),
        (["boom", "-o", "X"], 1, "unexpected failure: ZeroDivisionError"),
    ],
)
def test_exit_codes(tmp_path, args, code, needle):
    args = [a.replace("X", str(tmp_path / "out.txt")) for a in args]
    r = run_demo(tmp_path, *args)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    r = run_demo(tmp_path, "ok", "-o", str(out))
    assert r.returncode == 3 and "--force" in r.stderr and out.read_text() == "old"
    r = run_demo(tmp_path, "ok", "-o", str(out), "--force")
    assert r.returncode == 0 and out.read_text() == "done"


def test_closed_pipe_is_quiet(tmp_path):
    script = tmp_path / "demo_tool.py"
    script.write_text(TOOL)
    r = subprocess.run(
        f"{sys.executable} {script} pipe -o {tmp_path / 'o'} | head -1",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "y" * 100
    assert "Traceback" not in r.stderr and "error" not in r.stderr


def test_dispatcher_lists_and_runs_tools(tmp_path):
    r = subprocess.run(["dolm", "tools"], capture_output=True, text=True)
    assert r.returncode == 0 and "validate" in r.stdout
    r = subprocess.run(["dolm", "validate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Validate FILES" in r.stdout
    # a user's own dolm-* on PATH is found, as git finds git-foo
    own = tmp_path / "dolm-hello"
    own.write_text("#!/bin/sh\necho hello $1\n")
    own.chmod(0o755)
    import os

    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(["dolm", "hello", "world"], capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "hello world"
    r = subprocess.run(["dolm", "tools"], capture_output=True, text=True, env=env)
    assert "hello" in r.stdout
    r = subprocess.run(["dolm", "nosuchtool"], capture_output=True, text=True)
    assert r.returncode == 2 and "not a dolm tool" in r.stderr


def test_default_command_group_inserts_its_default():
    import click
    from click.testing import CliRunner
    from dolm.cli import CONTEXT_SETTINGS, DefaultCommandGroup

    @click.group(cls=DefaultCommandGroup, default_command="files",
                 context_settings=CONTEXT_SETTINGS)
    def main() -> None:
        """Demo group."""

    @main.command(name="files")
    @click.argument("paths", nargs=-1)
    def files(paths):
        click.echo("files " + " ".join(paths))

    @main.command(name="other")
    def other():
        click.echo("other")

    runner = CliRunner()
    assert runner.invoke(main, ["a", "b"]).output == "files a b\n"
    assert runner.invoke(main, ["files", "a"]).output == "files a\n"
    assert runner.invoke(main, ["other"]).output == "other\n"
    assert "Demo group." in runner.invoke(main, ["-h"]).output
