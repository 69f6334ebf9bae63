"""A byte source for remote GGUFs: HTTP Range requests into a local file, so a 40 GB model's header can be read
before downloading it.

The bytes fetched so far, ``[0, fetched)``, are written to a temporary file; the remote file's size comes from
``Content-Range``. The GGUF reader (:mod:`mixrun.model.gguf`) parses that file up to what was fetched and asks for
more where the header runs past it; this module only fetches. Tensor data is never downloaded. One overall deadline
(:class:`Deadline`) bounds a whole read, and every failure (HTTP, ``http.client``, socket, the deadline) is one
:class:`GGUFError` line.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import re
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from mixrun import __version__
from mixrun.errors import GGUFError, where

FIRST_WINDOW_BYTES = 512 * 1024
TIMEOUT_S = 30.0  # one connect or read
DEADLINE_S = 120.0  # a whole remote read (all parts, redirects and retries); MIXRUN_HTTP_DEADLINE_S overrides
DEADLINE_ENV = "MIXRUN_HTTP_DEADLINE_S"
MAX_REMOTE_BYTES = 1 << 50  # 1 PiB: a remote "file" larger than this is a lying server, not a model
_CONTENT_RANGE = re.compile(r"bytes (\d{1,20})-(\d{1,20})/(\d{1,20})")
_MAX_REASON_CHARS = 200


def _one_line(text: object) -> str:
    """Untrusted or multi-line text (a server's reason phrase, urllib's redirect-loop message) as one short line."""
    words = " ".join(str(text).split())
    words = "".join(c if c.isprintable() else repr(c)[1:-1] for c in words)
    return words if len(words) <= _MAX_REASON_CHARS else words[:_MAX_REASON_CHARS] + "..."


class Deadline:
    """An overall deadline for one remote read. Sockets opened under it are shut down when it passes, so a server
    that trickles a header or a body one byte at a time cannot hold a read past it (a per-read timeout cannot)."""

    def __init__(self, url: str, seconds: float) -> None:
        self.url, self.seconds = url, seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()

    @classmethod
    def start(cls, url: str, seconds: float | None = None) -> Deadline:
        """A deadline of ``seconds``, else ``MIXRUN_HTTP_DEADLINE_S``, else :data:`DEADLINE_S`."""
        if seconds is None:
            raw = os.environ.get(DEADLINE_ENV, "").strip()
            try:
                seconds = float(raw) if raw else DEADLINE_S
            except ValueError:
                seconds = math.nan
            if not (math.isfinite(seconds) and seconds > 0):
                raise GGUFError(where(DEADLINE_ENV, f"expected a number of seconds > 0, got {_one_line(raw)!r}"))
        return cls(url, seconds)

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            self.expired = True
            raise self.error()
        return left

    def error(self) -> GGUFError:
        return GGUFError(where(self.url, f"no complete answer within {self.seconds:g} s (set {DEADLINE_ENV} to "
                                         "allow longer)"))

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv; the request then fails

    def timer(self) -> threading.Timer:
        t = threading.Timer(self.remaining(), self._fire)
        t.daemon = True
        return t


def _connection(base: type[http.client.HTTPConnection], deadline: Deadline) -> Any:
    class Watched(base):  # type: ignore[misc,valid-type]
        def connect(self) -> None:
            self.timeout = min(self.timeout or TIMEOUT_S, deadline.remaining())
            super().connect()
            deadline.watch(self.sock)

    return Watched


class _HTTP(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_connection(http.client.HTTPConnection, self.deadline), req)


class _HTTPS(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_connection(http.client.HTTPSConnection, self.deadline), req, context=self._context)


class RangeReader:
    """Fetches byte ranges of one URL into a local file (``path``) holding bytes ``[0, fetched)`` of it; ``total``
    is the remote file's size (the parser checks counts and tensor data against it)."""

    def __init__(self, url: str, tmpdir: str, deadline: Deadline | None = None) -> None:
        self.url = url
        self.fetched = 0  # bytes [0, fetched) are present in the local file
        self.total: int | None = None
        self.deadline = deadline or Deadline.start(url)
        self._opener = urllib.request.build_opener(_HTTP(self.deadline), _HTTPS(self.deadline))
        fd, self.path = tempfile.mkstemp(suffix=".gguf", dir=tmpdir)
        os.close(fd)

    def _get(self, start: int, end: int) -> bytes:
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end - 1}",
                                                        "User-Agent": f"mixrun/{__version__}"})
        timer = self.deadline.timer()
        timer.start()
        try:
            return self._request(req, start, end)
        except GGUFError:
            if self.deadline.expired:
                raise self.deadline.error() from None
            raise
        except urllib.error.HTTPError as e:
            if e.code == 416 and start > 0:
                return b""
            raise GGUFError(where(self.url, f"HTTP {e.code} {_one_line(e.reason)}")) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            if self.deadline.expired:
                raise self.deadline.error() from None
            reason = getattr(e, "reason", None) or e
            raise GGUFError(where(self.url, f"cannot fetch ({_one_line(reason) or type(e).__name__})")) from None
        finally:
            timer.cancel()

    def _request(self, req: urllib.request.Request, start: int, end: int) -> bytes:
        with self._opener.open(req, timeout=min(TIMEOUT_S, self.deadline.remaining())) as resp:
            if resp.status != 206:
                raise GGUFError(where(self.url, f"the server ignored the Range request (HTTP {resp.status}); "
                                                "download the file and inspect it locally"))
            m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
            if not m or int(m.group(1)) != start:
                raise GGUFError(where(self.url, "the server sent no usable Content-Range header"))
            total = int(m.group(3))
            if total > MAX_REMOTE_BYTES:
                raise GGUFError(where(self.url, f"implausible remote file size {total:,} bytes (Content-Range)"))
            if self.total is not None and total != self.total:
                raise GGUFError(where(self.url, "the remote file changed size while being read"))
            self.total = total
            want = max(min(end, total) - start, 0)
            body = resp.read(want + 1)
        if len(body) != want:
            raise GGUFError(where(self.url, f"the server sent {len(body):,} bytes for a {want:,}-byte range"))
        return body

    def ensure(self, end: int) -> None:
        """Make bytes [0, end) present locally (clipped to the file's size; the caller bounds ``end``)."""
        if self.total is not None:
            end = min(end, self.total)
        if end <= self.fetched:
            return
        body = self._get(self.fetched, end)
        try:
            with open(self.path, "r+b") as f:
                f.seek(self.fetched)
                f.write(body)
        except OSError as e:
            raise GGUFError(where(self.url, f"cannot store the fetched header ({e.strerror or e})")) from None
        self.fetched += len(body)
