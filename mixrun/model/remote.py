"""A byte source for remote GGUFs: HTTP Range requests into a sparse local file, so a 40 GB model's header can be
read before downloading it.

The bytes fetched so far are written at their offsets into a sparse temporary file as large as the remote file.
The GGUF reader (:mod:`mixrun.model.gguf`) parses that file up to what was fetched and asks for more where the header
runs past it; this module only fetches. Tensor data is never downloaded.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.error
import urllib.request

from mixrun import __version__
from mixrun.errors import GGUFError, where

FIRST_WINDOW_BYTES = 512 * 1024
MAX_HEADER_BYTES = 512 * 1024 * 1024  # no real GGUF header is this large; stop before fetching more
TIMEOUT_S = 30.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class RangeReader:
    """Fetches byte ranges of one URL into a sparse local file (``path``); bytes ``[0, fetched)`` are present."""

    def __init__(self, url: str, tmpdir: str) -> None:
        self.url = url
        self.fetched = 0  # bytes [0, fetched) are present in the local file
        self.total: int | None = None
        fd, self.path = tempfile.mkstemp(suffix=".gguf", dir=tmpdir)
        os.close(fd)

    def _get(self, start: int, end: int) -> bytes:
        req = urllib.request.Request(self.url, headers={"Range": f"bytes={start}-{end - 1}",
                                                        "User-Agent": f"mixrun/{__version__}"})
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                if resp.status != 206:
                    raise GGUFError(where(self.url, f"the server ignored the Range request (HTTP {resp.status}); "
                                                    "download the file and inspect it locally"))
                m = _CONTENT_RANGE.fullmatch(resp.headers.get("Content-Range", "").strip())
                if not m or int(m.group(1)) != start:
                    raise GGUFError(where(self.url, "the server sent no usable Content-Range header"))
                total = int(m.group(3))
                if self.total is not None and total != self.total:
                    raise GGUFError(where(self.url, "the remote file changed size while being read"))
                self.total = total
                want = min(end, total) - start
                body = resp.read(want + 1)
        except urllib.error.HTTPError as e:
            if e.code == 416 and start > 0:
                return b""
            raise GGUFError(where(self.url, f"HTTP {e.code} {e.reason}")) from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise GGUFError(where(self.url, f"cannot fetch ({reason})")) from None
        if len(body) != want:
            raise GGUFError(where(self.url, f"the server sent {len(body):,} bytes for a {want:,}-byte range"))
        return body

    def ensure(self, end: int) -> None:
        """Make bytes [0, end) present locally (clipped to the file's size)."""
        if self.total is not None:
            end = min(end, self.total)
        if end <= self.fetched:
            return
        if end > MAX_HEADER_BYTES:
            raise GGUFError(where(self.url, f"header larger than {MAX_HEADER_BYTES >> 20} MiB; not a usable GGUF"))
        body = self._get(self.fetched, end)
        with open(self.path, "r+b") as f:
            f.seek(self.fetched)
            f.write(body)
            f.truncate(self.total)  # sparse: the rest of the file reads as zeros and takes no disk
        self.fetched += len(body)
