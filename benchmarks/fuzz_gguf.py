"""Fuzz ``mixrun inspect`` with hostile GGUF headers and hostile HTTP servers; print tried/clean/failed per class.

Usage: python benchmarks/fuzz_gguf.py [--seconds S] [--seed N] [--classes a,b] [--subprocess K] [--json]

A trial is *clean* when ``mixrun inspect`` either fails with exactly one line on stderr (``mixrun: FILE: problem``),
exit 2, no traceback, or succeeds (a mutation can leave a valid file) with nothing on stderr and no terminal control
character on stdout; in both cases within the time bound (10 s local, the deadline + 3 s remote) and the
``tracemalloc`` peak bound (256 MiB). Anything else (another exception, a second stderr line, a warning, a timeout,
a larger peak) is *failed* and printed. Trials run in-process through ``mixrun.cli.main`` (fast); the first
``--subprocess`` trials of each local class also run as ``python -m mixrun.cli inspect`` in a child with a timeout,
where a signal, a traceback or a maximum RSS over 1 GiB fails the trial.

Classes (each gets an equal share of ``--seconds``; ``--classes`` picks some):
truncate (every prefix of a small valid header), bitflip (random bytes of a valid header rewritten), counts (huge
tensor/KV counts in sparse files), layers (huge ``blk.N`` without block_count), arrays (huge or odd metadata arrays),
strings (huge string and name lengths), tensorinfo (random dims, types, offsets), shapes (metadata contradicting the
tensor shapes), escapes (ESC/OSC/BEL/C1/bidi in names, then the rendered output checked), special (FIFO,
``/dev/zero``, ``/dev/null``, a directory), remote (a loopback server: bad Content-Range, long and many header lines,
redirect loops, trickles, closes, lies about sizes and counts).
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import gguf  # noqa: E402
from fuzzing import one_clean_line, run_cli  # noqa: E402

import gguf_factory as gf  # noqa: E402

LOCAL_S = 10.0
PEAK_BYTES = 256 << 20
RSS_BYTES = 1 << 30
REMOTE_DEADLINE_S = 1.0
S, ARR, U8, U32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8, gguf.GGUFValueType.UINT32
CONTROL = "\x1b\x07\x9b\u202e\x00\r\x08"


def _arch(name: str = "llama") -> tuple[str, int, bytes]:
    return ("general.architecture", S, gf.kv_str(name))


class Result:
    def __init__(self) -> None:
        self.tried = self.clean = 0
        self.failed: list[str] = []


def run_inprocess(target: str, within_s: float) -> str | None:
    """None when ``mixrun inspect TARGET`` behaves cleanly, else what went wrong."""
    o = run_cli(["inspect", "--tensors", target], within_s, PEAK_BYTES)
    if isinstance(o, str):
        return o
    if o.rc == 0:
        if o.err or any(c in o.out for c in CONTROL):
            return f"exit 0 with stderr {o.err[:100]!r} or control characters on stdout"
        return None
    bad = one_clean_line(o)
    if bad is None and any(c in o.err for c in CONTROL.replace("\r", "")):
        return f"control character in {o.err!r}"
    return bad


def run_child(target: str) -> str | None:
    """The same check in a fresh ``python -m mixrun.cli`` (exit status, signals, maximum RSS)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    try:
        p = subprocess.run([sys.executable, "-m", "mixrun.cli", "inspect", target], capture_output=True, text=True,
                           timeout=LOCAL_S + 20, cwd=ROOT, errors="replace")
    except subprocess.TimeoutExpired:
        return "child timed out"
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if rss > RSS_BYTES and rss > before * 1024:
        return f"child max RSS {rss:,} bytes"
    if p.returncode < 0:
        return f"child killed by signal {-p.returncode}"
    if p.returncode == 0:
        return None if not p.stderr else f"child exit 0 with stderr {p.stderr[:100]!r}"
    if p.returncode != 2 or p.stderr.count("\n") != 1 or "Traceback" in p.stderr:
        return f"child exit {p.returncode}, stderr {p.stderr[:300]!r}"
    return None


# --- corpora: each yields paths (or URLs) to try -------------------------------------------------------------------

def _valid(tmp: Path) -> tuple[bytes, int]:
    p = gf.write_model(tmp / "valid.gguf", n_layers=2, n_vocab=16, n_embd=32, n_ff=64, n_head=2, n_head_kv=1)
    return p.read_bytes(), gf.header_size(p)


