"""Stop requests from the job scheduler: signal handlers that only raise a flag.

SLURM warns a job before its time limit with the signal of ``--signal=USR2@SECONDS`` (submitit
sets it up), and ends a preempted, cancelled or requeued job with SIGTERM followed, ``KillWait``
seconds later, by SIGKILL. A handler must not write a checkpoint itself (it could run in the
middle of a step, and the other ranks know nothing of it), so ``StopRequests`` only records
which signal arrived; the trainer reads ``requested`` between steps, agrees with the other
ranks (an all-reduce), checkpoints at that step and returns. What happens next (requeue) is the
launcher's business. Knows nothing of ranks or SLURM beyond the signal names.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

REQUEUE_SIGNAL = signal.SIGUSR2
"""Checkpoint, then requeue (the time-limit warning, or a preemption notice)."""
STOP_SIGNAL = signal.SIGTERM
"""Checkpoint, then stop (the job is being killed: requeued or cancelled by someone else)."""


class StopRequests:
    """Context manager: while active, USR2 and TERM set ``requested`` (USR2 wins over TERM,
    since it asks for more); the previous handlers come back on exit. Outside the main thread
    (where Python cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        if self.requested != REQUEUE_SIGNAL:
            self.requested = sig
        log.warning("received %s: checkpointing at the end of this step", sig.name)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (REQUEUE_SIGNAL, STOP_SIGNAL):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def code(self) -> int:
        """0 = none, 1 = stop (TERM), 2 = requeue (USR2): a number ranks can all-reduce with max."""
        return {None: 0, STOP_SIGNAL: 1, REQUEUE_SIGNAL: 2}.get(self.requested, 1)


def signal_of_code(code: int) -> signal.Signals | None:
    """Inverse of ``StopRequests.code``."""
    return {0: None, 1: STOP_SIGNAL, 2: REQUEUE_SIGNAL}[int(code)]
