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

The position embeddings of another grid than the checkpoint's are resampled by timm
(``dynamic_img_size``: bicubic with antialiasing to the exact grid); DINO's own
``interpolate_pos_encoding`` uses bicubic without antialiasing and a ``(n + 0.1) / N`` scale factor,
which gives embeddings a few per cent apart (about 3 % relative on a 45 x 60 grid), so tokens are
close to, not identical with, those of DINO's code at sizes other than 224.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Union

from torch import Tensor, nn

from instsearch.networks.staged import IMAGENET_MEAN, IMAGENET_STD, FeatureInfo, StageInfo, StagedBackbone
from instsearch.networks.weights import STATE_DICT_WRAPPERS, load_weights, resolve_weights

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
#: checkpoints keep the teacher (the network DINO evaluates) and the student, others
#: :data:`~instsearch.networks.weights.STATE_DICT_WRAPPERS`.
CHECKPOINT_WRAPPERS = ("teacher", "student") + STATE_DICT_WRAPPERS


def load_vit_weights(vit: nn.Module, path: Union[str, Path], name: str) -> None:
    """Fill a timm ViT from a local file in timm's or DINO's layout (see the module docstring).

    Raises:
        ValueError: the file's patches are of another size (timm's filter would silently resample
            the patch embedding, e.g. load ViT-B/16 weights into ViT-B/8), it lacks tensors of the
            model (their names are listed), or a tensor's shape does not fit (another model size).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    patch = tuple(vit.patch_embed.proj.weight.shape[-2:])

    def adapt(state: dict[str, Tensor]) -> dict[str, Tensor]:
        kernel = state.get("patch_embed.proj.weight")
        if kernel is not None and kernel.ndim == 4 and tuple(kernel.shape[-2:]) != patch:
            raise ValueError(f"{name}: {path} holds a ViT with {tuple(kernel.shape[-2:])} patches, the model has "
                             f"{patch}: another model")
        return checkpoint_filter_fn(state, vit)  # timm's adaptation: DINOv2 keys, position-embedding grid

    load_weights(vit, path, name=name, wrappers=CHECKPOINT_WRAPPERS, transform=adapt, require_complete=True)


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