def gen_truncate(tmp: Path, rng: random.Random) -> Iterator[str]:
    data, header = _valid(tmp)
    cuts = list(range(header + 1)) + [rng.randrange(header, len(data)) for _ in range(50)]
    for n in cuts:
        p = tmp / "cut.gguf"
        p.write_bytes(data[:n])
        yield str(p)


def gen_bitflip(tmp: Path, rng: random.Random) -> Iterator[str]:
    data, header = _valid(tmp)
    while True:
        b = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4, 16))):
            at = rng.randrange(24 if rng.random() < 0.9 else 0, header)
            width = rng.choice((1, 4, 8))
            value = rng.choice((0, 1, 0xFF, 0xFFFFFFFF, 2**63, 2**64 - 1, rng.getrandbits(64)))
            b[at:at + width] = (value & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        p = tmp / "flip.gguf"
        p.write_bytes(bytes(b[:len(data)]))
        yield str(p)


def gen_counts(tmp: Path, rng: random.Random) -> Iterator[str]:
    while True:
        n_t = rng.choice((10**6, 3 * 10**6, 3 * 10**7, 2**40, 2**64 - 1, rng.randrange(2**18, 2**22)))
        n_kv = rng.choice((1, 2**14 + 1, 10**7, 2**63))
        size = rng.choice((10**8, 10**9, 2**40))
        yield str(gf.raw_gguf(tmp / "counts.gguf", kv=[_arch()], n_tensors=n_t, n_kv=max(n_kv, 1), size=size))


def gen_layers(tmp: Path, rng: random.Random) -> Iterator[str]:
    while True:
        n = rng.choice((4096, 50_000_000, 10**9, 10**20, 10**300, rng.getrandbits(64)))
        tensors = [(f"blk.{n}.attn_norm.weight", (32,), 0, 0), (f"blk.{rng.randrange(4096)}.ffn_norm.weight", (32,), 0, 128)]
        yield str(gf.raw_gguf(tmp / "layers.gguf", kv=[_arch(rng.choice(("llama", "foo")))], tensors=tensors,
                              size=400_000))


def gen_arrays(tmp: Path, rng: random.Random) -> Iterator[str]:
    types = list(gguf.GGUFValueType)
    while True:
        itype = rng.choice(types + [99, 2**31])
        count = rng.choice((10**9, 2**22 + 1, 2**50, 2**64 - 1, rng.randrange(0, 2**20)))
        items = bytes(min(count, 1 << 16)) if rng.random() < 0.5 else b""
        kv = [_arch(), ("foo.arr", ARR, gf.kv_array(int(itype), count, items))]
        yield str(gf.raw_gguf(tmp / "arrays.gguf", kv=kv, tensors=[("token_embd.weight", (32,), 0, 0)],
                              size=rng.choice((None, 10**9 + 4096, 2**36))))


def gen_strings(tmp: Path, rng: random.Random) -> Iterator[str]:
    while True:
        n = rng.choice((2**24, 2**32, 2**60, 2**64 - 1, rng.randrange(2**25)))
        which = rng.randrange(3)
        if which == 0:  # a string value
            kv, tensors = [_arch(), ("general.name", S, struct.pack("<Q", n))], []
        elif which == 1:  # a key
            kv, tensors = [], []
            p = tmp / "strings.gguf"
            with open(p, "wb") as f:
                f.write(struct.pack("<IIQQQ", gguf.GGUF_MAGIC, 3, 0, 1, n))
                f.truncate(min(n + 4096, 2**40))
            yield str(p)
            continue
        else:  # a tensor name
            kv, tensors = [_arch()], [("x" * rng.choice((64, 1025, 70_000)), (32,), 0, 0)]
        yield str(gf.raw_gguf(tmp / "strings.gguf", kv=kv, tensors=tensors, size=min(n + 4096, 2**40)))


def gen_tensorinfo(tmp: Path, rng: random.Random) -> Iterator[str]:
    big = (0, 1, 31, 32, 2**31, 2**32, 2**63, 2**64 - 1)
    while True:
        n_dims = rng.choice((0, 1, 2, 3, 4, 5, 2**32 - 1))
        dims = tuple(rng.choice(big) for _ in range(min(n_dims, 6)))
        qtype = rng.choice((0, 1, 2, 8, 12, 14, 39, 250, 2**32 - 1))
        offset = rng.choice((0, 32, 2**63, 2**64 - 1, rng.getrandbits(64)))
        name = rng.choice(("token_embd.weight", "blk.0.attn_q.weight", "\xff", ""))
        p = tmp / "ti.gguf"
        b = gf.kv_str(name.encode("latin-1")) + struct.pack("<I", n_dims)
        b += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", qtype, offset)
        gf.raw_gguf(p, kv=[_arch()], n_tensors=rng.choice((1, 2)))
        with open(p, "ab") as f:
            f.write(b)
            f.truncate(rng.choice((4096, 2**30)))
        yield str(p)


def gen_shapes(tmp: Path, rng: random.Random) -> Iterator[str]:
    archs = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")
    keys = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "attention.key_length", "attention.value_length", "vocab_size")
    base = {a: gf.write_model(tmp / f"{a}.gguf", a, head_dim=16, n_ff=96, sparse=True) for a in archs}
    while True:
        arch = rng.choice(archs)
        src = base[arch]
        reader = gguf.GGUFReader(str(src))
        key = f"{arch}.{rng.choice(keys)}"
        data = bytearray(src.read_bytes())
        if key in reader.fields:
            f = reader.fields[key]
            struct.pack_into("<I", data, f.offset + 8 + len(key) + 4, rng.choice((0, 1, 3, 7, 48, 2**31, 2**32 - 1)))
        p = tmp / "shape.gguf"
        p.write_bytes(bytes(data))
        with open(p, "r+b") as fh:
            fh.truncate(src.stat().st_size)
        yield str(p)


