"""Checkpoints that survive preemption (docs/resuming.md).

* :class:`LastCheckpoint` writes ``last.ckpt`` at the end of every training epoch, whatever the
  validation frequency, optionally every ``every_n_train_steps`` steps as well, and when the job
  receives SIGTERM (how clusters preempt) before it exits.
* :class:`DurableCheckpointIO` writes every checkpoint to a temporary file in the same folder,
  flushes it to disk and renames it over the old one, so a kill or a node failure during the write
  leaves the previous checkpoint in place; a file that is nevertheless cut short (copied
  half-way, disk full) is refused on loading with an error that names it.
* :func:`training_position` is where training stands, which the DataModules save so that a
  resumed run continues with the very next batch (:mod:`instsearch.seeding` makes it the same
  batch, with the same augmentation).
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

__all__ = ["CheckpointError", "DurableCheckpointIO", "LastCheckpoint", "training_position", "unreadable_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read back."""


#: What ``torch.load`` raises on a truncated or corrupt file.
UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)


def unreadable_checkpoint(path: Any, err: BaseException) -> CheckpointError:
    """The error for a checkpoint that ``torch.load`` could not read: which file, how big, what to do."""
    try:
        size = f"{get_filesystem(path).size(str(path))} bytes"
    except (OSError, ValueError):
        size = "size unknown"
    return CheckpointError(
        f"{path} ({size}) is not a complete checkpoint: {type(err).__name__}: {err}. It was probably cut short "
        f"while being copied or written by another tool; instsearch's own checkpoints are replaced only once "
        f"complete, so the previous one in the same folder is intact: pass it to --ckpt_path instead.")


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class DurableCheckpointIO(TorchCheckpointIO):
    """Torch checkpoints written atomically and durably on local disks, checked when read.

    Saving writes ``.<name>.<pid>.partial`` next to the target, ``fsync`` s it, renames it over the
    target (atomic on POSIX file systems) and ``fsync`` s the folder, so that the rename itself
    survives a crash of the machine. Remote paths (``s3://`` ...) go through Lightning's own writer.
    Loading turns the errors of a truncated or corrupt file into a :class:`CheckpointError` that
    names the file and what to do.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(str(path).removeprefix("file://"))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        try:  # make the rename durable; not every file system lets a folder be opened
            fd = os.open(target.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except UNREADABLE as err:
            raise unreadable_checkpoint(path, err) from err


def training_position(trainer: pl.Trainer) -> tuple[int, int]:
    """``(epoch, batches)``: the epoch training is in and how many of its batches are done.

    A checkpoint written at the end of an epoch says ``(next epoch, 0)``. Valid in any hook of
    ``fit`` (for example while a checkpoint is being written).
    """
    done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    epoch = trainer.current_epoch
    if done >= trainer.num_training_batches:
        return epoch + 1, 0
    return epoch, int(done)


class ResumesTrainingPosition:
    """DataModule mixin: its checkpoint state is where training stands (:func:`training_position`),
    and ``_resume_at`` tells its training loader where a resumed run starts, ``(epoch, batches
    done)`` (give it to :class:`~instsearch.datamodules.samplers.TrainingBatchSampler` as
    ``start``). Call :meth:`forget_resume_position` at the end of a fit."""

    trainer: Optional[pl.Trainer]
    _resume_at: Optional[tuple[int, int]] = None

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: where training stands, so that a resumed run starts its loader there."""
        if self.trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return {}
        return {"training_position": list(training_position(self.trainer))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("training_position")
        self._resume_at = None if position is None else (int(position[0]), int(position[1]))

    def forget_resume_position(self) -> None:
        """A later fit of the same DataModule starts from scratch unless resumed again."""
        self._resume_at = None


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` after every training epoch, every ``every_n_train_steps`` steps if set, and on
    SIGTERM: a finished epoch is never lost to a kill.

    A :class:`~pytorch_lightning.callbacks.ModelCheckpoint` with ``save_last=True`` writes only
    when its own schedule saves, which with a monitor is after validation; with validation every
    N epochs a run killed in between leaves nothing. This one saves at every training epoch end
    (no monitor, no top-k files) and sits next to a monitoring ``ModelCheckpoint`` for the best
    model. It installs :class:`DurableCheckpointIO` when the strategy uses Lightning's default
    writer, so every checkpoint of the run is written atomically.

    Give ``dirpath`` so that ``--ckpt_path last`` finds the file of an earlier run: without it the
    folder is inside the logger's new version directory of each run.

    Args:
        dirpath: where ``last.ckpt`` goes (e.g. ``runs/<name>/checkpoints``).
        every_n_train_steps: also save every this many optimiser steps (mid-epoch; the DataModule
            records its position, so a resume continues with the next batch). ``None``: epochs only.
        verbose: log every save.
    """

    def __init__(self, dirpath: Optional[str | Path] = None, every_n_train_steps: Optional[int] = None,
                 verbose: bool = False) -> None:
        if every_n_train_steps is not None and int(every_n_train_steps) < 1:
            raise ValueError(f"every_n_train_steps must be >= 1 or None, got {every_n_train_steps}")
        # The schedule is fixed: no monitor, no top-k files, a save at every training epoch end.
        super().__init__(dirpath=dirpath, verbose=verbose, save_last=True, save_top_k=0, every_n_epochs=1,
                         save_on_train_epoch_end=True)
        self.every_n_steps = None if every_n_train_steps is None else int(every_n_train_steps)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = DurableCheckpointIO()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # ModelCheckpoint writes last.ckpt only when it has just saved a top-k file; this callback
        # keeps none, so it writes last.ckpt itself.
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (self.every_n_steps and trainer.global_step % self.every_n_steps == 0
                and batch_idx + 1 < trainer.num_training_batches  # the epoch-end save follows anyway
                and not trainer.sanity_checking):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            rank_zero_info(f"SIGTERM: saved {self.last_model_path}; resume with --ckpt_path last")
