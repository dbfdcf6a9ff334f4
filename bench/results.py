"""bench/RESULTS.md keeps one section per benchmark script; --record adds a run at the end of its own section."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def record(section: str, text: str, path: Path = RESULTS) -> None:
    """Insert `text` at the end of the `## {section}` section (created at the end if missing)."""
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmark results"]
    heading = f"## {section}"
    if heading not in lines:
        lines += ["", heading]
    start = lines.index(heading)
    next_section = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    end = next_section
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    lines[end:next_section] = ["", *text.strip("\n").splitlines(), ""]
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