def gen_escapes(tmp: Path, rng: random.Random) -> Iterator[str]:
    pieces = ["\x1b[2J", "\x1b]0;pwned\x07", "\x1b]8;;http://x\x1b\\", "\x9b31m", "\u202e", "[bold red]", "[/]",
              "\r", "\x08", "ok", "\x00"]
    while True:
        def text() -> str:
            return "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 6)))
        kv = [_arch(rng.choice(("llama", text()))), ("general.name", S, gf.kv_str(text())),
              ("tokenizer.ggml.model", S, gf.kv_str(text()))]
        yield str(gf.raw_gguf(tmp / "esc.gguf", kv=kv, tensors=[(text(), (32,), 0, 0)], size=4096))


def gen_special(tmp: Path, rng: random.Random) -> Iterator[str]:
    fifo = tmp / "fifo.gguf"
    if not fifo.exists():
        os.mkfifo(fifo)
    (tmp / "dir.gguf").mkdir(exist_ok=True)
    while True:
        yield from (str(fifo), "/dev/zero", "/dev/null", str(tmp / "dir.gguf"), "/dev/urandom")


# --- remote: one loopback server whose behaviour is chosen per request path ----------------------------------------

def _behaviours(data: bytes) -> dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]]:
    def partial(total: int | None = None, status: int = 206, start_shift: int = 0, body_cut: int = 0):
        def go(h: http.server.BaseHTTPRequestHandler) -> None:
            rng = h.headers.get("Range", "bytes=0-0")[6:].split("-")
            start, end = int(rng[0]), int(rng[1])
            size = len(data) if total is None else total
            end = min(end, size - 1)
            body = data[start:end + 1].ljust(max(end + 1 - start, 0), b"\0")
            h.send_response(status)
            h.send_header("Content-Range", f"bytes {start + start_shift}-{end}/{size}")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[:len(body) - body_cut])
        return go

    def raw(blob: bytes):
        return lambda h: h.wfile.write(blob)

    def trickle(blob: bytes):
        def go(h: http.server.BaseHTTPRequestHandler) -> None:
            for i in range(min(len(blob), 60)):
                h.wfile.write(blob[i:i + 1])
                h.wfile.flush()
                time.sleep(0.1)
        return go

    def redirect(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", h.path)
        h.send_header("Content-Length", "0")
        h.end_headers()

    head = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-524287/%d\r\nContent-Length: 524288\r\n\r\n" % len(data)
    return {
        "total_2_62": partial(total=1 << 62), "total_small": partial(total=30), "total_zero": partial(total=0),
        "status_200": partial(status=200), "wrong_start": partial(start_shift=7), "short_body": partial(body_cut=100),
        "long_line": raw(b"HTTP/1.1 206 Partial Content\r\nX-Long: " + b"a" * (10 << 20) + b"\r\n\r\n"),
        "many_headers": raw(b"HTTP/1.1 206 Partial Content\r\n" + b"X-A: b\r\n" * 100_000 + b"\r\n"),
        "garbage": raw(b"\x00\x1b]0;x\x07garbage\r\n\r\n"), "close": lambda h: None,
        "reason_escape": raw(b"HTTP/1.1 500 Oops\x1b]0;pwned\x07\r\nContent-Length: 0\r\n\r\n"),
        "bad_length": raw(b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/10\r\nContent-Length: -5\r\n\r\n"),
        "redirect_loop": redirect, "trickle_head": trickle(head), "trickle_body": trickle(head + data[:100]),
    }


@contextlib.contextmanager
def _server(tmp: Path, data: bytes) -> Iterator[str]:
    table: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]] = dict(_behaviours(data))
    many = gf.raw_gguf(tmp / "many.gguf", kv=[_arch()], n_tensors=5_000_000, size=200_000_000).read_bytes()
    table["many_tensors"] = lambda h: _serve_sparse(h, many, 200_000_000)

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            with contextlib.suppress(OSError):
                table[self.path.strip("/").split(".")[0]](self)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def _serve_sparse(h: http.server.BaseHTTPRequestHandler, head: bytes, size: int) -> None:
    start, end = (int(x) for x in h.headers.get("Range", "bytes=0-0")[6:].split("-"))
    end = min(end, size - 1)
    body = head[start:end + 1].ljust(end + 1 - start, b"\0")
    h.send_response(206)
    h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


