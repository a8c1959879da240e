"""FCIS / FCIS+D / FCIS+X / FCIS+XD (Zhan & Zhao): instance segmentation trained for instance search.

The module is wiring only; the network is :class:`networks.fcis.FCIS`, injected by the config
(``model.net``), so every network option is reachable from the CLI::

    model:
      class_path: lightning_modules.fcis.FCISModule
      init_args:
        net:
          class_path: networks.fcis.FCIS
          init_args: {backbone: resnext101_32x4d, deformable: true, num_classes: 81}

Optimisation (SGD, linear warm-up, step decay) and the retrieval protocol come from
:class:`~lightning_modules.base.RegionSearchModule`. Validation reports COCO box and mask AP as
the FCIS papers do: ``val/{box,mask}_AP@0.5``, ``@0.7`` and ``val/{box,mask}_AP`` (IoU .5:.95).
"""
from __future__ import annotations

from typing import Optional

import torch

from lightning_modules.base import OptimizerConfig, RegionSearchModule, RetrievalConfig
from networks.fcis import FCIS

__all__ = ["FCISModule", "AP_THRESHOLDS", "ap_at_threshold"]

#: COCO's IoU thresholds .50:.05:.95 (they include the 0.5 and 0.7 that FCIS reports).
COCO_IOU_THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]
#: Single-threshold APs logged next to AP@[.5:.95] (FCIS: mAP^r@0.5 and @0.7).
AP_THRESHOLDS = (0.5, 0.7)


def ap_at_threshold(precision: torch.Tensor, iou_thresholds: list[float], threshold: float) -> torch.Tensor:
    """COCO AP at one IoU threshold from COCOeval's precision array ``(T, R, K, A, M)``.

    As ``COCOeval.summarize``: area range "all" (index 0), the largest max-detections setting
    (last index), mean over recall thresholds and classes of the defined (> -1) entries; -1 when
    nothing is defined (no ground truth).
    """
    index = min(range(len(iou_thresholds)), key=lambda i: abs(iou_thresholds[i] - threshold))
    if abs(iou_thresholds[index] - threshold) > 1e-6:
        raise ValueError(f"IoU threshold {threshold} is not among the evaluated {iou_thresholds}")
    p = precision[index, :, :, 0, -1]
    defined = p[p > -1]
    return defined.mean().float() if defined.numel() else torch.tensor(-1.0)


class FCISModule(RegionSearchModule):
    """Trains :class:`~networks.fcis.FCIS` on COCO-format instance masks and serves it for search."""

    box_iou_types = ("bbox", "segm")

    def __init__(self, net: FCIS, optim: Optional[OptimizerConfig] = None,
                 retrieval: Optional[RetrievalConfig] = None):
        super().__init__(optim=optim, retrieval=retrieval)
        self.save_hyperparameters(ignore=["net"])
        self.net = net

    def on_fit_start(self) -> None:
        dm_classes = getattr(self.trainer.datamodule, "num_classes", None)
        if dm_classes is not None and dm_classes != self.net.num_classes:
            raise ValueError(f"the data has {dm_classes} classes (background included) but FCIS predicts "
                             f"{self.net.num_classes}: set model.net.init_args.num_classes={dm_classes}")

    def on_validation_epoch_start(self) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        if self._val_map is None:
            # extended_summary exposes COCOeval's precision array, from which AP@0.7 is read
            # (torchmetrics itself reports only AP@0.5 and AP@0.75 besides AP@[.5:.95]).
            self._val_map = MeanAveragePrecision(iou_type=list(self.box_iou_types), iou_thresholds=COCO_IOU_THRESHOLDS,
                                                 extended_summary=True, backend="pycocotools")
        self._val_map.to(self.device)
        self._val_map.reset()

    def on_validation_epoch_end(self) -> None:
        if self._val_map is None:
            return
        if self.trainer.sanity_checking:
            self._val_map.reset()
            return
        result = self._val_map.compute()
        metrics = {}
        for iou_type in self.box_iou_types:
            key = "" if len(self.box_iou_types) == 1 else f"{iou_type}_"
            tag = "box" if iou_type == "bbox" else "mask"
            for t in AP_THRESHOLDS:
                metrics[f"val/{tag}_AP@{t}"] = ap_at_threshold(result[f"{key}precision"], COCO_IOU_THRESHOLDS, t)
            metrics[f"val/{tag}_AP"] = result[f"{key}map"]
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in metrics.items()},
                      sync_dist=False, batch_size=1)
        self._val_map.reset()
