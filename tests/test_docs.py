"""The documentation stands alone and follows the code.

- No tracked file points at notes users never get (the private design and reference notes that
  lived outside the repository).
- docs/strategies.md has a section per registered strategy naming every option its constructor
  takes, and every flag of ``diffsearch distill``: read from the code, so a new or renamed option
  fails here until it is documented.
- Every relative link in README.md and docs/*.md reaches a file (and heading) that exists.
"""

from __future__ import annotations

import inspect
import re
import subprocess
from pathlib import Path

import pytest

from diffsearch.cli_distill import distill_command
from diffsearch.strategies.registry import strategy_class, strategy_names

ROOT = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()
PRIVATE_REFERENCE = re.compile(rb"\.\./shared|DESIGN\.md|REFERENCES\.md")
"""The private design notes kept beside the checkout (the parent folder's notes folder, its
design and references files), by path or by bare file name: users never get them."""
COMMON_ARGUMENTS = {"prompt_index", "prompt", "num_steps", "budget_nfe", "seed"}
"""What the engine passes to every strategy: not options a user sets."""
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")


def tracked_files() -> list[str]:
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    return [name for name in listing.decode().split("\0") if name]


def test_no_file_points_at_private_notes() -> None:
    offenders = []
    for name in tracked_files():
        path = ROOT / name
        if name == THIS_FILE or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (model weights, images)
            continue
        for number, line in enumerate(data.splitlines(), 1):
            if PRIVATE_REFERENCE.search(line):
                offenders.append(f"{name}:{number}: {line.decode(errors='replace').strip()}")
    assert not offenders, "references to files users never get:\n" + "\n".join(offenders)


def sections(markdown: str) -> list[tuple[str, str]]:
    """(heading, body) for every heading; a body runs to the next heading of its level or
    higher."""
    lines = markdown.splitlines()
    found = []
    in_code = False
    headings = []
    for index, line in enumerate(lines):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := HEADING.match(line)):
            headings.append((index, len(match.group(1)), match.group(2)))
    for position, (index, level, title) in enumerate(headings):
        end = next((i for i, lvl, _ in headings[position + 1:] if lvl <= level), len(lines))
        found.append((title, "\n".join(lines[index + 1:end])))
    return found


STRATEGIES_DOC = (ROOT / "docs" / "strategies.md").read_text(encoding="utf-8")


def strategy_section(name: str) -> str:
    titled = [body for title, body in sections(STRATEGIES_DOC) if f"`{name}`" in title]
    assert titled, f"docs/strategies.md has no section titled with `{name}`"
    return titled[0]


def constructor_options(name: str) -> list[str]:
    """The keyword arguments of the strategy's constructor, and any option it declares checks
    for: the options a job may set."""
    cls = strategy_class(name)
    parameters = inspect.signature(cls.__init__).parameters.values()
    names = [p.name for p in parameters
             if p.name != "self" and p.name not in COMMON_ARGUMENTS
             and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return list(dict.fromkeys([*names, *cls.option_checks]))


@pytest.mark.parametrize("name", strategy_names())
def test_every_strategy_and_option_is_documented(name: str) -> None:
    section = strategy_section(name)
    missing = [option for option in constructor_options(name) if f"`{option}`" not in section]
    assert not missing, f"docs/strategies.md, section {name}: options not described: {missing}"


def test_option_introspection_sees_the_options() -> None:
    """The check above would pass vacuously if introspection found nothing."""
    assert {"schedule", "population", "elites", "beta"} <= set(constructor_options("evosearch"))
    assert "n" in constructor_options("best-of-n")


def test_every_distill_flag_is_documented() -> None:
    titled = [body for title, body in sections(STRATEGIES_DOC) if "diffsearch distill" in title]
    assert titled, "docs/strategies.md has no section on `diffsearch distill`"
    flags = [max(param.opts, key=len) for param in distill_command.params if param.opts]
    missing = [flag for flag in flags if f"`{flag}`" not in titled[0]]
    assert flags and not missing, f"diffsearch distill flags not described: {missing}"


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for title, _ in sections(path.read_text(encoding="utf-8")):
        base = slug(title)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links:\n" + "\n".join(broken)


def test_every_model_family_has_its_row_in_models_md() -> None:
    """docs/models.md's table names every family diffsearch can load (read from the code)."""
    from diffsearch.pipelines.sources import FAMILIES

    table = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    rows = {match.group(1) for match in re.finditer(r"^\| `([\w-]+)` \(`(\w+)`", table, re.M)}
    missing = sorted(f.name for f in FAMILIES.values() if f.name not in rows)
    assert not missing, f"docs/models.md has no row for: {missing}"
    for pipeline, family in FAMILIES.items():
        assert f"`{family.name}` (`{pipeline}`" in table, (family.name, pipeline)
