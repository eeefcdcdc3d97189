"""Stopping on a signal (preemption): SIGTERM or SIGUSR1 ends the run at the end of the current
step with a checkpoint, and the process exits :data:`REQUEUE_EXIT_CODE` so that a scheduler
requeues it (launch/ passes ``--signal`` to Slurm; Kubernetes sends SIGTERM before the kill).

Why a class of its own: the trainer's loop only asks two questions — "is a stop requested, on any
rank?" (:meth:`StopSignals.requested`, at the end of each step) and "may a stop end the run while
I wait for data?" (:meth:`StopSignals.waiting_for_data`) — while the signal handlers, the alarm
and the exit codes live here.

A stop while waiting for data: a data-bound run normally still gets its batch, finishes the step
and checkpoints. If the batch does not come within ``SELFSUP_STOP_WAIT`` seconds (5; a hung file
system, a stalled ``pipe:`` URL, a shard set that yields nothing), SIGALRM ends the run there
without a checkpoint (:class:`StoppedWaiting`): the last one stands.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from typing import Callable

from selfsup.collective import any_rank

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on a signal, checkpoint written, start me again"


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(REQUEUE_EXIT_CODE)


class StoppedWaiting(Preempted):
    """A stop signal came while this rank waited for a batch that did not come within
    SELFSUP_STOP_WAIT seconds: it leaves without a checkpoint (the last one stands). Its peers may
    be inside a collective, so the caller does not wait for them (``end_distributed``)."""


class StopSignals:
    """The stop signal this process received (``signal``: its number, or None) and the alarm that
    ends a run stuck waiting for data. ``where()`` describes the run's state for that message
    (the step, the last checkpoint)."""

    def __init__(self, where: Callable[[], str]):
        self.signal: int | None = None
        self._where = where
        self._waiting = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGALRM, self._on_alarm)

    def disarm(self) -> None:
        """No stop alarm outlives the loop."""
        signal.setitimer(signal.ITIMER_REAL, 0)

    @contextmanager
    def waiting_for_data(self):
        """Around fetching a batch: a stop signal now (or one that came during an earlier
        micro-batch of this step) gives the batch SELFSUP_STOP_WAIT seconds to arrive."""
        self._waiting = True
        if self.signal is not None:
            self._arm()
        try:
            yield
        finally:
            self._waiting = False
        if self.signal is not None:  # the batch came in time: no alarm after the checkpoint
            self.disarm()

    def requested(self, acc) -> bool:
        """Any process got a stop signal → all stop at the same step (collective). One process
        needs no collective, and skipping it spares a device sync per step."""
        return any_rank(acc, self.signal is not None)

    def _on_signal(self, signum, frame):
        self.signal = signum
        if self._waiting:
            self._arm()

    def _arm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, float(os.environ.get("SELFSUP_STOP_WAIT") or 5))

    def _on_alarm(self, signum, frame):
        if not self._waiting:  # the batch came in time: the step ends with a checkpoint
            return
        self._waiting = False
        print(f"selfsup-train: stopped by signal {self.signal} while waiting for data at "
              f"{self._where()}; exit {REQUEUE_EXIT_CODE} (requeue)", file=sys.stderr, flush=True)
        raise StoppedWaiting()
