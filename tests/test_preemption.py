"""SIGTERM / SIGINT: the first signal requests a stop after the current step, a second one quits."""

import os
import signal

from rexmoe_jax.runtime.preemption import StopRequest


def test_first_signal_requests_a_stop_and_restores_the_default_handler():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = StopRequest().install()
        assert not stop.requested(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested(2) and stop.signal_name == "SIGTERM"
        # The next signal is the default action: the process ends at once.
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
