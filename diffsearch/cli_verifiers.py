"""``diffsearch verifiers ...``: see which verifiers this environment can use."""

from __future__ import annotations

import json

import click


@click.group(name="verifiers")
def verifiers() -> None:
    """Built-in and plugin verifiers (reward models)."""


@verifiers.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array instead of a table.")
def list_verifiers(as_json: bool) -> None:
    """List every verifier name with its source and whether its code imports.

    'ok' means the class imports; weights are checked only when a verifier is built.
    """
    from diffsearch.verifiers.registry import available_verifiers  # imports torch: only here

    infos = available_verifiers()
    if as_json:
        click.echo(json.dumps([info.to_dict() for info in infos], indent=2))
        return
    rows = [("NAME", "SOURCE", "STATUS")]
    rows += [(i.name, i.source, i.status if i.status == "ok" else f"error: {i.message}")
             for i in infos]
    name_width = max(len(r[0]) for r in rows)
    source_width = max(len(r[1]) for r in rows)
    for name, source, status in rows:
        click.echo(f"{name:<{name_width}}  {source:<{source_width}}  {status}")
