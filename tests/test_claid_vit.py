"""CLAID in its paper's setting: timm ViT patch tokens as the patch grid, weights in timm's and DINO's
layouts, the shipped real-benchmark configs through `instsearch test` on an Instance-160 layout."""
from __future__ import annotations

import argparse
import logging

import pytest
import timm
import torch
from PIL import Image

from config_runs import run_shipped_config
from layout_files import text
from smooth_images import smooth_image

from instsearch.networks.claid import CLAID
from instsearch.networks.vit import VIT_MODELS, ViTBackbone
from instsearch.networks.weights import reset_random_init_warnings

TINY_VIT = dict(depth=1, embed_dim=32, num_heads=2)  # a randomly initialised ViT of the named layout, cheap on CPU


def vit_claid(name: str, **kwargs) -> CLAID:
    patch = timm.create_model(name, pretrained=False, **TINY_VIT).patch_embed.patch_size[0]
    options = dict(patch_backbone=name, patch_backbone_options=TINY_VIT, describe_backbone="small",
                   describe_layer="conv3", min_size=4 * patch, max_size=100 * patch)
    options.update(kwargs)
    torch.manual_seed(0)
    return CLAID(**options).eval()


@pytest.mark.parametrize("name", VIT_MODELS)
def test_every_registry_vit_gives_a_patch_grid_of_the_image_size(name):
    net = vit_claid(name)
    p = net.patch_stride
    assert p == {"patch8": 8, "patch16": 16, "patch14": 14}[name.split("_")[2]]
    # 40 x 70 -> short side 4p: (4p, 7p), a 4 x 7 grid of 32-D tokens whatever the patch size
    with torch.no_grad():
        grid = net.patch_grid(smooth_image(40, 70))
    assert tuple(grid.shape) == (4, 7, 32)
    # the grid is the backbone's token map: last block, final norm, prefix tokens dropped
    x = torch.rand(1, 3, 3 * p, 5 * p)
    with torch.no_grad():
        tokens = net.patch_backbone.vit.forward_features(x)[:, net.patch_backbone.vit.num_prefix_tokens:]
        fmap = net.patch_backbone.forward_layer(x, "tokens")
    assert tuple(fmap.shape) == (1, 32, 3, 5)
    torch.testing.assert_close(fmap[0].permute(1, 2, 0).reshape(15, 32), tokens[0])


def test_vit_layer_other_than_tokens_is_refused():
    backbone = ViTBackbone("vit_small_patch16_224", **TINY_VIT)
    with pytest.raises(ValueError, match="unknown layer 'conv5'"):
        backbone.forward_layer(torch.rand(1, 3, 32, 32), "conv5")
    with pytest.raises(ValueError, match="not a sequence of blocks"):
        backbone.forward_layer(torch.rand(1, 3, 32, 32), "tokens.0")


# ---------------------------------------------------------------------------------------------- weights
NAME = "vit_small_patch8_224.dino"


@pytest.fixture(scope="module")
def source_vit():
    torch.manual_seed(1)
    return timm.create_model(NAME, pretrained=False, num_classes=0, **TINY_VIT)


def _dino_head() -> dict[str, torch.Tensor]:
    return {"head.mlp.0.weight": torch.rand(8, 32), "head.last_layer.weight_g": torch.rand(4, 1)}


@pytest.mark.parametrize("layout", ["timm", "timm_safetensors", "dino_pretrain", "dino_teacher_student",
                                    "dino_student_only", "instsearch_checkpoint"])
def test_vit_weights_load_in_timm_and_dino_layouts(tmp_path, source_vit, layout):
    state = source_vit.state_dict()
    path = tmp_path / "weights.pth"
    if layout == "timm":
        torch.save(state, path)
    elif layout == "timm_safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif layout == "dino_pretrain":  # dino_vitbase8_pretrain.pth: the backbone's keys as they are
        torch.save(dict(state), path)
    elif layout == "dino_teacher_student":  # DINO's training checkpoint: teacher differs from student
        student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in state.items()}
        student.update({f"module.{k}": v for k, v in _dino_head().items()})
        teacher = {f"backbone.{k}": v for k, v in state.items()}
        teacher.update(_dino_head())
        torch.save({"student": student, "teacher": teacher, "epoch": 3,
                    "args": argparse.Namespace(arch="vit_small", patch_size=8)}, path)
    elif layout == "dino_student_only":
        student = {f"module.backbone.{k}": v for k, v in state.items()}
        student.update({f"module.{k}": v for k, v in _dino_head().items()})
        torch.save({"student": student}, path)
    else:  # any instsearch checkpoint holding the network
        torch.save({"state_dict": {f"net.patch_backbone.vit.{k}": v for k, v in state.items()}}, path)
    loaded = ViTBackbone(NAME, weights=path, **TINY_VIT)
    for key, value in state.items():
        assert torch.equal(loaded.vit.state_dict()[key], value), key


