"""How every ``diffsearch`` command reports input the user can fix: one line, exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar

import click

from diffsearch.errors import DiffsearchError

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def one_line_errors(command: F) -> F:
    """Turn a :class:`DiffsearchError` (bad input, not a bug) into :func:`fail`."""
    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DiffsearchError as error:
            fail(str(error))

    return wrapper  # type: ignore[return-value]
