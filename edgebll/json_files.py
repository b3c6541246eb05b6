"""The small JSON files of a run or dataset folder: read with a size bound, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from edgebll.errors import EdgeBLLError


def write_json_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; artifacts are meant to be copied to boards
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json_file(path: Path, max_bytes: int, error: type[EdgeBLLError], hint: str) -> Any:
    """Parse a small JSON file of a run or dataset folder: bounded in size, depth errors and bad bytes as ``error``."""
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path}: {size} bytes, too large for what it should hold; {hint}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise error(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:80]}); {hint}") from exc
