"""The wheel a plain ``pip install .`` builds holds every module and data file the source tree has.

The README installs in editable mode, which serves the source tree itself, so a package missing from
``pyproject.toml``'s list goes unnoticed there; a wheel (PyPI, or the one carried to a GPU machine) would lack it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the installed package's folders, by the source folder they come from (pyproject's package-dir)
SOURCES = {"mixrun": "mixrun", "tui": "mixrun/tui", "profiles": "mixrun/profiles"}


def test_the_wheel_holds_every_module_and_data_file(tmp_path: Path) -> None:
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                               ".whl", ".venv", "tests", "docs", "benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=240)
    wheel = next((tmp_path / "dist").glob("mixrun-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"{dest}/{p.relative_to(ROOT / folder).as_posix()}"
            for folder, dest in SOURCES.items()
            for p in (ROOT / folder).rglob("*")
            if p.suffix in (".py", ".toml", ".tcss") and "__pycache__" not in p.parts}
    assert "mixrun/backends/torch/worker.py" in want and "mixrun/profiles/cpu-only.toml" in want
    assert not want - names, f"missing from the wheel: {sorted(want - names)}"
