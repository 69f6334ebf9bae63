"""Small filesystem helpers: atomic writes, so a crash never leaves a half-written file behind, and bounded reads,
so a hostile path (a FIFO, /dev/zero, a huge file) can neither hang nor exhaust memory."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask, read without changing it where the system allows (setting it races other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str, *, parents: bool = True) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder, fsync, then rename over the target.

    A symlink is followed: its target is what gets replaced, so the link stays a link. An existing file keeps its
    permission bits (a new one gets the usual 0666 less umask). Anything that is not a regular file (a directory, a
    device, a FIFO) is refused, never replaced. ``parents``: create missing parent folders. Every failure is an
    OSError; the target is then as it was."""
    target = Path(os.path.realpath(path))
    try:
        st: os.stat_result | None = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    if parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask()
    # a short prefix: the temporary name must stay within NAME_MAX even when the target's name is near it
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:32]}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if st is not None and os.geteuid() == 0:
                with contextlib.suppress(OSError):
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(path)


def shown(thing: object, limit: int = 200) -> str:
    """``thing`` as text for a one-line message: a hostile 5,000-character name is cut, not echoed whole, and a
    line break cannot start a second line."""
    text = str(thing).replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else f"{text[:limit // 2]}...({len(text):,} characters)"


def write_problem(e: OSError) -> str:
    """An OSError from :func:`atomic_write_text`, in words: ``cannot write (No space left on device)``."""
    return f"cannot write ({e.strerror or e})"


def read_bounded(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of the regular file at ``path`` (symlinks followed), at most ``limit`` of them.

    Raises OSError: FileNotFoundError, IsADirectoryError, ``EINVAL`` "not a regular file" (a FIFO, a device: opened
    without blocking and never read), ``EFBIG`` "larger than LIMIT bytes" (the read stops at ``limit + 1`` bytes,
    whatever ``st_size`` claims: /proc files and devices report 0)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"{st.st_size:,} bytes is larger than the limit of {limit:,}", str(path))
        chunks: list[bytes] = []
        got = 0
        while got <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > limit:
            raise OSError(errno.EFBIG, f"larger than the limit of {limit:,} bytes", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


@contextlib.contextmanager
def dir_lock(folder: str | os.PathLike[str], timeout_s: float = 30.0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (which must exist) for a read-modify-write of a file in it, so two
    processes updating the same file cannot lose one update. Locking the folder leaves no lock file behind and
    still works when the file itself is replaced by a rename. Raises ``TimeoutError`` after ``timeout_s``."""
    import fcntl
    import time

    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(errno.ETIMEDOUT, f"another process held the lock for {timeout_s:.0f} s",
                                       str(folder)) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
        data = json.loads(read_bounded(path, MAX_CACHE_BYTES).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
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
