"""Stopping on Ctrl-C or SIGTERM between two steps, with the training state saved first.

A signal in the middle of a step would leave it half done (gradients computed, parameters not
updated). While :func:`deferred_stop` is active a signal only records a request; the loop
honours it at the next batch boundary, writes a consistent checkpoint and raises
:class:`TrainingInterrupted`. A second signal interrupts at once.
"""

from __future__ import annotations

__all__ = ["StopRequest", "TrainingInterrupted", "deferred_stop"]

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM after writing its state to ``checkpoint``."""

    def __init__(self, checkpoint: Path | None, epoch: int, batch: int, batches: int, signum: int) -> None:
        super().__init__(f"interrupted in epoch {epoch} after batch {batch} of {batches}")
        self.checkpoint, self.epoch, self.batch, self.batches, self.signum = checkpoint, epoch, batch, batches, signum


class StopRequest:
    """The signal that asked training to stop, or ``None``."""

    signal: int | None = None


@contextmanager
def deferred_stop(enabled: bool) -> Iterator[StopRequest]:
    """Turn Ctrl-C and SIGTERM into a :class:`StopRequest` that the loop honours between steps.

    Only the main thread can set signal handlers; elsewhere, or when not ``enabled`` (no
    checkpoint to write), signals act as usual and the request stays empty.
    """
    request = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.signal is not None:
            raise KeyboardInterrupt
        request.signal = signum

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
