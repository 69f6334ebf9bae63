"""Remote GGUF headers over HTTP Range requests, against a local server that honours Range."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest

import gguf_factory
from mixrun.errors import GGUFError
from mixrun.model.gguf import read_spec
from mixrun.model.remote import FIRST_WINDOW_BYTES


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    root: Path
    honour_range = True
    sent: list[int]

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        path = self.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        size = path.stat().st_size
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if not self.honour_range or not m:
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            return  # a body is never read by mixrun here
        start = int(m.group(1))
        end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
        if start >= size:
            self.send_error(416)
            return
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.sent.append(len(body))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    servers = []

    def start(root: Path, honour_range: bool = True) -> tuple[str, list[int]]:
        sent: list[int] = []
        handler = type("H", (_RangeHandler,), {"root": root, "honour_range": honour_range, "sent": sent})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", sent

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_remote_smollm2_reads_header_only(smollm2: str, serve) -> None:
    root = Path(smollm2).parent
    url, sent = serve(root)
    remote = read_spec(f"{url}/{os.path.basename(smollm2)}")
    local = read_spec(smollm2)
    assert sum(sent) < 2 * 1024 * 1024, f"transferred {sum(sent):,} bytes"
    assert remote.tensors == local.tensors
    assert remote.file_bytes == local.file_bytes == os.path.getsize(smollm2)
    for field in ("arch", "n_layers", "n_embd", "n_head", "n_head_kv", "n_vocab", "kv_layers", "layer_bytes",
                  "total_bytes", "tied_output", "rope", "has_chat_template", "tokenizer_model"):
        assert getattr(remote, field) == getattr(local, field), field
    assert remote.source.startswith("http://")


def test_remote_split_model(tmp_path: Path, serve) -> None:
    first = gguf_factory.write_model(tmp_path / "m.gguf", split_max_tensors=7)
    url, _ = serve(tmp_path)
    remote = read_spec(f"{url}/m-00002-of-00003.gguf")
    assert len(remote.files) == 3 and remote.files[0].endswith("m-00001-of-00003.gguf")
    assert remote.tensors == read_spec(first).tensors


def test_remote_without_range_support(smollm2: str, serve) -> None:
    url, _ = serve(Path(smollm2).parent, honour_range=False)
    with pytest.raises(GGUFError, match="ignored the Range request"):
        read_spec(f"{url}/{os.path.basename(smollm2)}")


def test_remote_missing_and_truncated(tmp_path: Path, serve) -> None:
    p = gguf_factory.write_model(tmp_path / "t.gguf")
    (tmp_path / "cut.gguf").write_bytes(p.read_bytes()[:1000])
    url, _ = serve(tmp_path)
    with pytest.raises(GGUFError, match=r"nope\.gguf: HTTP 404"):
        read_spec(f"{url}/nope.gguf")
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated header"):
        read_spec(f"{url}/cut.gguf")


# --- hostile servers: every failure is one line, within the overall deadline ------------------------------------

@pytest.fixture
def hostile() -> Iterator:
    """Start a loopback server whose GET is ``behave(handler)``; returns its base URL."""
    servers = []

    def start(behave) -> str:  # noqa: ANN001 - a test callback
        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with contextlib.suppress(OSError):  # the client gave up (as it should): nothing to clean
                    behave(self)

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _one_line_error(url: str, *needles: str, deadline_s: float = 5.0, within_s: float = 4.0) -> str:
    start = time.monotonic()
    with pytest.raises(GGUFError) as exc:
        read_spec(url, http_deadline_s=deadline_s)
    elapsed = time.monotonic() - start
    msg = str(exc.value)
    assert msg.startswith(url + ": ") and "\n" not in msg and elapsed < within_s, (msg, elapsed)
    assert all(c.isprintable() for c in msg), repr(msg)
    for needle in needles:
        assert needle in msg, msg
    return msg


def _send_partial(h: http.server.BaseHTTPRequestHandler, data: bytes, total: int) -> None:
    m = re.fullmatch(r"bytes=(\d+)-(\d+)", h.headers.get("Range", ""))
    assert m
    start, end = int(m.group(1)), min(int(m.group(2)), total - 1)
    body = data[start:end + 1].ljust(end + 1 - start, b"\0")
    h.send_response(206)
    h.send_header("Content-Range", f"bytes {start}-{end}/{total}")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def test_content_range_total_of_2_62(smollm2: str, hostile) -> None:
    data = Path(smollm2).read_bytes()[:4 << 20]
    url = hostile(lambda h: _send_partial(h, data, 1 << 62)) + "/m.gguf"
    _one_line_error(url, "implausible")


def test_header_line_of_10_mb(hostile) -> None:
    def behave(h: http.server.BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"HTTP/1.1 206 Partial Content\r\nX-Long: " + b"a" * (10 << 20) + b"\r\n\r\n")

    _one_line_error(hostile(behave) + "/m.gguf", "cannot fetch")


def test_100000_response_headers(hostile) -> None:
    def behave(h: http.server.BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"HTTP/1.1 206 Partial Content\r\n" + b"X-A: b\r\n" * 100_000 + b"\r\n")

    _one_line_error(hostile(behave) + "/m.gguf", "cannot fetch", "headers")


def test_redirect_loop(hostile) -> None:
    def behave(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", h.path)
        h.send_header("Content-Length", "0")
        h.end_headers()

    _one_line_error(hostile(behave) + "/m.gguf", "HTTP 302", "redirect")


def test_reason_phrase_with_escapes(hostile) -> None:
    def behave(h: http.server.BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"HTTP/1.1 500 Oops\x1b]0;pwned\x07\r\nContent-Length: 0\r\n\r\n")

    msg = _one_line_error(hostile(behave) + "/m.gguf", "HTTP 500")
    assert "\x1b" not in msg and "\x07" not in msg


@pytest.mark.parametrize("where", ["headers", "body"])
def test_trickle_is_cut_at_the_deadline(smollm2: str, hostile, where: str) -> None:
    """One byte every 0.1 s never trips a per-read timeout; the overall deadline ends it."""
    data = Path(smollm2).read_bytes()

    def behave(h: http.server.BaseHTTPRequestHandler) -> None:
        head = (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-524287/%d\r\nContent-Length: 524288\r\n\r\n"
                % len(data))
        if where == "body":
            h.wfile.write(head)
            head = data[:200]
        for i in range(min(len(head), 100)):  # bounded: 10 s at most
            h.wfile.write(head[i:i + 1])
            h.wfile.flush()
            time.sleep(0.1)

    url = hostile(behave) + "/m.gguf"
    _one_line_error(url, "no complete answer within 1 s", "MIXRUN_HTTP_DEADLINE_S", deadline_s=1.0, within_s=3.0)


def test_deadline_from_the_environment(smollm2: str, hostile, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from mixrun.cli import main

    def behave(h: http.server.BaseHTTPRequestHandler) -> None:
        for _ in range(40):  # a status line that never ends, 4 s at most
            h.wfile.write(b"H")
            h.wfile.flush()
            time.sleep(0.1)

    url = hostile(behave) + "/m.gguf"
    monkeypatch.setenv("MIXRUN_HTTP_DEADLINE_S", "0.5")
    start = time.monotonic()
    assert main(["inspect", url]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 2.5
    assert err == f"mixrun: {url}: no complete answer within 0.5 s (set MIXRUN_HTTP_DEADLINE_S to allow longer)\n"
    monkeypatch.setenv("MIXRUN_HTTP_DEADLINE_S", "soon")
    assert main(["inspect", url]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_remote_millions_of_tensors_refused_from_the_first_window(tmp_path: Path, serve) -> None:
    arch = ("general.architecture", gguf.GGUFValueType.STRING, gguf_factory.kv_str("llama"))
    gguf_factory.raw_gguf(tmp_path / "many.gguf", kv=[arch], n_tensors=5_000_000, size=200_000_000)
    url, sent = serve(tmp_path)
    _one_line_error(f"{url}/many.gguf", "too many tensors (5,000,000")
    assert len(sent) == 1


def test_remote_header_parse_is_not_quadratic(tmp_path: Path, serve, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header of many tensor infos, fetched in growing windows: it is parsed once, the parse resuming where each
    window ends (never from byte 0 again), in O(log) requests, and costs about what the local parse costs."""
    import mixrun.model.gguf as reader

    n = 60_000
    arch = ("general.architecture", gguf.GGUFValueType.STRING, gguf_factory.kv_str("foo"))
    tensors = [(f"blk.{i % 50}.t{i}.weight", (32,), 0, 128 * i) for i in range(n)]
    p = gguf_factory.raw_gguf(tmp_path / "wide.gguf", kv=[arch], tensors=tensors)
    header = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(header + 128 * n + 64)
    parsed: list[int] = []
    real = reader.parse_part

    def counting(path: str, **kw: object) -> object:
        parsed.append(int(kw.get("header_limit") or 0))  # type: ignore[call-overload]
        return real(path, **kw)  # type: ignore[arg-type]

    info_starts: list[int] = []
    real_get = reader._BoundedReader._build_tensor_info

    def counted_infos(self: object, offs: int, count: int) -> object:
        info_starts.append(offs)  # where the tensor infos start: once, whatever the windows
        return real_get(self, offs, count)  # type: ignore[arg-type]

    start = time.perf_counter()
    local = read_spec(p)
    local_s = time.perf_counter() - start
    monkeypatch.setattr(reader, "parse_part", counting)
    monkeypatch.setattr(reader._BoundedReader, "_build_tensor_info", counted_infos)
    url, sent = serve(tmp_path)
    start = time.perf_counter()
    remote = read_spec(f"{url}/wide.gguf")
    remote_s = time.perf_counter() - start
    assert remote.tensors == local.tensors
    assert header > 4 * FIRST_WINDOW_BYTES  # several windows' worth
    assert len(parsed) == 1 and len(info_starts) == 1, (parsed, info_starts)  # one parse, resumed across the windows
    assert 2 <= len(sent) <= 12, sent  # several windows, O(log) of them
    assert sum(sent) < header + (1 << 20)
    assert remote_s < 6 * local_s + 1.0, (remote_s, local_s)