CLASSES: dict[str, Callable[[Path, random.Random], Iterator[str]]] = {
    "truncate": gen_truncate, "bitflip": gen_bitflip, "counts": gen_counts, "layers": gen_layers,
    "arrays": gen_arrays, "strings": gen_strings, "tensorinfo": gen_tensorinfo, "shapes": gen_shapes,
    "escapes": gen_escapes, "special": gen_special,
}


def fuzz_local(name: str, seconds: float, rng: random.Random, n_child: int) -> Result:
    res = Result()
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        end = time.monotonic() + seconds
        for target in CLASSES[name](Path(tmp), rng):
            if time.monotonic() > end:
                break
            res.tried += 1
            problem = run_inprocess(target, LOCAL_S)
            if problem is None and res.tried <= n_child:
                problem = run_child(target)
            if problem is None:
                res.clean += 1
            else:
                res.failed.append(f"{target}: {problem}")
    return res


def fuzz_remote(seconds: float, rng: random.Random) -> Result:
    res = Result()
    os.environ["MIXRUN_HTTP_DEADLINE_S"] = str(REMOTE_DEADLINE_S)
    with tempfile.TemporaryDirectory(prefix="fuzz-remote-") as tmp:
        data = gf.write_model(Path(tmp) / "v.gguf", n_layers=2, n_vocab=16, n_embd=32, n_ff=64).read_bytes()
        with _server(Path(tmp), data) as base:
            names = [*_behaviours(data), "many_tensors"]
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                name = names[i % len(names)] if i < len(names) else rng.choice(names)
                i += 1
                res.tried += 1
                problem = run_inprocess(f"{base}/{name}.gguf", REMOTE_DEADLINE_S + 3)
                if problem is None:
                    res.clean += 1
                else:
                    res.failed.append(f"{name}: {problem}")
    return res


def main_(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="total time, shared equally by the classes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", default=",".join([*CLASSES, "remote"]))
    ap.add_argument("--subprocess", type=int, default=3, help="trials per local class also run in a child process")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    names = [c for c in args.classes.split(",") if c]
    share = args.seconds / len(names)
    rng = random.Random(args.seed)
    results = {}
    for name in names:
        results[name] = fuzz_remote(share, rng) if name == "remote" else fuzz_local(name, share, rng, args.subprocess)
        r = results[name]
        if not args.json:
            print(f"{name:12s} tried {r.tried:6,d}  clean {r.clean:6,d}  failed {len(r.failed):4,d}", flush=True)
            for f in r.failed[:5]:
                print(f"    {f}", flush=True)
    total_failed = sum(len(r.failed) for r in results.values())
    if args.json:
        print(json.dumps({n: {"tried": r.tried, "clean": r.clean, "failed": len(r.failed), "examples": r.failed[:5]}
                          for n, r in results.items()}, indent=2))
    else:
        print(f"{'total':12s} tried {sum(r.tried for r in results.values()):6,d}  "
              f"clean {sum(r.clean for r in results.values()):6,d}  failed {total_failed:4,d}")
    return 1 if total_failed else 0


if __name__ == "__main__":
    sys.exit(main_())
