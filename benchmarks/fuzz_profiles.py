"""Fuzz rig profiles the way a shared, hostile or damaged profile would arrive, through the commands users run.

Usage: python benchmarks/fuzz_profiles.py [--seconds S] [--seed N] [--json]

Each trial writes one profile and runs ``mixrun profile validate FILE`` and ``mixrun plan MODEL -p FILE --json``
in-process on the bundled model (warnings as errors). A trial is clean when each command exits 0 (plan: 0 or 3,
nothing fits), or exits 2 with exactly one ``mixrun:`` line on stderr and no traceback, within 10 s, and again
under ``tracemalloc`` (120 s: it slows planning about 6x) within a 256 MiB peak. Classes (an equal share of ``--seconds`` each):

- mutate:  1-8 random edits of a bundled profile's text (bytes, tokens, numbers swapped for extremes)
- numbers: every numeric field set to 0, negatives, denormals, 1e308, inf, nan, 2^63, huge integers
- nesting: arrays/inline tables nested up to 5,000 deep, dotted keys of up to 100,000 parts
- sizes:   up to MAX_DEVICES + 1 devices and MAX_LINKS + 1 links, names of up to 100,000 characters
- special: a FIFO, /dev/zero, /dev/null, a directory, a symlink to /dev/urandom, binary junk
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzzing import one_clean_line, run_cli  # noqa: E402

from mixrun.rig.profile import MAX_DEVICES, MAX_LINKS  # noqa: E402

WITHIN_S = 10.0
TRACED_S = 120.0  # the same trial under tracemalloc, which slows planning about 6x
PEAK_BYTES = 256 << 20
BUNDLED = sorted((ROOT / "profiles").glob("*.toml"))
EXTREMES = ["0", "-1", "5e-324", "1e308", "inf", "nan", "-inf", "9223372036854775808", "1" + "0" * 400, "0.0",
            "1e-9", "4096", '"x"', "[]", "{}", "true"]


def run(args: list[str], ok: tuple[int, ...]) -> str | None:
    """None when ``mixrun ARGS`` behaves cleanly, else what went wrong."""
    o = run_cli(args, WITHIN_S, None)  # timed as users run it
    if isinstance(o, str):
        return o
    traced = run_cli(args, TRACED_S, PEAK_BYTES)  # again under tracemalloc, for the memory bound
    if isinstance(traced, str):
        return traced
    return None if o.rc in ok else one_clean_line(o)


def trial(path: Path) -> str | None:
    bad = run(["profile", "validate", str(path)], (0,))
    return bad or run(["plan", "-p", str(path), "--json"], (0, 3))


# --- corpora: each yields a profile path to try ----------------------------------------------------------------------


def gen_mutate(tmp: Path, rng: random.Random) -> Iterator[Path]:
    while True:
        text = bytearray(rng.choice(BUNDLED).read_bytes())
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(text))
            match rng.randrange(4):
                case 0:
                    text[i] = rng.randrange(256)
                case 1:
                    del text[i:i + rng.randint(1, 40)]
                case 2:
                    text[i:i] = rng.choice([b"[", b"]", b"{", b"=", b'"', b"\n[[devices]]\n", b"\x00", b"\xff"])
                case _:
                    text[i:i] = rng.choice(EXTREMES).encode()
        p = tmp / "m.toml"
        p.write_bytes(bytes(text))
        yield p


def gen_numbers(tmp: Path, rng: random.Random) -> Iterator[Path]:
    import re

    number = re.compile(r"(?m)^(\s*\w+\s*=\s*)(-?[0-9][0-9_.e+-]*)")
    while True:
        text = rng.choice(BUNDLED).read_text()
        spots = list(number.finditer(text))
        for m in rng.sample(spots, min(len(spots), rng.randint(1, 4))):
            text = text.replace(m.group(0), m.group(1) + rng.choice(EXTREMES), 1)
        p = tmp / "n.toml"
        p.write_text(text)
        yield p


def gen_nesting(tmp: Path, rng: random.Random) -> Iterator[Path]:
    base = (ROOT / "profiles" / "cpu-only.toml").read_text()
    while True:
        depth = rng.choice([33, 100, 1000, 5000])
        match rng.randrange(3):
            case 0:
                extra = "\n[extra]\nx = " + "[" * depth + "]" * depth + "\n"
            case 1:
                extra = "\n[extra]\nx = " + "{a = " * depth + "1" + "}" * depth + "\n"
            case _:
                extra = "\n[extra]\n" + ".".join(f"k{i}" for i in range(rng.choice([33, 1000, 100_000]))) + " = 1\n"
        p = tmp / "d.toml"
        p.write_text(base + extra)
        yield p


def _many(n_dev: int, n_links: int, name: str) -> str:
    lines = ['format = "mixrun-profile/1"', f'name = "{name}"']
    for i in range(n_dev):
        lines += ["[[devices]]", f'id = "gpu{i}"', 'backend = "cuda"', f'name = "GPU {i % 3}"', "vram_gib = 24.0",
                  "mem_bandwidth_gbs = 900.0", "fp16_tflops = 70.0"]
    for k in range(n_links):
        a, b = k % n_dev, (k // n_dev + k % n_dev + 1) % n_dev
        if a != b:
            lines += ["[[links]]", f'between = ["gpu{a}", "gpu{b}"]', 'kind = "pcie"', "bandwidth_gbs = 25.0"]
    return "\n".join(lines) + "\n"


def gen_sizes(tmp: Path, rng: random.Random) -> Iterator[Path]:
    while True:
        n_dev = rng.choice([2, 17, MAX_DEVICES, MAX_DEVICES + 1])
        n_links = rng.choice([0, 10, MAX_LINKS // 4, MAX_LINKS + 1]) if n_dev > 2 else 0
        name = rng.choice(["ok", "x" * 64, "x" * 65, "y" * 100_000, "bad name", "\x1b]0;t\x07"])
        p = tmp / "s.toml"
        p.write_text(_many(n_dev, n_links, name))
        yield p


def gen_special(tmp: Path, rng: random.Random) -> Iterator[Path]:
    fifo = tmp / "fifo.toml"
    if not fifo.exists():
        os.mkfifo(fifo)
    link = tmp / "urandom.toml"
    if not link.exists():
        link.symlink_to("/dev/urandom")
    (tmp / "dir.toml").mkdir(exist_ok=True)
    junk = tmp / "junk.toml"
    while True:
        junk.write_bytes(rng.randbytes(rng.choice([1, 100, 5 << 20])))
        yield rng.choice([fifo, link, tmp / "dir.toml", junk, Path("/dev/zero"), Path("/dev/null")])


CLASSES: dict[str, Callable[[Path, random.Random], Iterator[Path]]] = {
    "mutate": gen_mutate, "numbers": gen_numbers, "nesting": gen_nesting, "sizes": gen_sizes, "special": gen_special}


def main_(argv: list[str] | None = None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="total time, shared equally by the classes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    report = {}
    with tempfile.TemporaryDirectory(prefix="mixrun-fuzz-profiles-") as d:
        for name, gen in CLASSES.items():
            tmp = Path(d) / name
            tmp.mkdir()
            tried, failed = 0, []
            end = time.monotonic() + args.seconds / len(CLASSES)
            for path in gen(tmp, rng):
                if time.monotonic() > end:
                    break
                tried += 1
                bad = trial(path)
                if bad:
                    failed.append(bad)
            report[name] = {"tried": tried, "clean": tried - len(failed), "failed": len(failed),
                            "examples": sorted(set(failed))[:5]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, r in report.items():
            print(f"{name:8s} tried {r['tried']:6,}  clean {r['clean']:6,}  failed {r['failed']:4,}")
            for e in r["examples"]:
                print(f"    {e}")
        total = {k: sum(r[k] for r in report.values()) for k in ("tried", "clean", "failed")}
        print(f"{'total':8s} tried {total['tried']:6,}  clean {total['clean']:6,}  failed {total['failed']:4,}")
    return 1 if any(r["failed"] for r in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main_())
