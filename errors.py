"""The one exception type for bad user input, and how any error is cut to the one line a user sees.

The CLI prints a ``SeptError`` as one line and exits 2. Errors from libraries and from Ray tasks are
reported the same way, through ``first_line`` and ``task_cause``, so every stage words them alike.
"""

from __future__ import annotations


class SeptError(Exception):
    """Bad input or a refused operation. The message names the file, shard or key at fault."""


def task_cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised, unwrapped from the ``RayTaskError`` that carries it.

    Ray re-raises a task's exception in the driver wrapped, with the remote traceback in its text;
    its ``cause`` is the original. Any other exception is returned as it is.
    """
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def first_line(exc: BaseException | str, limit: int | None = None) -> str:
    """The first non-empty line of an error's message (its type's name when it has none).

    ``limit`` cuts it to that many characters, for log lines that must stay short.
    """
    text = (exc if isinstance(exc, str) else str(exc)).strip()
    line = text.splitlines()[0] if text else (type(exc).__name__ if not isinstance(exc, str) else "")
    return line[:limit] if limit is not None else line
