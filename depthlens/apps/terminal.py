"""How the ``depthlens`` command prints warnings: one line each, ``depthlens: warning: MESSAGE``.

Python's default format adds the file and line that raised the warning and that line's source,
which for a warning raised inside a decorated function (``torch.no_grad``) is a stray
``return func(*args, **kwargs)`` from the decorator. A command's warnings are meant for its user,
so the command line prints only the message (with the warning's class where it is not a plain
``UserWarning``, which is what depthlens raises).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager


def one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                     line: str | None = None) -> str:
    """``depthlens: warning: MESSAGE`` (``depthlens: FutureWarning: MESSAGE`` for other classes),
    in the signature of :func:`warnings.formatwarning`."""
    kind = "warning" if category is UserWarning else category.__name__
    return f"depthlens: {kind}: {message}\n"


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """Inside the block, print every warning with :func:`one_line_warning` (the command line runs
    each command in one; the library, and the process after the block, keep Python's format)."""
    previous = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    try:
        yield
    finally:
        warnings.formatwarning = previous


__all__ = ["one_line_warning", "one_line_warnings"]
