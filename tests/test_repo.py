"""Repository invariants: CI runs exactly the README's test command; every schema is valid."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_two_setup_commands_and_ci_runs_the_test_one():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    demo, test = cmds
    assert demo.rstrip().endswith("just demo") and test.rstrip().endswith("just test")
    assert "pip install torch==2.13.0" in demo and "pip install -q torch==2.13.0" in test
    for cmd in (demo, test):  # the lock, not whatever was released last night
        assert "-c requirements/lock.txt" in cmd, cmd
    ci = (ROOT / ".ci" / "run").read_text()
    body = [ln for ln in ci.splitlines() if ln.strip() and not ln.startswith("#")]
    assert test.strip() in body, "the .ci/run command must be the README's test command"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_lock_pins_every_declared_dependency():
    """requirements/lock.txt pins every package pyproject.toml names (core and the dev,
    reference and gpu extras the README installs), one exact version each, torch at the
    CPU wheel's version: a dependency added without `just lock` fails here."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in ("dev", "reference", "gpu"):
        declared += project["optional-dependencies"].get(extra, [])
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][\w.\-]*)==([^\s;]+)", line)
        if m:
            assert _norm(m.group(1)) not in pins, f"{m.group(1)} pinned twice"
            pins[_norm(m.group(1))] = m.group(2)
    missing = [d for d in declared
               if _norm(re.match(r"^[A-Za-z0-9][\w.\-]*", d).group(0)) not in pins]
    assert not missing, f"not in requirements/lock.txt (run `just lock`): {missing}"
    assert pins["torch"] == "2.13.0", pins["torch"]
    assert not any(k.startswith("nvidia-") for k in pins), "the lock pulls CUDA wheels"


def test_every_schema_is_a_valid_json_schema():
    import jsonschema

    names = sorted((ROOT / "schemas").glob("*.schema.json"))
    assert names
    for p in names:
        assert re.match(r"^[a-z0-9_]+\.v\d+\.schema\.json$", p.name), p.name
        schema = json.loads(p.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
