"""Remote GGUF headers over HTTP Range requests, against a local server that honours Range."""

from __future__ import annotations

import http.server
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import gguf_factory
from mixrun.errors import GGUFError
from mixrun.model.gguf import read_spec


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
