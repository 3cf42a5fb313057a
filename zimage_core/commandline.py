"""What every command line of the project shares: one-line usage errors and one-line failures.

- :class:`Parser`: an ``argparse`` parser whose usage errors are one line, ``PROG: error: ... (see PROG --help)``,
  exit status 2, instead of the usage dump;
- :func:`add_debug_flag`: ``--debug`` (or ``ZIMAGE_DEBUG=1`` in the environment) shows the full traceback;
- :func:`run_command`: runs a command's body and turns any exception that escapes into one line on stderr and a
  non-zero exit status: a :class:`~zimage_core.errors.ZImageError` is its message, an ``OSError`` says what
  failed on which path, running out of memory says so, and anything else is a bug that still shows its type.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable

from .errors import ZImageError

#: Exit status of a usage or input error (argparse's own), of an unexpected failure and of Ctrl+C.
EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130
DEBUG_ENV = "ZIMAGE_DEBUG"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line naming the (sub)command."""

    def error(self, message: str):  # one line, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help=f"show the full traceback of a failure (also {DEBUG_ENV}=1)"
    )


def debug_requested(flag: bool = False) -> bool:
    return bool(flag) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, (MemoryError, oom)) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def describe_failure(prog: str, e: BaseException) -> str:
    """The one line a command prints for an exception that reached it."""
    if isinstance(e, ZImageError):
        return f"{prog}: error: {e}"
    if isinstance(e, OSError):
        what = e.strerror or str(e) or type(e).__name__
        where = f": '{e.filename}'" if e.filename else ""
        extra = f" -> '{e.filename2}'" if getattr(e, "filename2", None) else ""
        return f"{prog}: error: {what}{where}{extra}"
    if _is_out_of_memory(e):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (
            f"{prog}: error: out of memory ({first[:200]}); use a smaller size or batch, a lower-memory --memory mode, "
            "or --quant."
        )
    msg = " ".join(str(e).split())[:300]
    return f"{prog}: internal error ({type(e).__name__}): {msg}; rerun with --debug for the traceback"


def run_command(prog: str, body: Callable[[], int | None], debug: bool = False) -> int:
    """Run ``body()`` and return its exit status; a failure becomes one line on stderr and a non-zero status
    (the full traceback too under ``debug`` or ``ZIMAGE_DEBUG=1``)."""
    try:
        rc = body()
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return EXIT_INTERRUPTED
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - the one place where every failure is turned into a message
        if debug_requested(debug):
            traceback.print_exc()
        logging.getLogger(__name__).debug("failure", exc_info=True)
        sys.stderr.write(describe_failure(prog, e) + "\n")
        if isinstance(e, ZImageError):
            return EXIT_USAGE
        return EXIT_FAILURE
    return 0 if rc is None else int(rc)
