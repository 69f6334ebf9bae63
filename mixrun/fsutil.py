"""Small filesystem helpers: atomic writes, so a crash never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder, fsync, then rename over the target."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# ---- per-machine caches: measured once, reused by later runs -----------------------------------------------------

MAX_CACHE_BYTES = 1 << 20


def cache_dir() -> Path:
    """Where per-machine findings live (``$MIXRUN_CACHE_DIR`` or the platform's cache dir)."""
    base = os.environ.get("MIXRUN_CACHE_DIR")
    if not base:
        import platformdirs

        base = platformdirs.user_cache_dir("mixrun")
    return Path(base)


def read_cache(name: str) -> dict[str, Any]:
    """The JSON object in cache file ``name``, or ``{}`` when it is missing, too large or not a JSON object.

    A cache is a convenience, never input to trust: any problem means "measure again"."""
    import json

    path = cache_dir() / name
    try:
        if path.stat().st_size > MAX_CACHE_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(name: str, key: str, value: Any, keep: int = 32) -> None:
    """Store ``value`` under ``key`` in cache file ``name`` (atomically, the newest ``keep`` keys kept). A cache that
    cannot be written is not an error: the finding is measured again next time."""
    import json

    data = read_cache(name)
    data.pop(key, None)
    data[key] = value
    while len(data) > keep:
        data.pop(next(iter(data)))
    with contextlib.suppress(OSError):
        atomic_write_text(cache_dir() / name, json.dumps(data, indent=1, sort_keys=False))
