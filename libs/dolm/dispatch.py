"""``dolm``: the dispatcher. ``dolm <tool> ARGS`` runs ``dolm-<tool> ARGS`` as git runs git-foo.

``dolm tools`` lists every ``dolm-*`` executable found (this installation's first, then
PATH, so a user's own ``dolm-mytool`` works too).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from dolm import __version__

USAGE = """usage: dolm <tool> [ARGS...]
       dolm tools          list installed tools
       dolm --version

Runs dolm-<tool> ARGS. Each tool has its own --help (e.g. `dolm patch --help`).
"""


def _search_path() -> list[Path]:
    dirs = [Path(sys.executable).parent]
    dirs += [Path(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    seen, out = set(), []
    for d in dirs:
        key = str(d.resolve()) if d.exists() else str(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def find_tools() -> dict[str, Path]:
    """Tool name -> executable path, first match on the search path wins."""
    found: dict[str, Path] = {}
    for d in _search_path():
        if not d.is_dir():
            continue
        for p in sorted(d.glob("dolm-*")):
            name = p.name[len("dolm-") :]
            if name and name not in found and os.access(p, os.X_OK) and p.is_file():
                found[name] = p
    return found


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        if args and len(args) > 1 and args[0] == "help":
            return main([args[1], "--help"])
        sys.exit(0 if args else 2)
    if args[0] in ("--version", "-V"):
        print(f"dolm {__version__}")
        sys.exit(0)
    if args[0] == "tools":
        for name, path in find_tools().items():
            print(f"{name}\t{path}")
        sys.exit(0)
    name = args[0]
    exe = find_tools().get(name) or shutil.which(f"dolm-{name}")
    if exe is None:
        known = ", ".join(find_tools()) or "none"
        sys.stderr.write(
            f"dolm: '{name}' is not a dolm tool (no dolm-{name} found). Tools: {known}\n"
        )
        sys.exit(2)
    os.execv(str(exe), [str(exe), *args[1:]])


if __name__ == "__main__":
    main()
