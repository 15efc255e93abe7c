"""The one error handler of the command line and the evaluation scripts: an error the user can fix
(a bad argument, a missing file or model, a missing optional package) is printed as one line
``cakekv: error: ...`` on stderr and the command exits with code 2, as argparse does for its own
errors. Anything else is a bug and keeps its traceback.

Imports nothing heavy: the command line uses it before torch is loaded."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2  # argparse's exit code for a bad command line


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded from local files."""


USER_ERRORS = (ModelLoadError, FileNotFoundError, ValueError, TypeError, ImportError)


def report_user_errors(func: Callable[..., T]) -> Callable[..., T | int]:
    """Decorate an entry point so that :data:`USER_ERRORS` become one line on stderr and exit code 2."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except USER_ERRORS as e:
            print(f"cakekv: error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
    return wrapper
