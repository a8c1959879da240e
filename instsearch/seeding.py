"""Randomness that a resumed run reproduces exactly.

A run killed at any point and resumed from its ``last.ckpt`` must draw the same random numbers as
the run that was never interrupted (docs/resuming.md). Lightning restores the weights,
the optimiser and the loop counters, but not where the random generators stood, and those
generators are shared by everything (sampler, augmentation in every DataLoader worker, the RPN's
and RoI samplers' draws, dropout), so their state at a step depends on the whole history of the
process. Instead of saving that history, every consumer here draws from a generator seeded by
*where it is* in training:

* the training order of epoch ``e``: :func:`derive_seed` ``(seed, e)``
  (:class:`~instsearch.datamodules.samplers.EpochRandomSampler`, and Lightning's
  ``DistributedSampler``, which does the same with ``seed + e``);
* the augmentation of sample ``i`` in epoch ``e``: ``(seed, e, i)``, whatever worker loads it
  (:func:`seeded_rng` around the transforms; the batch samplers hand out the seeds);
* everything inside training step ``b`` of epoch ``e`` on rank ``r`` (proposal and RoI sampling,
  dropout): the global torch / numpy / Python generators reseeded from ``(seed, e, b, r)`` by
  :class:`StepSeeding` before the step.
"""
from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator, Optional

import numpy as np
import pytorch_lightning as pl
import torch

__all__ = ["derive_seed", "seeded_rng", "seed_all", "StepSeeding"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key, well mixed (NumPy's ``SeedSequence``): nearby keys
    such as consecutive epochs or sample indices give unrelated streams."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"derive_seed: keys must be non-negative integers, got {keys}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


@contextlib.contextmanager
def seeded_rng(seed: Optional[int]) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded by ``seed`` and restore it afterwards, so the
    block draws the same numbers in any process and leaves the caller's stream untouched.
    ``None`` runs the block on the caller's generator (no reseeding)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every GPU), NumPy's legacy global generator and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class StepSeeding(pl.Callback):
    """Reseeds the global generators before every training step from ``(seed, epoch, batch, rank)``.

    What a step draws (the RPN's and the RoI sampler's ``randperm``, dropout masks, anything a
    loss samples) then depends only on its position in training, so a run resumed from any
    checkpoint repeats the uninterrupted run's draws. Each rank gets its own stream.

    Args:
        seed: the base seed; ``None`` takes the one of ``seed_everything`` (``PL_GLOBAL_SEED``),
            or else draws one at the start of fitting. It is saved in the checkpoint either way.
    """

    def __init__(self, seed: Optional[int] = None) -> None:
        self.seed = None if seed is None else int(seed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.seed is None:
            env = os.environ.get("PL_GLOBAL_SEED")
            self.seed = int(env) if env is not None else int(np.random.SeedSequence().generate_state(1)[0])

    def _reseed(self, trainer: pl.Trainer, *position: int) -> None:
        assert self.seed is not None
        seed_all(derive_seed(self.seed, trainer.current_epoch, *position, trainer.global_rank))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reseed(trainer, 0, 0)  # anything an epoch-start hook draws

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._reseed(trainer, 1, batch_idx)

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seed = state_dict.get("seed", self.seed)
