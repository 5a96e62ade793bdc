"""How the command line fails: one line on stderr and a documented exit code, never a traceback.

Kept apart from the rendering (rich) and the library (torch), so a command's failure path costs
nothing to import.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from .errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_UNUSABLE, LoratoolError


def error_line(message: str, stream: TextIO | None = None) -> None:
    print(f"loratool: error: {message}", file=stream or sys.stderr)


class _Terminated(BaseException):
    """SIGTERM, raised where the process is so that every open writer drops its temporary file."""


def _terminate(_signum: int, _frame: object) -> None:
    raise _Terminated


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Every failure becomes one line on stderr and a documented exit code, never a traceback.

    Ctrl-C and SIGTERM unwind like errors, so writers remove their temporary files and DEST is
    left as it was (SIGKILL cannot be caught: DEST is still untouched, a temporary file may stay).
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        try:
            return command(*args, **kwargs)
        except LoratoolError as exc:
            error_line(exc.message)
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            # `loratool ... | head`: the reader has what it wanted. Say nothing (there is no one to
            # say it to) and let the interpreter's final flush go to /dev/null, not to a traceback.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_BROKEN_PIPE)
        except KeyboardInterrupt:
            error_line("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except _Terminated:
            error_line("terminated (SIGTERM)")
            sys.exit(EXIT_TERMINATED)
        except MemoryError:
            error_line("out of memory")
            sys.exit(EXIT_UNUSABLE)
        except Exception as exc:  # anything unforeseen still must not print a traceback
            error_line(f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())} (please report this)")
            sys.exit(EXIT_UNUSABLE)

    return wrapper
