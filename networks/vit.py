"""Vision Transformers (through timm) as one-stage backbones: the patch-token map.

Methods that describe regions or images by ViT patch tokens (e.g. DINO features) need the tokens as
a spatial map, like a CNN stage: the output of the last block after the final norm, class and
register tokens dropped, reshaped to ``(B, D, H / patch, W / patch)``. timm's
``dynamic_img_size=True`` interpolates the position embeddings, so any input whose sides are
multiples of the patch size works (the detector transforms pad batches to a multiple of 32).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Union

from torch import Tensor, nn

from instsearch.networks.staged import IMAGENET_MEAN, IMAGENET_STD, FeatureInfo, StageInfo, StagedBackbone
from instsearch.networks.weights import resolve_weights

__all__ = ["ViTBackbone", "VIT_MODELS", "TOKENS"]

#: The ViT backbones registered by name (timm model names, with the pretrained tag where it sets the
#: expected weights and normalisation, e.g. DINO's ImageNet statistics).
VIT_MODELS = (
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_small_patch16_224.dino",
    "vit_small_patch8_224.dino",
    "vit_base_patch16_224.dino",
    "vit_base_patch8_224.dino",
    "vit_small_patch14_reg4_dinov2.lvd142m",
    "vit_base_patch14_reg4_dinov2.lvd142m",
)

#: The name of a ViT's single stage.
TOKENS = "tokens"


class ViTBackbone(StagedBackbone):
    """A timm ViT whose one stage, ``tokens``, is the patch-token map (stride = patch size).

    Args:
        model_name: a timm ViT name (see :data:`VIT_MODELS`).
        weights: a local timm checkpoint of that model, loaded by timm itself (its key filters
            adapt e.g. original DINO files) through ``pretrained_cfg_overlay=dict(file=...)``;
            ``None`` runs randomly initialised and says so once.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``depth`` for a shallower test model).
    """

    default_frozen_stages = 0  # one stage: freezing it would freeze everything

    def __init__(self, model_name: str, weights: Union[str, Path, None] = None, **timm_kwargs) -> None:
        import timm  # imported here: loading timm costs a second that CNN-only users need not pay

        super().__init__()
        path = resolve_weights(weights, name=model_name)
        self.vit = timm.create_model(model_name, pretrained=path is not None, num_classes=0, dynamic_img_size=True,
                                     pretrained_cfg_overlay=None if path is None else dict(file=str(path)),
                                     **timm_kwargs)
        patch_h, patch_w = self.vit.patch_embed.patch_size
        if patch_h != patch_w:
            raise ValueError(f"{model_name}: non-square patches {patch_h}x{patch_w} are not supported")
        self.patch_size = int(patch_h)
        self.feature_info = FeatureInfo([StageInfo(TOKENS, int(self.vit.embed_dim), self.patch_size)])
        cfg = self.vit.pretrained_cfg
        self.input_mean = tuple(cfg.get("mean", IMAGENET_MEAN))
        self.input_std = tuple(cfg.get("std", IMAGENET_STD))

    def stage_modules(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict([(TOKENS, self.vit)])

    def forward_stages(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        batch, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"ViT input {height}x{width} is not a multiple of the patch size {self.patch_size}")
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]  # drop class / register tokens
        fmap = tokens.transpose(1, 2).reshape(batch, -1, height // self.patch_size, width // self.patch_size)
        return OrderedDict([(TOKENS, fmap)])
