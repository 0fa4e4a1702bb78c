"""The contract every command keeps (train.py, evaluate, generate, lm_eval, plot, data, study,
launch), in one place:

    0    done (for train.py also: stopped by a signal after saving)
    1    an unexpected failure: one line naming the exception
    2    bad input: one line naming the file, option or field
    3    a non-finite training step
    4    a write that failed (a full disk, no permission): one line
    5    another process of a multi-process run was lost, or the run never joined
    130  Ctrl-C: quietly, once the command has cleaned up what it started

Errors are one line on stderr starting with "error:"; no traceback reaches the user unless
REXMOE_DEBUG=1 asks for it. A command raises a `CommandError` (its subclasses carry their exit
status) and is wrapped by `command`, which turns it into the line and the status; cleaning up
is the business of the `finally` blocks and context managers that the exception passes
through on its way out, so a Ctrl-C cleans up exactly as an error does.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback

FAILED, BAD_INPUT, NONFINITE, WRITE_FAILED, LOST_PROCESS = 1, 2, 3, 4, 5
INTERRUPTED = 130  # 128 + SIGINT, the shell's status for a Ctrl-C
DEBUG_VARIABLE = "REXMOE_DEBUG"


class CommandError(Exception):
    """A failure the user can act on; `str()` is the one line they see."""

    exit_status = FAILED


class BadInput(CommandError, ValueError):
    """A file, option or field the command cannot use."""

    exit_status = BAD_INPUT


class WriteFailed(CommandError, RuntimeError):
    """Writing a result, a checkpoint or a log failed; the message names what and where."""

    exit_status = WRITE_FAILED


def debugging() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """`Type: first line of the message`, at most 200 characters of it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def command(main):
    """Wraps a command's `main(argv) -> int` so that it keeps the contract (module doc)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except CommandError as err:
            if debugging():
                traceback.print_exc()
            error(str(err))
            return err.exit_status
        except KeyboardInterrupt:
            if debugging():
                traceback.print_exc()
            return INTERRUPTED
        except Exception as err:  # noqa: BLE001 - the last line of defence: no traceback by default
            if debugging():
                raise
            error(f"{one_line(err)} (unexpected; run again with {DEBUG_VARIABLE}=1 for the traceback)")
            return FAILED

    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors as the contract's one line and exit status 2."""

    def error(self, message: str):
        raise BadInput(f"{self.prog}: {message} (see --help)")
