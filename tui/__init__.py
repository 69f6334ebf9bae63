"""The Textual app of mixrun, imported as ``mixrun.tui``.

``run(args)`` serves ``mixrun tui``; ``make_app(...)`` builds the same app for tests. Textual is imported only
when one of them is called, so importing this package stays cheap.
"""

from __future__ import annotations

from typing import Any


def make_app(*args: Any, **kwargs: Any) -> Any:
    from mixrun.tui.app import make_app as _make_app

    return _make_app(*args, **kwargs)


def run(args: Any) -> int:
    from mixrun.tui.app import run as _run

    return _run(args)
