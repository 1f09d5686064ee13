"""One way to write a JSON file that a crash can never leave half-written."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any


def write_json_atomically(
    path: str | os.PathLike,
    value: Any,
    *,
    indent: int | None = None,
    default: Callable[[Any], Any] | None = None,
    private: bool = False,
) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over `path`: readers see the
    old file or the new one, never a torn one. `private`: owner-only permissions (secret state)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if private:
        os.chmod(folder, 0o700)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        if private:
            os.fchmod(handle, 0o600)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(value, stream, indent=indent, default=default)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
