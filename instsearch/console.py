"""A clean console: silence the framework messages a user cannot act on, keep every other one.

Each entry below names a message that PyTorch Lightning prints on every ``instsearch`` run and
why it says nothing actionable here. Warnings a user can act on (too few batches for the logging
interval, a missing benchmark, random initialisation, bad images, ...) are left alone.
"""
from __future__ import annotations

import logging
import re
import warnings

#: Info lines from Lightning's rank-zero logger.
QUIET_INFO = (
    # advertisements for Lightning's hosted platform
    r"💡 Tip: For seamless cloud",
    # the learning-rate schedule asks for the epoch length; the loader is built anyway
    r"Loading `train_dataloader` to estimate number of stepping batches",
)

#: Warnings (message regex, category).
QUIET_WARNINGS = (
    # Lightning's own use of a deprecated torch pytree API, fixed upstream, nothing to change here
    (r".*isinstance\(treespec, LeafSpec\)", FutureWarning),
    (r".*isinstance\(treespec, LeafSpec\)", UserWarning),
    # frozen backbone stages keep their batch-norm statistics on purpose (docs/deep_region_cnn.md)
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning),
    # resuming mid-epoch: the DataModule saves its position in the checkpoint and its batch
    # sampler starts there (instsearch.checkpointing.training_position), which Lightning cannot see
    (r"You're resuming from a checkpoint that ended before the epoch ended", Warning),
)


class _DropMessages(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


_installed = False


def quiet_framework_noise() -> None:
    """Install the filters once per process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    drop = _DropMessages(QUIET_INFO)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero",
                 "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(drop)
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
