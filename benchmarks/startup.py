"""CLI start-up time, as a ratio against a bare ``python -c pass`` measured in the same run.

Usage: python benchmarks/startup.py [--runs N]
Prints median wall time per command and its ratio to the bare interpreter start.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass (reference)": [sys.executable, "-c", "pass"],
    "mixrun --version": ["mixrun", "--version"],
    "mixrun --help": ["mixrun", "--help"],
    "mixrun inspect (bundled SmolLM2)": ["mixrun", "inspect", "--json", "--no-tensors"],
}


def median_seconds(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=11)
    args = ap.parse_args()
    if not shutil.which("mixrun"):
        sys.exit("mixrun is not on PATH: install it first (see README)")
    ref = None
    print(f"{'command':40} {'median s':>9} {'x python':>9}")
    for name, cmd in COMMANDS.items():
        s = median_seconds(cmd, args.runs)
        ref = ref or s
        print(f"{name:40} {s:9.3f} {s / ref:9.2f}")


if __name__ == "__main__":
    main()
