"""The UDQ network (Unsupervised Deep Quantization for object instance search): RPN proposals and
the FC_S region feature ``f_t`` that the UDQ losses train and product quantisation encodes.

Paper: W. Jiang, Y. Wu, C. Jing, T. Yu and Y. Jia, "Unsupervised deep quantization for object
instance search", Neurocomputing (2019);
https://www.semanticscholar.org/paper/d0c538cd2d2ad142c81f723428d8bf535957b63c.

The paper's architecture (its Fig. 2 and Section 4.1): convolutional layers, a Region Proposal
Network, a RoI pooling layer and "three fully-connected layers". Here

* backbone, RPN and RoI pooling are a torchvision Faster R-CNN on a staged backbone
  (:func:`~instsearch.networks.faster_rcnn.build_faster_rcnn`, the same detector as the deep
  region CNN, so a detector checkpoint of either loads into the other); VGG-16 as in the paper,
  ``small`` for the CPU synthetic benchmark;
* the first two fully-connected layers are the detector's box head (fc6/fc7 for VGG-16): their
  output is the *off-the-shelf RoI feature*;
* the third is ``FC_S`` (:attr:`UDQNet.fc_s`), ``d`` outputs (300 in the paper), initialised as
  the PCA-``d`` projection of the off-the-shelf features (:meth:`UDQNet.fit_projection`): "we
  perform the PCA to reduce the dimension of features to 300 before the supervision information
  generation". Its output is ``f_t``, the searched feature.

Proposals: ``proposals_per_image`` (200 in the paper) boxes per image, the RPN's top boxes after
its NMS, scored by objectness. Training keeps them fixed per image (the LightningModule stores
them with their pseudo-labels); the RPN itself is trained beforehand with the backbone fixed
(:meth:`UDQNet.forward` in training mode returns the RPN losses only).

No labels predicted (``predicts_labels = False``): the regions are class-agnostic proposals.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import clip_boxes_to_image

from instsearch.networks.backbones import IMAGENET_MEAN, IMAGENET_STD, StagedBackbone, build_backbone
from instsearch.networks.faster_rcnn import build_faster_rcnn
from instsearch.networks.contract import ClassAgnostic, check_box_lists, check_images, require_eval_mode, whole_frame_box
from instsearch.networks.weights import load_weights
from instsearch.structures import Regions

__all__ = ["UDQNet", "pca_projection"]


def pca_projection(samples: Tensor, dim: int, return_mean: bool = False):
    """The PCA-``dim`` projection of ``samples`` ``(N, D)``: ``(W (dim, D), b (dim,))`` with
    ``W x + b = P^T (x − μ)`` and ``P`` the top-``dim`` eigenvectors of the sample covariance.

    Computed in float64 from the ``D x D`` covariance (one pass over the samples, whatever ``N``).
    Each axis's sign is fixed so that its largest-magnitude loading is positive, which makes the
    projection a function of the data alone (eigensolvers may return either sign). ``return_mean``:
    also ``μ`` (``(D,)``), as a third element.
    """
    if samples.ndim != 2:
        raise ValueError(f"PCA needs (N, D) samples, got shape {tuple(samples.shape)}")
    n, d_in = samples.shape
    if not 1 <= dim <= d_in:
        raise ValueError(f"PCA to {dim} dimensions needs 1 <= dim <= {d_in} (the input dimension)")
    if n < 2:
        raise ValueError(f"PCA needs at least 2 samples, got {n}")
    x = samples.detach().to(torch.float64)
    mean = x.mean(dim=0)
    centred = x - mean
    covariance = centred.T @ centred / (n - 1)
    _, vectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
    axes = vectors[:, -dim:].flip(1).T.contiguous()  # (dim, D), largest variance first
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    axes = axes * signs
    if return_mean:
        return axes.float(), (-(axes @ mean)).float(), mean.float()
    return axes.float(), (-(axes @ mean)).float()


class UDQNet(ClassAgnostic, nn.Module):
    """Faster R-CNN proposals and the FC_S feature of UDQ; implements
    :class:`instsearch.structures.RegionSearchModel`.

    Args:
        backbone: a detection backbone of :mod:`instsearch.networks.backbones`: ``"vgg16"`` or
            ``"resnet101_fpn"`` (the paper's two, ResNet-101 here with torchvision's FPN layout),
            ``"resnet50_fpn"``, ``"small"`` for CPU runs.
        weights: backbone weights file (ImageNet); ``None`` = random init, said once.
        detector_weights: a detector checkpoint loaded after ``weights`` -- a trained
            :class:`~instsearch.networks.deep_region_cnn.DeepRegionCNN`, an RPN pre-trained by
            this network, or a torchvision Faster R-CNN state dict (the class head is unused).
        frozen_stages: leading backbone stages kept fixed while training the feature (2: conv1-2,
            as the paper's fine-tuning). RPN pre-training freezes the whole backbone itself.
        min_size / max_size / max_upscale: image resize (``None``: the backbone's defaults, 600 /
            1000 for VGG-16 -- the paper's query scale).
        anchor_sizes / aspect_ratios / rpn_*: the RPN (see
            :func:`~instsearch.networks.faster_rcnn.build_faster_rcnn`).
        proposals_per_image: proposals kept per image after the RPN's NMS (200 in the paper).
        feature_dim: ``d``, the width of FC_S (300 in the paper; it must be divisible by the
            number of PQ subspaces, so M = 8 takes 296 = 8 x 37).
        l2_normalize: l2-normalise ``f_t`` (default). The paper does not say; without it the two
            losses shrink the features towards their codewords round after round (mean norm 17.7
            -> 6.5 in two rounds on the synthetic benchmark) and mAP falls below the untrained
            features', while on the unit sphere the rounds improve on Off-the-shelf-OPQ (docs/udq.md). Distances stay L2, as the paper's search.
        image_mean / image_std: input normalisation.
    """

    def __init__(
        self,
        backbone: str = "vgg16",
        weights: Union[str, Path, None] = None,
        detector_weights: Union[str, Path, None] = None,
        frozen_stages: int = 2,
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
        rpn_nms_thresh: float = 0.7,
        proposals_per_image: int = 200,
        feature_dim: int = 300,
        l2_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if proposals_per_image < 1:
            raise ValueError(f"proposals_per_image must be >= 1, got {proposals_per_image}")
        staged: StagedBackbone = build_backbone(backbone, weights=weights, frozen_stages=frozen_stages)
        self.detector = build_faster_rcnn(
            staged, backbone, min_size=min_size, max_size=max_size, max_upscale=max_upscale,
            anchor_sizes=anchor_sizes, aspect_ratios=aspect_ratios,
            rpn_fg_iou_thresh=rpn_fg_iou_thresh, rpn_bg_iou_thresh=rpn_bg_iou_thresh,
            rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
            rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=proposals_per_image,
            rpn_nms_thresh=rpn_nms_thresh, image_mean=image_mean, image_std=image_std)
        if detector_weights is not None:
            load_weights(self.detector, detector_weights, name=f"udq[{backbone}]",
                         key_map=lambda k: k[len("detector."):] if k.startswith("detector.") else k)
        representation = staged.representation_size
        if not 1 <= feature_dim <= representation:
            raise ValueError(f"feature_dim {feature_dim} must be in [1, {representation}] (the box head's width: "
                             f"FC_S starts as a PCA projection of it)")
        self.fc_s = nn.Linear(representation, feature_dim)
        #: subtracted from the off-the-shelf feature before FC_S (the PCA mean, see :meth:`embed`)
        self.register_buffer("input_mean", torch.zeros(representation))
        self._register_load_state_dict_pre_hook(self._zero_mean_when_missing)
        self.backbone_name = backbone
        self.proposals_per_image = int(proposals_per_image)
        self.l2_normalize = bool(l2_normalize)
        #: keep every BatchNorm layer in eval mode (its running statistics fixed) even in training
        #: mode; the UDQ phase sets it, so a training step computes the features the round pass
        #: labelled (batches of a few images would otherwise move the statistics under the labels)
        self.freeze_batchnorm = False

    def train(self, mode: bool = True) -> "UDQNet":
        super().train(mode)
        if mode and getattr(self, "freeze_batchnorm", False):
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    # -- structure ------------------------------------------------------------------------------
    @property
    def backbone(self) -> StagedBackbone:
        return self.detector.backbone

    @property
    def rpn(self) -> nn.Module:
        return self.detector.rpn

    @property
    def feature_dim(self) -> int:
        """``d``: the width of ``f_t``."""
        return self.fc_s.out_features

    @property
    def representation_dim(self) -> int:
        """Width of the off-the-shelf RoI feature (the box head's output)."""
        return self.fc_s.in_features

    def head_parameters(self) -> list[nn.Parameter]:
        """What trains the feature besides the unfrozen backbone stages: box head and FC_S."""
        return [*self.detector.roi_heads.box_head.parameters(), *self.fc_s.parameters()]

    # -- detector -------------------------------------------------------------------------------
    def forward(self, images: list[Tensor], targets: Optional[list[dict[str, Tensor]]] = None):
        """Training: the RPN's losses (``loss_objectness``, ``loss_rpn_box_reg``) for ``targets``
        with ``boxes`` -- RPN pre-training. Eval: each image's proposals as detections (``boxes``
        in the pixels of ``images``, ``scores`` = objectness, ``labels`` all 1)."""
        if self.training:
            if targets is None:
                raise ValueError("UDQNet in training mode trains its RPN and needs targets with boxes")
            check_images(images)
            batch, targets = self.detector.transform(list(images), targets)
            features = self.detector.backbone(batch.tensors)
            _, losses = self.rpn(batch, features, targets)
            return losses
        out = []
        for boxes, scores in self.propose(images):
            out.append({"boxes": boxes, "scores": scores, "labels": torch.ones_like(scores, dtype=torch.int64)})
        return out

    def encode(self, images: Sequence[Tensor]) -> tuple[ImageList, "dict[str, Tensor]"]:
        """Normalise, resize and batch ``images``; one backbone pass -> (batch, detector maps)."""
        check_images(images)
        batch, _ = self.detector.transform(list(images))
        return batch, self.detector.backbone(batch.tensors)

    def _proposals(self, batch: ImageList, maps: "dict[str, Tensor]") -> tuple[list[Tensor], list[Tensor]]:
        """The RPN's boxes (network pixels) and objectness probabilities after its NMS, best first.

        torchvision's ``RegionProposalNetwork.forward`` computes the scores but returns only the
        boxes; this is its inference path, keeping both.
        """
        rpn = self.rpn
        levels = list(maps.values())
        objectness, deltas = rpn.head(levels)
        anchors = rpn.anchor_generator(batch, levels)
        per_level = [int(o[0].numel()) for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, scores = rpn.filter_proposals(proposals, objectness, batch.image_sizes, per_level)
        return boxes, scores

    @torch.no_grad()
    def propose(self, images: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """``(boxes (P, 4) in the pixels of images[i], objectness (P,))`` per image, P ≤
        ``proposals_per_image``, best first."""
        require_eval_mode(self, "propose")
        batch, maps = self.encode(images)
        boxes, scores = self._proposals(batch, maps)
        return [(self._to_image(b, net, img), s) for b, s, net, img in zip(boxes, scores, batch.image_sizes, images)]

    # -- features -------------------------------------------------------------------------------
    def representations(self, batch: ImageList, maps: "dict[str, Tensor]", boxes_net: list[Tensor]) -> Tensor:
        """Off-the-shelf RoI features ``(sum n_i, representation_dim)``: RoIAlign -> box head."""
        if sum(len(b) for b in boxes_net) == 0:
            return batch.tensors.new_zeros(0, self.representation_dim)
        roi_heads = self.detector.roi_heads
        return roi_heads.box_head(roi_heads.box_roi_pool(maps, boxes_net, batch.image_sizes))

    @staticmethod
    def _zero_mean_when_missing(state_dict, prefix, *args) -> None:
        """A state saved before FC_S's input was centred: zero mean, the features it computed."""
        weight = state_dict.get(prefix + "fc_s.weight")
        if weight is not None and prefix + "input_mean" not in state_dict:
            state_dict[prefix + "input_mean"] = weight.new_zeros(weight.shape[1])

    def embed(self, representations: Tensor) -> Tensor:
        """``f_t`` = FC_S of the centred off-the-shelf features, ``W (x − μ) + b`` (l2-normalised
        with ``l2_normalize``).

        The same function as ``W x + (b − W μ)``, but a better-conditioned one to train: the box
        head's ReLU outputs have a mean of norm ~25 next to an RMS spread of ~19 (the synthetic
        benchmark), so on raw inputs FC_S's gradient is dominated by ``(Σ_t g_t) μ^T``, a common
        shift of every feature that SGD overshoots at learning rates the useful directions need."""
        features = self.fc_s(representations - self.input_mean)
        return F.normalize(features, dim=1) if self.l2_normalize else features

    def box_features(self, images: list[Tensor], boxes: list[Tensor], representation: bool = False) -> Tensor:
        """``f_t`` (or, with ``representation``, the off-the-shelf feature) of given boxes in the
        pixels of ``images``, ``(sum n_i, D)``, from one backbone pass. Differentiable: the UDQ
        training step runs it in training mode on the stored proposals."""
        batch, maps = self.encode(images)
        boxes_net = [self._to_network(b.to(batch.tensors), img, net)
                     for b, img, net in zip(boxes, images, batch.image_sizes)]
        reps = self.representations(batch, maps, boxes_net)
        return reps if representation else self.embed(reps)

    @torch.no_grad()
    def proposals_with_representations(self, images: list[Tensor]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """One pass: each image's proposals (pixels of the image), objectness and off-the-shelf
        features -- what the UDQ rounds extract the first time they see an image."""
        require_eval_mode(self, "proposals_with_representations")
        batch, maps = self.encode(images)
        boxes, scores = self._proposals(batch, maps)
        reps = self.representations(batch, maps, boxes).split([len(b) for b in boxes])
        return [(self._to_image(b, net, img), s, r)
                for b, s, r, net, img in zip(boxes, scores, reps, batch.image_sizes, images)]

    def fit_projection(self, representations: Tensor) -> None:
        """Initialise FC_S as the PCA-``d`` projection of off-the-shelf features ``(N, D)``."""
        self.set_projection(*pca_projection(representations, self.feature_dim, return_mean=True))

    @torch.no_grad()
    def set_projection(self, weight: Tensor, bias: Tensor, mean: Optional[Tensor] = None) -> None:
        """FC_S computes ``weight x + bias`` (``(d, D)``, ``(d,)``; a projection computed elsewhere,
        e.g. on one rank), as ``weight (x − mean) + (bias + weight mean)`` when ``mean`` is given."""
        self.fc_s.weight.copy_(weight.to(self.fc_s.weight))
        mean = torch.zeros_like(self.input_mean) if mean is None else mean.to(self.input_mean)
        self.input_mean.copy_(mean)
        self.fc_s.bias.copy_(bias.to(self.fc_s.bias) + self.fc_s.weight @ mean)

    # -- RegionSearchModel ----------------------------------------------------------------------
    @torch.no_grad()
    def detect_regions(self, images: list[Tensor]) -> list[Regions]:
        """Database side: every proposal of each image with its ``f_t``; score = objectness."""
        out = []
        for (boxes, scores, reps), img in zip(self.proposals_with_representations(images), images):
            if len(boxes) == 0:  # degenerate image: keep it searchable by its whole frame
                boxes = whole_frame_box(int(img.shape[-2]), int(img.shape[-1]), boxes)
                scores = scores.new_zeros(1)
                reps = self.box_features([img], [boxes], representation=True)
            out.append(Regions(boxes=boxes.float(), scores=scores.float(), features=self.embed(reps).float(),
                               image_size=(int(img.shape[-2]), int(img.shape[-1]))))
        return out

    @torch.no_grad()
    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[Tensor]:
        """Query side: ``f_t`` of the given boxes (pixels of ``images``), ``(n_i, d)`` per image."""
        require_eval_mode(self, "describe_boxes")
        boxes = check_box_lists(images, boxes)
        return list(self.box_features(images, boxes).float().split([len(b) for b in boxes]))

    # -- frames ---------------------------------------------------------------------------------
    @staticmethod
    def _to_image(boxes: Tensor, net_size: Sequence[int], image: Tensor) -> Tensor:
        size = (int(image.shape[-2]), int(image.shape[-1]))
        return clip_boxes_to_image(resize_boxes(boxes, list(net_size), list(size)), size)

    @staticmethod
    def _to_network(boxes: Tensor, image: Tensor, net_size: Sequence[int]) -> Tensor:
        return resize_boxes(boxes, [int(image.shape[-2]), int(image.shape[-1])], list(net_size))
