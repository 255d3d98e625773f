"""User errors: the one place that turns them into a one-line message and exit code 2.

A mistake the user can fix (a wrong path, value, config field or file) is raised as
:class:`UserError` (or one of the ValueError / OSError subclasses the modules raise with a message
that names the file or value); the commands print ``error: <message>`` and exit with code 2. The
traceback is printed too with ``--verbosity`` (absl commands) or ``CLIPSEP_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

__all__ = ["UserError", "DEBUG_ENV", "USER_ERRORS", "debugging", "report", "config_value",
           "parse_flags"]

DEBUG_ENV = "CLIPSEP_DEBUG"


class UserError(ValueError):
    """A mistake the user can fix; the message names the file or value and what to do."""


# What the commands treat as the user's mistake (their messages name the file or value); any
# other exception is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)


def debugging() -> bool:
    """Whether tracebacks are wanted: ``CLIPSEP_DEBUG=1`` or an explicit ``--verbosity``."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        return True
    try:
        from absl import flags

        return flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present
    except (ImportError, KeyError):
        return False


def report(error: BaseException, code: int = 2) -> int:
    """Prints ``error: <message>`` (and the traceback when debugging); returns ``code``."""
    if debugging():
        traceback.print_exception(error)
    message = str(error) or type(error).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    if not debugging():
        print(f"(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
    return code


def _config_message(error: BaseException) -> str:
    text = str(error).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    return f"--config: unknown field {text}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for ``app.run(main, flags_parser=parse_flags)``: a wrong flag or
    config override (applied while parsing) is one line and exit code 2, not a traceback."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        message = str(error)
        cause = error.__cause__ or error.__context__
        if isinstance(cause, AttributeError | KeyError):
            message = _config_message(cause)
        print(f"error: {message}", file=sys.stderr, flush=True)
    except (AttributeError, KeyError) as error:
        print(f"error: {_config_message(error)}", file=sys.stderr, flush=True)
    sys.exit(2)


def config_value(flag: Any) -> Any:
    """The value of an ml_collections config flag; a wrong override (``--config.train.batchsize``)
    becomes a UserError with ml_collections' suggestion."""
    try:
        return flag.value
    except (AttributeError, KeyError) as error:
        raise UserError(_config_message(error)) from error
