"""The preemption flag is set by SIGUSR1/SIGTERM and cleared on uninstall."""

import os
import signal

from pipeline.train import preempt


def test_signal_sets_flag_and_uninstall_restores():
    preempt.install()
    try:
        assert not preempt.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.requested()
    finally:
        preempt.uninstall()
    assert not preempt.requested()
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGUSR1))
