"""Loading pretrained weights from local files.

instsearch never downloads weights itself: the workplaces it runs in may have no model hub. A network
is given the path of a state-dict file (``weights: /path/to/file.pth``) and loads it here. Online
users get the very same file by letting the library download it once, e.g.::

    from torchvision.models import VGG16_Weights
    VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=True)   # -> ~/.cache/torch/hub/checkpoints/vgg16-397923af.pth

and pass that path. Without a file the network runs randomly initialised, which is fine for tests
and for the synthetic demo but worthless for real benchmarks, so that is said once, loudly.
"""
from __future__ import annotations

import argparse
import logging
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["load_weights", "resolve_weights", "read_state_dict", "unwrap_state_dict", "KNOWN_WEIGHT_FILES",
           "STATE_DICT_WRAPPERS", "reset_random_init_warnings"]

#: Where checkpoints keep a state dict: Lightning's ``state_dict``, detectron2's and torchvision
#: references' ``model``.
STATE_DICT_WRAPPERS = ("state_dict", "model")

log = logging.getLogger(__name__)

#: What file each named network expects, for error messages and the random-init warning.
KNOWN_WEIGHT_FILES: dict[str, str] = {
    "vgg16": "torchvision's VGG-16 ImageNet state dict `vgg16-397923af.pth` (VGG16_Weights.IMAGENET1K_V1)",
    "resnet50": "torchvision's ResNet-50 ImageNet state dict `resnet50-0676ba61.pth` "
                "(ResNet50_Weights.IMAGENET1K_V1) or `resnet50-11ad3fa6.pth` (IMAGENET1K_V2)",
    "resnet50_fpn": "torchvision's ResNet-50 ImageNet state dict `resnet50-0676ba61.pth` "
                    "(ResNet50_Weights.IMAGENET1K_V1) or `resnet50-11ad3fa6.pth` (IMAGENET1K_V2)",
    "fasterrcnn_resnet50_fpn": "torchvision's COCO detector `fasterrcnn_resnet50_fpn_coco-258fb6c6.pth` "
                               "(FasterRCNN_ResNet50_FPN_Weights.COCO_V1)",
    "small": "a state dict of the `small` backbone saved by instsearch (no public pretrained file exists)",
    "resnet101": "torchvision's ResNet-101 ImageNet state dict `resnet101-63fe2227.pth` (ResNet101_Weights.IMAGENET1K_V1)",
    "resnet101_fpn": "torchvision's ResNet-101 ImageNet state dict `resnet101-63fe2227.pth` "
                     "(ResNet101_Weights.IMAGENET1K_V1)",
    "vit_base_patch8_224.dino": "the DINO ViT-B/8 checkpoint: timm's `vit_base_patch8_224.dino` file "
                                "(model.safetensors), DINO's own `dino_vitbase8_pretrain.pth`, or a DINO training "
                                "checkpoint (teacher/student)",
    "resnext101_32x4d": "timm's ResNeXt-101 32x4d ImageNet state dict (`timm/resnext101_32x4d.*`, same key names "
                        "as torchvision's ResNet)",
}

# Wrappers that training frameworks put around a model: DataParallel/DDP ('module.'), torch.compile
# ('_orig_mod.'), Lightning modules holding the network as an attribute ('model.', 'net.', 'network.').
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "net.", "network.")

_warned_random_init: set[str] = set()

KeyMap = Union[Mapping[str, str], Callable[[str], Optional[str]]]


def reset_random_init_warnings() -> None:
    """Forget which random-init warnings were given (for tests of the once-per-process rule)."""
    _warned_random_init.clear()


def _expected(name: str) -> str:
    return KNOWN_WEIGHT_FILES.get(name, f"a PyTorch state-dict file for `{name}`")


