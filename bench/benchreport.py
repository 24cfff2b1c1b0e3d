"""Writing benchmark results into docs/benchmarks.md, one section per benchmark.

The benchmarks use the test scaffolding in tests/support (sample site, sample data, tiny
models, chat server). Every script imports this module before `support` (the import order
ruff keeps), and importing it puts tests/ on sys.path.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def write_section(path: Path, title: str, command: str, lines: list[str]) -> None:
    """Replace (or add) one `## title` section of the benchmarks page."""
    section = [f"## {title}", "", f"Command: `{command}`", "", *lines, ""]
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    blocks = text.split("\n## ")
    kept = [blocks[0].rstrip("\n") + "\n"] + [
        "## " + block.rstrip("\n") + "\n"
        for block in blocks[1:]
        if not block.startswith(title + "\n")
    ]
    path.write_text("\n".join([*kept, "\n".join(section)]))
