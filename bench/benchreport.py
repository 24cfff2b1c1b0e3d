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
    """Replace one `## title` section of the benchmarks page where it is, or add it at the
    end."""
    section = "\n".join([f"## {title}", "", f"Command: `{command}`", "", *lines, ""])
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    blocks = text.split("\n## ")
    kept = [blocks[0].rstrip("\n") + "\n"] + [
        section if block.startswith(title + "\n") else "## " + block.rstrip("\n") + "\n"
        for block in blocks[1:]
    ]
    if section not in kept:
        kept.append(section)
    path.write_text("\n".join(kept))
