"""Deep region CNN (Mei et al. 2018): fine-tuned Faster R-CNN, top-K detected regions, fused features.

The module is wiring only; the network is :class:`instsearch.networks.deep_region_cnn.DeepRegionCNN`,
injected by the config (``model.net``), so every network option is reachable from the CLI::

    model:
      class_path: instsearch.lightning_modules.deep_region_cnn.DeepRegionCNNModule
      init_args:
        net:
          class_path: instsearch.networks.deep_region_cnn.DeepRegionCNN
          init_args: {backbone: vgg16, num_classes: 201, top_k: 2, fusion: concat, region_feature: crop_fc7}
"""
from __future__ import annotations

from typing import Optional

from instsearch.eval.evaluator import RetrievalConfig
from instsearch.lightning_modules.base import OptimizerConfig, RegionSearchModule
from instsearch.networks.deep_region_cnn import DeepRegionCNN


class DeepRegionCNNModule(RegionSearchModule):
    def __init__(self, net: DeepRegionCNN, optim: Optional[OptimizerConfig] = None,
                 retrieval: Optional[RetrievalConfig] = None):
        super().__init__(optim=optim, retrieval=retrieval)
        self.save_hyperparameters(ignore=["net"])
        self.net = net

