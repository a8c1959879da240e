"""The detector transform (normalise, resize, batch) that the deep region CNN and the whole-image
descriptors share, so that both see an image exactly alike."""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Union

import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

__all__ = ["DetectionTransform"]

log = logging.getLogger(__name__)

_warned_upscale = False



class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform (normalise, resize so the short side is ``min_size`` and the
    long side at most ``max_size``, pad to a multiple of 32) with an optional cap on upscaling.

    Detectors resize every image to their training scale, so a 160 px image meets an 800 px
    setting by being upscaled five-fold: slow, and rarely what a user of tiny images wants. With
    ``max_upscale`` (e.g. 1.0) small images are left smaller; without it, a large upscale is logged
    once so it never happens silently.
    """

    def __init__(self, min_size: Union[int, Sequence[int]], max_size: int, image_mean: Sequence[float],
                 image_std: Sequence[float], max_upscale: Optional[float] = None, size_divisible: int = 32) -> None:
        super().__init__(min_size, max_size, list(image_mean), list(image_std), size_divisible=size_divisible)
        if max_upscale is not None and max_upscale <= 0:
            raise ValueError(f"max_upscale must be > 0, got {max_upscale}")
        self.max_upscale = max_upscale

    def scale_for(self, height: int, width: int, short_side: Optional[int] = None) -> float:
        """The resize factor an ``height x width`` image gets (at the test scale by default)."""
        short_side = self.min_size[-1] if short_side is None else short_side
        scale = min(short_side / min(height, width), self.max_size / max(height, width))
        if self.max_upscale is not None:
            scale = min(scale, self.max_upscale)
        return scale

    def resize(self, image: Tensor, target: Optional[dict[str, Tensor]] = None
               ) -> tuple[Tensor, Optional[dict[str, Tensor]]]:
        global _warned_upscale
        h, w = image.shape[-2:]
        short_side = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        scale = self.scale_for(h, w, short_side)
        if scale > 2.0 and not _warned_upscale:
            _warned_upscale = True
            log.warning("detector input of %dx%d px is upscaled %.1fx to a short side of %d px; set min_size to "
                        "the data's scale or max_upscale to cap it", w, h, scale, short_side)
        # Same call as torchvision's _resize_image_and_masks, so results match it when uncapped.
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                              align_corners=False)[0]
        if target is not None and "boxes" in target:
            target["boxes"] = resize_boxes(target["boxes"], [h, w], list(image.shape[-2:]))
        return image, target
