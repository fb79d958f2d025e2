"""Assemble BENCHMARKS.md from the per-benchmark result files in benchmarks/results/*.md.

Each benchmark script writes its own Markdown section (ratios measured side by side in
one run); this joins them in a fixed order so BENCHMARKS.md is never edited by hand.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["collect_acts", "patch", "psm", "mediate", "cunit", "gpu"]
HEADER = """# Benchmarks

Speed and memory as ratios measured side by side in one run on one machine (never as timed
assertions in tests). Scripts are in `benchmarks/`; `just bench` runs them all and
`python benchmarks/assemble.py` rebuilds this page from `benchmarks/results/*.md`.
Numbers below were taken on the project's 2-core CPU machine while other work was running
on it, so absolute seconds are pessimistic; the ratios within one run are the figures of
merit (several sections also give process CPU seconds).
"""


def main() -> None:
    results = ROOT / "benchmarks" / "results"
    files = sorted(results.glob("*.md"))
    ranked = sorted(files, key=lambda p: next(
        (i for i, k in enumerate(ORDER) if p.stem.startswith(k)), len(ORDER)))
    parts = [HEADER]
    for p in ranked:
        text = p.read_text().strip()
        if text.startswith("# "):
            text = "#" + text  # demote to a section of this page
        parts.append(text)
    (ROOT / "BENCHMARKS.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
