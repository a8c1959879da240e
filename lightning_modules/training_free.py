"""Training-free methods (CLAID, and any network that needs no fitting) as a LightningModule.

The network -- e.g. :class:`instsearch.networks.claid.CLAID`, injected by the config -- is used as
it is built: ``instsearch test --config configs/claid_synthetic.yaml`` evaluates it with no
checkpoint, and ``instsearch predict`` writes its regions. Retrieval settings and the evaluation
are those of every method (:class:`~instsearch.lightning_modules.base.RegionSearchModule`). There
is nothing to fit: ``instsearch fit`` stops with an error that says so, instead of running epochs
that change nothing.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from instsearch.eval.evaluator import RetrievalConfig
from instsearch.lightning_modules.base import RegionSearchModule

__all__ = ["TrainingFreeModule"]


class TrainingFreeModule(RegionSearchModule):
    """Serves a training-free :class:`~instsearch.structures.RegionSearchModel` for test / predict."""

    box_iou_types = ()  # no detection ground truth to score: class-agnostic regions have no labels

    def __init__(self, net: nn.Module, retrieval: Optional[RetrievalConfig] = None):
        super().__init__(retrieval=retrieval)
        self.save_hyperparameters(ignore=["net"])
        self.net = net

    def on_fit_start(self) -> None:
        raise RuntimeError(f"{type(self.net).__name__} is training-free: there is nothing to fit. Evaluate it with "
                           "`instsearch test --config <config>` (no checkpoint needed) or write its regions with "
                           "`instsearch predict`")

    def configure_optimizers(self):
        return None
