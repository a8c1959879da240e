"""Building torchvision's Faster R-CNN on an instsearch staged backbone: the one place for it.

The deep region CNN searches the detector's top-K detections; UDQ keeps only its RPN proposals and
the box head's RoI representation. Both build the same detector from a
:class:`~instsearch.networks.staged.StagedBackbone` that has detector maps and a box head, with the
backbone's :class:`~instsearch.networks.staged.DetectorDefaults` wherever an argument is ``None``,
so a detector checkpoint of one loads into the other.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from instsearch.networks.backbones import IMAGENET_MEAN, IMAGENET_STD
from instsearch.networks.staged import StagedBackbone
from instsearch.networks.detection_transform import DetectionTransform

__all__ = ["build_faster_rcnn"]


def build_faster_rcnn(
    staged: StagedBackbone,
    name: str,
    num_classes: int = 2,
    min_size: Union[int, Sequence[int], None] = None,
    max_size: Optional[int] = None,
    max_upscale: Optional[float] = None,
    anchor_sizes: Optional[Sequence[Sequence[int]]] = None,
    aspect_ratios: Optional[Sequence[float]] = None,
    rpn_fg_iou_thresh: float = 0.7,
    rpn_bg_iou_thresh: float = 0.3,
    rpn_pre_nms_top_n_train: Optional[int] = None,
    rpn_post_nms_top_n_train: Optional[int] = None,
    rpn_pre_nms_top_n_test: Optional[int] = None,
    rpn_post_nms_top_n_test: Optional[int] = None,
    rpn_nms_thresh: float = 0.7,
    box_batch_size_per_image: Optional[int] = None,
    box_score_thresh: float = 0.0,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> FasterRCNN:
    """A Faster R-CNN over ``staged`` (its detector maps feed the RPN and a 7 x 7 RoIAlign, its
    box head gives the RoI representation) with :class:`DetectionTransform` as the transform.

    ``name`` is the backbone's registry name (for messages). The RPN's anchor labels are the
    Faster R-CNN rule -- positive above ``rpn_fg_iou_thresh`` IoU *or* the best anchor of a
    ground-truth box, negative below ``rpn_bg_iou_thresh`` -- which torchvision's RPN implements
    with ``Matcher(fg, bg, allow_low_quality_matches=True)``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    if staged.defaults is None:
        raise ValueError(f"backbone {name!r} has no detector maps and box head; a Faster R-CNN needs a "
                         f"detection backbone such as 'vgg16', 'resnet50_fpn' or 'small'")
    d = staged.defaults
    anchor_sizes = tuple(tuple(int(s) for s in level) for level in (anchor_sizes or d.anchor_sizes))
    aspect_ratios = tuple(float(r) for r in (aspect_ratios or d.aspect_ratios))
    if len(anchor_sizes) != len(d.anchor_sizes):
        raise ValueError(f"backbone {name!r} feeds the RPN {len(d.anchor_sizes)} feature maps, so "
                         f"anchor_sizes needs {len(d.anchor_sizes)} tuples (one per map), got {len(anchor_sizes)}")
    if len({len(level) for level in anchor_sizes}) != 1:
        raise ValueError(f"every RPN level needs the same number of anchor sizes (one shared RPN head), "
                         f"got {anchor_sizes}")
    anchors = AnchorGenerator(anchor_sizes, (aspect_ratios,) * len(anchor_sizes))
    min_size = d.min_size if min_size is None else min_size
    max_size = d.max_size if max_size is None else max_size
    detector = FasterRCNN(
        staged,
        num_classes=None,
        min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=_or_default(rpn_pre_nms_top_n_train, d.rpn_pre_nms_top_n_train),
        rpn_post_nms_top_n_train=_or_default(rpn_post_nms_top_n_train, d.rpn_post_nms_top_n_train),
        rpn_pre_nms_top_n_test=_or_default(rpn_pre_nms_top_n_test, d.rpn_pre_nms_top_n_test),
        rpn_post_nms_top_n_test=_or_default(rpn_post_nms_top_n_test, d.rpn_post_nms_top_n_test),
        rpn_nms_thresh=rpn_nms_thresh,
        rpn_fg_iou_thresh=rpn_fg_iou_thresh, rpn_bg_iou_thresh=rpn_bg_iou_thresh,
        box_roi_pool=MultiScaleRoIAlign(staged.detection_maps, output_size=7, sampling_ratio=2),
        box_head=staged.make_box_head(7),
        box_predictor=FastRCNNPredictor(staged.representation_size, num_classes),
        box_score_thresh=box_score_thresh, box_nms_thresh=box_nms_thresh,
        box_detections_per_img=box_detections_per_img,
        box_batch_size_per_image=_or_default(box_batch_size_per_image, d.box_batch_size_per_image),
    )
    detector.transform = DetectionTransform(min_size, max_size, image_mean, image_std, max_upscale=max_upscale)
    return detector


def _or_default(value: Optional[int], default: int) -> int:
    return default if value is None else int(value)
