"""What every benchmark does with its report: say how it was run, save it, print it."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def command_line(argv: list[str] | None) -> str:
    """The command that reproduces this run (``argv`` as given to ``main``, else the shell's),
    quoted for a POSIX shell so that JSON options (``--config``, ``--guide``) paste back as
    given."""
    return "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])


def verifier_spec(text: str) -> str | dict[str, Any]:
    """A verifier given on the command line: a registry name, or a spec in JSON (an ensemble,
    a ``shift-average``); its scores are stored under ``verifier_label`` of it."""
    return json.loads(text) if text.lstrip().startswith("{") else text


def save_report(report: dict[str, Any], name: str, *, show: bool = True) -> Path:
    """Write ``report`` to ``benchmarks/results/<name>.json`` (and print it when ``show``:
    benchmarks that print a row as each finishes do not repeat them)."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    text = json.dumps(report, indent=2)
    path.write_text(text + "\n")
    if show:
        print(text)
    return path


def save_plot(draw: Callable[[Path], None], name: str) -> None:
    """``draw`` to ``benchmarks/results/<name>.png``; matplotlib is the optional bench extra."""
    try:
        draw(RESULTS / f"{name}.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
