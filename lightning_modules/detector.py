"""Trainable detectors served for search: the deep region CNN (Mei et al. 2018) and FCIS+XD (Zhan &
Zhao), and any network built the same way.

The module is wiring only; the network is injected by the config (``model.net``), so every
network option is reachable from the CLI::

    model:
      class_path: instsearch.lightning_modules.detector.DetectorModule
      init_args:
        net:
          class_path: instsearch.networks.fcis.FCIS
          init_args: {backbone: resnext101_32x4d, deformable: true, num_classes: 81}

Optimisation (SGD, linear warm-up, step decay) and the retrieval protocol come from
:class:`~instsearch.lightning_modules.base.RegionSearchModule`. Validation reports COCO AP as the
papers do: ``val/box_AP@0.5``, ``@0.7`` and ``val/box_AP`` (IoU .5:.95), and the same for masks
(``val/mask_*``) when the network segments (``predicts_masks``, e.g. FCIS).
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from instsearch.eval.evaluator import RetrievalConfig
from instsearch.lightning_modules.base import OptimizerConfig, RegionSearchModule

__all__ = ["DetectorModule"]


class DetectorModule(RegionSearchModule):
    """Trains a torchvision-style detector (``net(images, targets)`` -> losses in training,
    detections in eval mode) and serves it for search.

    Args:
        net: the detector, a :class:`~instsearch.structures.RegionSearchModel`.
        box_iou_types: COCO AP computed on the validation set; ``None``: ``("bbox", "segm")`` for a
            network that segments (``net.predicts_masks``), else ``("bbox",)``.
    """

    def __init__(self, net: nn.Module, optim: Optional[OptimizerConfig] = None,
                 retrieval: Optional[RetrievalConfig] = None, box_iou_types: Optional[Sequence[str]] = None):
        super().__init__(optim=optim, retrieval=retrieval)
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        if box_iou_types is None:
            box_iou_types = ("bbox", "segm") if getattr(net, "predicts_masks", False) else ("bbox",)
        unknown = set(box_iou_types) - {"bbox", "segm"}
        if unknown:
            raise ValueError(f"box_iou_types: 'bbox' and/or 'segm', got {sorted(unknown)}")
        self.box_iou_types = tuple(box_iou_types)
