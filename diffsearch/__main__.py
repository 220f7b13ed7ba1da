"""``python -m diffsearch``: the same CLI as the ``diffsearch`` command."""

from diffsearch.cli import main

main(prog_name="diffsearch")
