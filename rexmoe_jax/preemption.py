"""SIGTERM / SIGINT handling for preemptible machines. Imports nothing heavy, so train.py can
install it before jax is imported and a preemption during start-up is not lost."""

from __future__ import annotations

import contextlib
import signal
import sys


class StopRequest:
    """Set by SIGTERM or SIGINT: the loop finishes the current step, saves a checkpoint of it,
    waits for the write and returns. A second signal ends the process at once."""

    def __init__(self):
        self.signal_name: str | None = None

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        print(f"\nreceived {self.signal_name}: saving a checkpoint after this step "
              "(send it again to quit at once)", file=sys.stderr, flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)

    @contextlib.contextmanager
    def ending_at_once(self):
        """While the block runs, SIGTERM and SIGINT take their default action and end the
        process at once: for a blocking call that has nothing to save and that a Python signal
        handler cannot interrupt (joining a multi-process run whose other processes may never
        come)."""
        previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def requested(self, step: int) -> bool:
        del step  # A test's subclass stops at a chosen step.
        return self.signal_name is not None