def test_vit_weights_that_fit_neither_layout_are_refused_with_the_missing_keys(tmp_path, source_vit):
    state = dict(source_vit.state_dict())
    del state["blocks.0.attn.qkv.weight"], state["norm.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"lacks 2 of the model's .*blocks\.0\.attn\.qkv\.weight.*norm\.weight"):
        ViTBackbone(NAME, weights=path, **TINY_VIT)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.rand(4, 3, 7, 7)}, other)
    with pytest.raises(ValueError, match=r"lacks 18 of the model's 18 tensors"):
        ViTBackbone(NAME, weights=other, **TINY_VIT)
    wider = tmp_path / "wider.pth"
    torch.save(timm.create_model(NAME, pretrained=False, num_classes=0, depth=1, embed_dim=48,
                                 num_heads=2).state_dict(), wider)
    with pytest.raises(ValueError, match="another model size"):
        ViTBackbone(NAME, weights=wider, **TINY_VIT)
    # ViT-S/16 weights into ViT-S/8: timm's filter would resample the patch kernel; refused instead
    patch16 = tmp_path / "patch16.pth"
    torch.save(timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0,
                                 **TINY_VIT).state_dict(), patch16)
    with pytest.raises(ValueError, match=r"\(16, 16\) patches, the model has \(8, 8\)"):
        ViTBackbone(NAME, weights=patch16, **TINY_VIT)


def test_dinov2_layout_and_another_grid_are_adapted_by_timms_filter(tmp_path):
    """DINOv2's own files name the register tokens `register_tokens` and carry a `mask_token`; their
    position embeddings are for another grid (518 px) than the model's default: timm's filter adapts
    both, so the tokens equal those of the source model."""
    name = "vit_small_patch14_reg4_dinov2.lvd142m"
    torch.manual_seed(2)
    source = timm.create_model(name, pretrained=False, num_classes=0, img_size=518, dynamic_img_size=True, **TINY_VIT)
    state = {("register_tokens" if k == "reg_token" else k): v for k, v in source.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 32)
    # DINOv2's pos_embed keeps a class-token position in front of the 37 x 37 grid
    state["pos_embed"] = torch.cat([torch.zeros(1, 1, 32), state["pos_embed"]], dim=1)
    path = tmp_path / "dinov2.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in state.items()}}, path)
    loaded = ViTBackbone(name, weights=path, img_size=224, **TINY_VIT).eval()
    assert loaded.vit.pos_embed.shape[1] == 16 * 16  # resampled from 37 x 37 to the model's 16 x 16
    torch.testing.assert_close(loaded.vit.reg_token, source.reg_token)
    x = torch.rand(1, 3, 14 * 16, 14 * 16)
    with torch.no_grad():
        expected = source.forward_features(x)[:, source.num_prefix_tokens:]
        got = loaded.forward_layer(x, "tokens").flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------------------------- configs
def instance_folder(root, sizes=((120, 160), (150, 110), (96, 200), (130, 130), (100, 170), (140, 100))):
    """An Instance-160 layout (query.txt, reference.txt, groundtruth/NNN.txt, images) of smooth
    random photographs-to-be of several sizes and aspect ratios."""
    names = []
    for k, (h, w) in enumerate(sizes):
        rel = f"Seq{k % 2}/{k:04d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        pixels = (smooth_image(h, w, seed=k).permute(1, 2, 0) * 255).round().byte().numpy()
        Image.fromarray(pixels).save(root / rel, "JPEG", quality=95)
        names.append(rel)
    text(root / "query.txt", f"{names[0]}>001 10 12 90 100\n{names[1]}>002 5 20 100 120\n")
    text(root / "reference.txt", "".join(f"{n}\n" for n in names[2:]))
    text(root / "groundtruth/001.txt", f"{names[2]} 10 10 80 90\n{names[4]}\n")
    text(root / "groundtruth/002.txt", f"{names[3]} 0 0 60 60\n")
    return root


@pytest.fixture(scope="module")
def instance_benchmark(tmp_path_factory):
    from instsearch.datamodules.converters import convert

    root = instance_folder(tmp_path_factory.mktemp("instance160") / "Instance-160")
    out = root.parent / "benchmark.json"
    convert("instance160", root, out)
    return out


@pytest.mark.parametrize("config", ["claid_instance160", "claid_instance335", "claid_instre", "claid_public"])
@pytest.mark.parametrize("vit", ["vit_base_patch8_224.dino", "vit_small_patch16_224.dino"])
def test_shipped_real_configs_run_on_a_vit_through_instsearch_test(tmp_path, instance_benchmark, capsys, caplog,
                                                                   config, vit):
    """The paper's setting as shipped (ViT patches, ResNet-50 conv5.0 descriptor), the ViT made
    shallow and the images small, on an Instance-160 layout without weights."""
    reset_random_init_warnings()
    with caplog.at_level(logging.WARNING):
        metrics, run = run_shipped_config(config, tmp_path, instance_benchmark, capsys,
                                          dict(patch_backbone=vit, patch_backbone_options=TINY_VIT,
                                               min_size=64, max_size=160))
    assert metrics["num_queries"] == 2
    assert metrics["regions_per_image"] >= 1.0
    assert set(run["rankings"]) == {"001", "002"}
    ranked = {hit["image"] for hit in run["rankings"]["001"]}
    assert ranked <= {"Seq0/0002.jpg", "Seq1/0003.jpg", "Seq0/0004.jpg", "Seq1/0005.jpg"}
    # without weights: said once per network, not once per image
    warnings = [r.getMessage() for r in caplog.records if "RANDOMLY INITIALISED" in r.getMessage()]
    assert sum(vit in w for w in warnings) == 1 and sum("resnet50" in w for w in warnings) == 1