def read_state_dict(path: Union[str, Path], wrappers: tuple[str, ...] = STATE_DICT_WRAPPERS) -> dict[str, Tensor]:
    """Read a state dict from ``path``: a raw state dict, or a checkpoint holding one under the first
    key of ``wrappers`` it has (``'state_dict'``: Lightning; ``'model'``: detectron2, torchvision
    references; DINO's training checkpoints keep theirs under ``'teacher'`` and ``'student'``).

    ``.safetensors`` files are read by safetensors; everything else by ``torch.load`` with
    ``weights_only=True`` (a weights file never needs to execute code), which also accepts the
    ``argparse.Namespace`` of options that training scripts (DINO's among them) save next to the weights.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: holds objects other than tensors and plain containers, which a weights file "
                         f"is not allowed to execute; save only the state dict (torch.save(model.state_dict(), "
                         f"path)). Loader message: {str(err).splitlines()[0]}") from err
    if isinstance(obj, Mapping):
        for key in wrappers:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        expected = " or ".join(repr(w) for w in wrappers)
        raise ValueError(f"{path}: not a state dict (expected a mapping of parameter names to tensors, or a "
                         f"checkpoint with one under {expected}); got {type(obj).__name__}"
                         + (f" with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping) else ""))
    return dict(obj)


def unwrap_state_dict(state: dict[str, Tensor], target_keys: set[str]) -> dict[str, Tensor]:
    """``state`` renamed to fit a module with ``target_keys``: wrapper prefixes shared by every key
    stripped (``module.``, ``_orig_mod.``, ...), then, when the file holds a larger model around the
    module (``net.detector.backbone.*`` of a checkpoint, ``backbone.*`` beside ``head.*`` in a DINO
    checkpoint), only the entries under the prefix that matches the module best, without it."""
    return _select_submodule(_strip_wrapper_prefixes(state, target_keys), target_keys)


def _strip_wrapper_prefixes(state: dict[str, Tensor], target_keys: set[str]) -> dict[str, Tensor]:
    """Strip wrapper prefixes shared by every key, as long as that helps match the module."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix):]: v for k, v in state.items()}
                # Keep the prefix when the module itself uses it (e.g. a module with a `model` child).
                if len(target_keys & stripped.keys()) >= len(target_keys & state.keys()):
                    state, changed = stripped, True
                    break
    return state


def _select_submodule(state: dict[str, Tensor], target_keys: set[str]) -> dict[str, Tensor]:
    """The part of ``state`` that is the module, when the file holds a larger model around it.

    A backbone inside an instsearch checkpoint is stored as ``net.detector.backbone.conv1.weight``
    (say): find the prefix whose removal matches the most of the module's keys, and keep only the
    entries under it -- so the backbone of any trained checkpoint (the demo's, for instance) loads by
    path like a plain backbone file. Nothing changes when the keys already match best as they are.
    """
    direct = len(target_keys & state.keys())
    counts: dict[str, int] = {}
    for key in state:
        dot = key.find(".")
        while dot != -1:
            if key[dot + 1:] in target_keys:
                prefix = key[:dot + 1]
                counts[prefix] = counts.get(prefix, 0) + 1
            dot = key.find(".", dot + 1)
    if not counts:
        return state
    prefix, matched = max(counts.items(), key=lambda item: (item[1], -len(item[0])))
    if matched <= direct:
        return state
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _apply_key_map(state: dict[str, Tensor], key_map: KeyMap) -> dict[str, Tensor]:
    """Rename keys: a mapping replaces the longest matching prefix; a callable returns the new key
    or ``None`` to drop the entry."""
    out: dict[str, Tensor] = {}
    if callable(key_map):
        for k, v in state.items():
            new = key_map(k)
            if new is not None:
                out[new] = v
        return out
    prefixes = sorted(key_map, key=len, reverse=True)
    for k, v in state.items():
        for prefix in prefixes:
            if k.startswith(prefix):
                k = key_map[prefix] + k[len(prefix):]
                break
        out[k] = v
    return out


def resolve_weights(weights: Union[str, Path, None], *, name: str) -> Optional[Path]:
    """The checked local path of a weights file, or ``None`` to run randomly initialised.

    Every network resolves its ``weights`` argument here, whoever reads the file afterwards
    (:func:`load_weights`, or timm for its own checkpoints), so a missing file and random
    initialisation are reported the same way everywhere.

    Raises:
        FileNotFoundError: ``weights`` does not exist (the message names the file expected there).
    """
    if weights is None:
        if name not in _warned_random_init:
            _warned_random_init.add(name)
            log.warning("!!! %s: no pretrained weights given, the model runs RANDOMLY INITIALISED. Pretrained "
                        "weights were not found (this workplace has no model hub); pass `weights: /path` to "
                        "%s.", name, _expected(name))
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{name}: weights file {str(path)!r} not found; expected {_expected(name)}. "
                                f"Download it where a network is available (e.g. through the library's weights "
                                f"enum) and pass its local path.")
    return path


