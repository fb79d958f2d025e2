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
    ci = (ROOT / ".ci" / "run").read_text()
    body = [ln for ln in ci.splitlines() if ln.strip() and not ln.startswith("#")]
    assert test.strip() in body, "the .ci/run command must be the README's test command"


def test_every_schema_is_a_valid_json_schema():
    import jsonschema

    names = sorted((ROOT / "schemas").glob("*.schema.json"))
    assert names
    for p in names:
        assert re.match(r"^[a-z0-9_]+\.v\d+\.schema\.json$", p.name), p.name
        schema = json.loads(p.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
