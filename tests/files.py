"""What the robustness tests compare before and after a command: every file under a folder with
its SHA-256, and the single line a refused command leaves on stderr."""

from __future__ import annotations

import hashlib
import pathlib


def hashes(folder: pathlib.Path) -> dict[str, str]:
    """{path relative to `folder`: sha256 of its bytes} for every file below it; folders as "dir"."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_error_line(stderr: str) -> str:
    """The only line on stderr, which must start with "error:"."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]
