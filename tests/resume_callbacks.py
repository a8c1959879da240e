"""Callbacks that interrupt a training run the way a cluster does, for tests/test_resume.py (imported
by the ``instsearch fit`` subprocesses there through PYTHONPATH)."""
from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    """Send ``signal`` to this process at the start of the batch after ``step`` optimiser steps.

    Placed in the trainer's callbacks it runs before the checkpoint callbacks, which Lightning
    orders last: a checkpoint due at ``step`` has been written by then.
    """

    def __init__(self, step: int, signal_name: str = "SIGKILL") -> None:
        self.step = int(step)
        self.signal = getattr(signal, signal_name)
        self.sent = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signal)
