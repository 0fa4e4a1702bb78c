"""SIGTERM / SIGINT handling for preemptible machines. Imports nothing heavy, so train.py can
install it before jax is imported and a preemption during start-up is not lost."""

from __future__ import annotations

import signal
import sys


class StopRequest:
    """Set by SIGTERM or SIGINT: the loop finishes the current step, saves a checkpoint of it,
    waits for the write and returns. A second signal ends the process at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self.installed = False

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        self.installed = True
        return self

    def release(self) -> None:
        """The command is done and its work saved: from here SIGTERM is ignored while the
        process exits, so that its exit status is the command's. Python's teardown, a second or
        more with jax loaded, gives the signals it handles back their default action, and a
        SIGTERM then (a scheduler's, the launcher's) ended a finished run with 143. SIGINT gets
        its default action back, so that Ctrl-C still ends an exit that hangs."""
        if self.installed:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        print(f"\nreceived {self.signal_name}: saving a checkpoint after this step "
              "(send it again to quit at once)", file=sys.stderr, flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)

    def requested(self, step: int) -> bool:
        del step  # A test's subclass stops at a chosen step.
        return self.signal_name is not None
