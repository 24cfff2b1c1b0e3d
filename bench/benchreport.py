"""Writing benchmark results into docs/benchmarks.md, one section per benchmark."""

from __future__ import annotations

from pathlib import Path


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
