"""FCIS (Li et al., CVPR 2017) and FCIS+XD (Zhan & Zhao) for instance search, and torchvision's
Mask R-CNN on the same backbones for comparison.

Paper: Y. Zhan and W.-L. Zhao, "Instance Search via Instance Level Segmentation and Feature
Representation", Journal of Visual Communication and Image Representation;
https://arxiv.org/abs/1806.03576.

=====================  =============================================================================
module                 what it holds
=====================  =============================================================================
``model``              :class:`FCIS` (wiring: backbone, RPN, heads, training and inference passes),
                       :func:`build_fcis`, :data:`VARIANTS`
``heads``              the RPN head, the position-sensitive head and its RoI assembling
``roi_sampling``       training RoIs and their targets (OHEM or balanced sampling)
``inference``          class-wise NMS and mask voting
``mask_rcnn``          :class:`MaskRCNNSearch`, :func:`build_mask_rcnn`
=====================  =============================================================================

The search interface both detectors share is
:class:`~instsearch.networks.detector_search.DetectorSearchMixin`.
"""
from instsearch.networks.fcis.heads import FCISHeadOutput, FCISRPNHead, PositionSensitiveHead, fcis_scores
from instsearch.networks.fcis.mask_rcnn import MaskRCNNSearch, build_mask_rcnn
from instsearch.networks.fcis.model import FCIS, VARIANTS, build_fcis

__all__ = ["FCIS", "FCISHeadOutput", "FCISRPNHead", "PositionSensitiveHead", "MaskRCNNSearch", "VARIANTS",
           "build_fcis", "build_mask_rcnn", "fcis_scores"]
