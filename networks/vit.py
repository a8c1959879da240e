"""Vision Transformers (through timm) as one-stage backbones: the patch-token map.

Methods that describe regions or images by ViT patch tokens (e.g. DINO features) need the tokens as
a spatial map, like a CNN stage: the output of the last block after the final norm, class and
register tokens dropped, reshaped to ``(B, D, H / patch, W / patch)``. timm's
``dynamic_img_size=True`` interpolates the position embeddings, so any input whose sides are
multiples of the patch size works (the detector transforms pad batches to a multiple of 32).

Weights come from a local file in either layout a user has: timm's state dict (``.pth`` or
``model.safetensors``; DINO's published ``dino_vitbase8_pretrain.pth`` has the same keys), or a DINO
training checkpoint (``{'teacher': ..., 'student': ..., 'args': ...}`` with ``backbone.`` /
``module.backbone.`` prefixes and the projection head beside the backbone; the teacher is taken, as
DINO's own evaluation does). timm's ``checkpoint_filter_fn`` then adapts the keys (DINOv2 layouts,
position embeddings of another grid). A file that fits neither is refused with the keys it lacks.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Union

from torch import Tensor, nn

from instsearch.networks.staged import IMAGENET_MEAN, IMAGENET_STD, FeatureInfo, StageInfo, StagedBackbone
from instsearch.networks.weights import read_state_dict, resolve_weights, unwrap_state_dict

log = logging.getLogger(__name__)

__all__ = ["ViTBackbone", "VIT_MODELS", "TOKENS", "load_vit_weights"]

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

#: Where a checkpoint may hold the backbone's state dict, in order of preference: DINO's training
#: checkpoints keep the teacher (the network DINO evaluates) and the student; Lightning and most
#: training scripts use ``state_dict`` / ``model``.
CHECKPOINT_WRAPPERS = ("teacher", "student", "state_dict", "model")


def load_vit_weights(vit: nn.Module, path: Union[str, Path], name: str) -> None:
    """Fill a timm ViT from a local file in timm's or DINO's layout (see the module docstring).

    Raises:
        ValueError: the file lacks tensors of the model (their names are listed), or a tensor's
            shape does not fit (another model size).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    target = vit.state_dict()
    state = unwrap_state_dict(read_state_dict(path, wrappers=CHECKPOINT_WRAPPERS), set(target))
    state = checkpoint_filter_fn(state, vit)  # timm's own adaptation: DINOv2 keys, position-embedding grid
    missing = [k for k in target if k not in state]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... (+{len(missing) - 8})" if len(missing) > 8 else "")
        raise ValueError(f"{name}: {path} is neither a timm state dict nor a DINO checkpoint of this model: it lacks "
                         f"{len(missing)} of the model's {len(target)} tensors ({shown}); file keys e.g. "
                         f"{sorted(state)[:4]}")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in target.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{name}: {path} holds another model size: {', '.join(wrong[:4])}")
    unused = sorted(set(state) - set(target))
    vit.load_state_dict({k: state[k] for k in target})
    log.info("%s: loaded %d tensors from %s%s", name, len(target), path,
             f" ({len(unused)} unused, e.g. {unused[:3]})" if unused else "")


class ViTBackbone(StagedBackbone):
    """A timm ViT whose one stage, ``tokens``, is the patch-token map (stride = patch size).

    Args:
        model_name: a timm ViT name (see :data:`VIT_MODELS`).
        weights: a local weights file of that model, timm's or DINO's layout
            (:func:`load_vit_weights`); ``None`` runs randomly initialised and says so once.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``depth`` for a shallower test model).
    """

    default_frozen_stages = 0  # one stage: freezing it would freeze everything

    def __init__(self, model_name: str, weights: Union[str, Path, None] = None, **timm_kwargs) -> None:
        import timm  # imported here: loading timm costs a second that CNN-only users need not pay

        super().__init__()
        path = resolve_weights(weights, name=model_name)
        self.vit = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True, **timm_kwargs)
        if path is not None:
            load_vit_weights(self.vit, path, model_name)
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

    def forward_layer(self, x: Tensor, layer: str) -> Tensor:
        """The ``tokens`` map. The stage's module is the whole timm model, whose own forward pools
        the tokens into one vector; the map comes from :meth:`forward_stages`."""
        self.parse_layer(layer)  # refuses anything but "tokens"
        return self.forward_stages(x)[TOKENS]
