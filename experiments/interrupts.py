"""Stopping on SIGTERM or SIGINT without losing a step or hiding the stop.

During training both signals go through Lightning's own SIGTERM path: :class:`CheckpointOnSignal` saves
``last.ckpt`` at the end of the current step, Lightning's loops then raise ``SIGTERMException``, and the run is
recorded KILLED with the signal as its reason (``experiments/train.py``). Anywhere else (data loading, model build,
between a sweep's trials) the signal raises :class:`Interrupted` at once. Either way the process exits 128 + the
signal's number (143 for SIGTERM, 130 for SIGINT), as a shell, a scheduler or ``timeout`` expects; Lightning alone
would exit 0 on SIGTERM (its ``SIGTERMException`` is a bare ``SystemExit``). A second Ctrl+C stops at once.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

HANDLED = (signal.SIGTERM, signal.SIGINT)
_received: int | None = None
_forwarding = False


class Interrupted(BaseException):
    """A stop asked for by a signal; a BaseException (as KeyboardInterrupt) so no ``except Exception`` swallows it."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}{detail}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def received() -> int | None:
    """The first handled signal this process received, if any."""
    return _received


def _lightning_handler() -> object | None:
    """Lightning's SIGTERM handler while a trainer runs (it composes ours into it), else None."""
    current = signal.getsignal(signal.SIGTERM)
    return current if callable(current) and current is not _handle else None


def _handle(signum: int, frame: FrameType | None) -> None:
    global _received, _forwarding
    if _forwarding:  # our own call through Lightning's handler, which calls us back
        return
    first = _received is None
    if first:
        _received = signum
    lightning = _lightning_handler()
    if lightning is None or not first and signum == signal.SIGINT:
        raise Interrupted(signum)
    if signum == signal.SIGINT:  # Lightning listens to SIGTERM only: hand Ctrl+C to the same graceful path
        _forwarding = True
        try:
            lightning(signum, frame)  # type: ignore[operator]
        finally:
            _forwarding = False


def install() -> None:
    """Route SIGTERM and SIGINT through :func:`_handle` (from the main thread; elsewhere signals cannot be set)."""
    if threading.current_thread() is threading.main_thread():
        for signum in HANDLED:
            signal.signal(signum, _handle)


def as_interruption(err: BaseException) -> Interrupted | None:
    """The signal behind an exception from training, if a signal caused it."""
    if isinstance(err, Interrupted):
        return err
    if _received is not None and isinstance(err, (SIGTERMException, KeyboardInterrupt, SystemExit)):
        return Interrupted(_received)
    return None


class CheckpointOnSignal(L.Callback):
    """Saves ``path`` at the end of the step during which a signal arrived, the point Lightning stops at.

    It saves where :class:`~lightning.pytorch.callbacks.ModelCheckpoint` does (``on_train_batch_end``), not in
    ``on_exception``: the loops' progress counters are then those of a periodic checkpoint, from which a resumed run
    repeats the uninterrupted one exactly. A signal that lands after this hook of the last step leaves the previous
    checkpoint to resume from."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved_at: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        if _received is not None and self.saved_at is None:
            trainer.save_checkpoint(self.path)
            self.saved_at = trainer.global_step
