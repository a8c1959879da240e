"""FCIS / FCIS+D / FCIS+X / FCIS+XD (Zhan & Zhao): instance segmentation trained for instance search.

The module is wiring only; the network is :class:`instsearch.networks.fcis.FCIS`, injected by the config
(``model.net``), so every network option is reachable from the CLI::

    model:
      class_path: instsearch.lightning_modules.fcis.FCISModule
      init_args:
        net:
          class_path: instsearch.networks.fcis.FCIS
          init_args: {backbone: resnext101_32x4d, deformable: true, num_classes: 81}

Optimisation (SGD, linear warm-up, step decay) and the retrieval protocol come from
:class:`~instsearch.lightning_modules.base.RegionSearchModule`. Validation reports COCO box and mask AP as
the FCIS papers do: ``val/{box,mask}_AP@0.5``, ``@0.7`` and ``val/{box,mask}_AP`` (IoU .5:.95).
"""
from __future__ import annotations

from typing import Optional

from instsearch.eval.evaluator import RetrievalConfig
from instsearch.lightning_modules.base import OptimizerConfig, RegionSearchModule
from instsearch.networks.fcis import FCIS

__all__ = ["FCISModule"]


class FCISModule(RegionSearchModule):
    """Trains :class:`~instsearch.networks.fcis.FCIS` on COCO-format instance masks and serves it for search."""

    box_iou_types = ("bbox", "segm")

    def __init__(self, net: FCIS, optim: Optional[OptimizerConfig] = None,
                 retrieval: Optional[RetrievalConfig] = None):
        super().__init__(optim=optim, retrieval=retrieval)
        self.save_hyperparameters(ignore=["net"])
        self.net = net