def load_weights(module: nn.Module, weights: Union[str, Path, None], *, name: str, strict: bool = False,
                 key_map: Optional[KeyMap] = None, wrappers: tuple[str, ...] = STATE_DICT_WRAPPERS,
                 transform: Optional[Callable[[dict[str, Tensor]], dict[str, Tensor]]] = None,
                 require_complete: bool = False) -> bool:
    """Load a local weights file into ``module``.

    Args:
        module: the network to fill.
        weights: path of the file, or ``None`` to run randomly initialised (one loud warning per
            process per ``name``).
        name: what the weights are for (``"vgg16"``, ``"resnet50_fpn"``, ...); names the expected
            file in messages.
        strict: raise on missing / unexpected keys or shape mismatches instead of logging them.
            Non-strict loading is the norm for fine-tuning: a detector head with another class
            count, or a classifier the backbone drops, must not stop the load.
        key_map: renames applied after wrapper prefixes are stripped: ``{"old.prefix.": "new.prefix."}``
            or a callable ``key -> new key | None`` (``None`` drops it). Without one, a file that holds
            a larger model around ``module`` (e.g. a trained detector's checkpoint for its backbone)
            is cut to the entries under the prefix that matches ``module`` best.
        wrappers: the checkpoint keys a state dict may sit under (:func:`read_state_dict`).
        transform: applied to the renamed state dict before it is checked against ``module``
            (e.g. timm's ``checkpoint_filter_fn``, which adapts another layout's keys).
        require_complete: refuse a file that lacks any of ``module``'s tensors or holds one of
            another shape (``ValueError`` listing them) -- for networks that are nothing without all
            their weights, unlike a detector whose new head starts from scratch.

    Returns:
        ``True`` when a file was loaded, ``False`` when running randomly initialised.

    Raises:
        FileNotFoundError: ``weights`` does not exist (the message names the file expected there).
        ValueError: the file is not a state dict, none of its tensors fit ``module``, or (with
            ``require_complete``) it lacks tensors of ``module`` or holds some of another shape.
        RuntimeError: ``strict`` and the file does not match ``module`` exactly.
    """
    path = resolve_weights(weights, name=name)
    if path is None:
        return False
    target = module.state_dict()
    # an explicit key_map says how names map; otherwise find the module inside a larger model
    if key_map is not None:
        state = _apply_key_map(_strip_wrapper_prefixes(read_state_dict(path, wrappers), set(target)), key_map)
    else:
        state = unwrap_state_dict(read_state_dict(path, wrappers), set(target))
    if transform is not None:
        state = transform(state)
    if require_complete:
        missing = [k for k in target if k not in state]
        if missing:
            raise ValueError(f"{name}: {path} lacks {len(missing)} of the model's {len(target)} tensors "
                             f"({_abbrev(missing)}); file keys e.g. {sorted(state)[:4]}; expected {_expected(name)}")

    mismatched = sorted(k for k, v in state.items() if k in target and target[k].shape != v.shape)
    if mismatched:
        details = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in mismatched[:5])
        if require_complete:
            raise ValueError(f"{name}: {path} holds another model size: {len(mismatched)} tensors differ in shape "
                             f"({details}); expected {_expected(name)}")
        if strict:
            raise RuntimeError(f"{name}: {path}: shape mismatch for {len(mismatched)} tensors: {details}")
        log.info("%s: %s: skipping %d tensors whose shape differs (%s)", name, path, len(mismatched), details)
        state = {k: v for k, v in state.items() if k not in mismatched}
    loadable = [k for k in state if k in target]
    if not loadable:
        raise ValueError(f"{name}: {path} holds no tensor that fits the model (file keys e.g. "
                         f"{sorted(state)[:3]}, model keys e.g. {sorted(target)[:3]}); expected {_expected(name)}")
    result = module.load_state_dict(state, strict=strict)
    log.info("%s: loaded %d/%d tensors from %s", name, len(loadable), len(target), path)
    if result.missing_keys:
        log.info("%s: %d tensors not in the file (kept at initialisation): %s", name, len(result.missing_keys),
                 _abbrev(result.missing_keys))
    if result.unexpected_keys:
        log.info("%s: %d tensors in the file not used by the model: %s", name, len(result.unexpected_keys),
                 _abbrev(result.unexpected_keys))
    return True


def _abbrev(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")
