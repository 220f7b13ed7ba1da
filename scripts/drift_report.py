"""The drift report of `scripts/test --latest`: how today's newest releases differ from the lock,
and what the suite said about them, so a new release that breaks something is a report to act on
rather than a red main.

    python scripts/drift_report.py LOCK PYTEST_LOG PYTEST_STATUS < pip-freeze-output > REPORT
"""

from __future__ import annotations

import platform
import re
import sys
import time
from pathlib import Path

_PIN = re.compile(r"([A-Za-z0-9._-]+)==(\S+)")


def pins(text: str) -> dict[str, tuple[str, str]]:
    """Normalised name -> (name as written, version) for each ``name==version`` line."""
    found = {}
    for line in text.splitlines():
        match = _PIN.fullmatch(line.strip())
        if match:
            found[re.sub(r"[-_.]+", "-", match[1]).lower()] = (match[1], match[2])
    return found


def drift(locked_text: str, installed_text: str) -> tuple[list[str], list[str]]:
    """One line per installed package whose version is not the locked one, and the names of the
    locked packages that are not installed (the lock also covers the bench extra)."""
    locked, now = pins(locked_text), pins(installed_text)
    changed = []
    for key in sorted(now):
        if key not in locked:
            changed.append(f"{now[key][0]} not locked -> {now[key][1]}")
        elif locked[key][1] != now[key][1]:
            changed.append(f"{now[key][0]} {locked[key][1]} -> {now[key][1]}")
    return changed, [locked[key][0] for key in sorted(locked.keys() - now.keys())]


def pytest_summary(log: str) -> list[str]:
    """pytest's short summary (failures, errors, skips) and its final count line."""
    lines = log.rstrip().splitlines()
    for i, line in enumerate(lines):
        if "short test summary info" in line:
            return lines[i + 1:]
    return lines[-1:]


def report(locked_text: str, installed_text: str, log: str, status: int) -> str:
    changed, absent = drift(locked_text, installed_text)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return "\n".join([
        f"Newest releases against the lock, {when}, Python {platform.python_version()}",
        "",
        f"Packages, locked -> installed ({len(changed)} differ):",
        *(f"  {line}" for line in changed or ["none"]),
        "Locked but not installed by .[test] (the bench extra, or no longer needed): "
        + (", ".join(absent) or "none"),
        "",
        f"pytest exit status {status}:",
        *(f"  {line}" for line in pytest_summary(log)),
        "",
    ])


if __name__ == "__main__":
    lock, log, status = sys.argv[1:]
    sys.stdout.write(report(Path(lock).read_text(), sys.stdin.read(),
                            Path(log).read_text(errors="replace"), int(status)))
