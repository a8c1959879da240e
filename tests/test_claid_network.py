"""CLAID as a search network: the patch grid, regions in image pixels, the descriptor's pooling
options, the whole-image fallback, and `instsearch test` of a training-free config.
"The public code" is the authors' CLAID code
(https://github.com/wlzhao22/CLAID, commit 8a2fd4c41c3d04b0a45c4703faf806ce85e13ba7)."""
from __future__ import annotations

import json

import pytest
import torch

from colour_patches import ColourPatches
from config_runs import run_shipped_config

from instsearch.networks.claid import CLAID, resize_to_grid

# background, and three mutually orthogonal object colours
BACKGROUND = (0.0, 0.0, 0.3)  # low l1 norm: outside the high-energy set
RED, GREEN = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)


def planted_image(height: int = 96, width: int = 128) -> tuple[torch.Tensor, dict[str, list[int]], torch.Tensor]:
    """A red rectangle and a green L-shape on a dark background, on the 8 px patch lattice; the
    boxes (pixels) and the L-shape's pixel mask."""
    image = torch.tensor(BACKGROUND)[:, None, None].repeat(1, height, width)
    image[:, 16:64, 16:56] = torch.tensor(RED)[:, None, None]  # 6 x 5 patches
    green = torch.zeros(height, width, dtype=torch.bool)
    green[40:88, 72:96] = True  # 6 x 3 patches
    green[72:88, 96:120] = True  # + 2 x 3 patches: an L of 24 patches
    image[:, green] = torch.tensor(GREEN)[:, None]
    return image, {"red": [16, 16, 56, 64], "green": [72, 40, 120, 88]}, green


def colour_claid(**kwargs) -> CLAID:
    options = dict(patch_backbone=ColourPatches(), describe_backbone="small", describe_layer="conv5.0",
                   min_size=96, max_size=400)
    options.update(kwargs)
    torch.manual_seed(0)
    return CLAID(**options).eval()


def test_resize_to_grid_hand_cases():
    assert resize_to_grid(480, 640, 360, 800, 8) == (360, 480)  # short side to 360
    assert resize_to_grid(300, 1500, 360, 800, 8) == (160, 800)  # long side capped: 800 / 1500 * 300 = 160
    assert resize_to_grid(100, 133, 100, 800, 8) == (104, 136)  # rounded to whole patches: 12.5 -> 13, 16.6 -> 17
    assert resize_to_grid(10, 10, 4, 4, 8) == (8, 8)  # at least one patch


def test_forward_layer_block_is_the_first_block_of_the_stage():
    from instsearch.networks.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet26", frozen_stages=0).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        stages = backbone.stage_modules()
        y = x
        for name in ("conv1", "conv2", "conv3", "conv4"):
            y = stages[name](y)
        expected = stages["conv5"][0](y)  # torchvision's layer4[0]
        got = backbone.forward_layer(x, "conv5.0")
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(backbone.forward_layer(x, "conv4"), backbone.forward_stages(x)["conv4"])
    assert backbone.layer_channels("conv5.0") == 2048 and backbone.layer_stride("conv5.0") == 32
    with pytest.raises(ValueError, match="blocks 0..1"):
        backbone.parse_layer("conv5.7")
    with pytest.raises(ValueError, match="unknown layer 'layer4.0'"):
        backbone.parse_layer("layer4.0")


def test_regions_are_the_planted_objects_in_image_pixels():
    image, boxes, _ = planted_image()
    net = colour_claid()
    with torch.no_grad():
        (regions,) = net.detect_regions([image])
    assert regions.image_size == (96, 128)
    got = sorted(regions.boxes.tolist())
    assert got == sorted([[float(v) for v in boxes["red"]], [float(v) for v in boxes["green"]]])
    # the background is one coherent but low-energy node: a dummy, never output
    assert len(regions) == 2
    assert regions.features.shape == (2, net.feature_dim) == (2, 256)
    torch.testing.assert_close(regions.features.norm(dim=1), torch.ones(2))
    # scores are the energy ratios xi(S): both objects lie wholly in the high-energy set here
    assert regions.scores.tolist() == pytest.approx([1.0, 1.0])


def test_a_smaller_image_is_resized_for_the_grid_and_boxes_come_back_in_its_pixels():
    image, boxes, green = planted_image()
    small = torch.nn.functional.interpolate(image[None], size=(48, 64), mode="nearest")[0]
    net = colour_claid()  # min_size 96: the 48 x 64 image is doubled for the 12 x 16 grid
    with torch.no_grad():
        (regions,) = net.detect_regions([small])
    assert regions.image_size == (48, 64)
    half = sorted([[v / 2 for v in boxes["red"]], [v / 2 for v in boxes["green"]]])
    assert sorted(regions.boxes.tolist()) == half
    # masks are upsampled to the given image: the L-shape, not its box
    index = max(range(2), key=lambda i: regions.boxes[i, 0].item())  # the green one is on the right
    torch.testing.assert_close(regions.masks[index], green[::2, ::2].float())


def test_pool_in_mask_changes_only_the_l_shaped_region():
    image, _, _ = planted_image()
    with torch.no_grad():
        box = colour_claid().detect_regions([image])[0]
        masked = colour_claid(pool_in_mask=True).detect_regions([image])[0]
    order_box = torch.argsort(box.boxes[:, 0])
    order_masked = torch.argsort(masked.boxes[:, 0])
    red_box, green_box = box.features[order_box]
    red_masked, green_masked = masked.features[order_masked]
    torch.testing.assert_close(red_box, red_masked)  # a rectangle fills its box
    assert not torch.allclose(green_box, green_masked, atol=1e-4)  # the L-shape does not


@pytest.mark.parametrize("pooling", ["max", "gem"])
def test_pooling_option_changes_the_features(pooling):
    image, _, _ = planted_image()
    with torch.no_grad():
        avg = colour_claid().detect_regions([image])[0]
        other = colour_claid(pooling=pooling).detect_regions([image])[0]
    assert torch.equal(avg.boxes, other.boxes)
    assert not torch.allclose(avg.features, other.features, atol=1e-4)


def test_query_box_is_pooled_from_the_same_map_as_regions():
    image, boxes, _ = planted_image()
    net = colour_claid()
    with torch.no_grad():
        (regions,) = net.detect_regions([image])
        (query,) = net.describe_boxes([image], [regions.boxes])
    torch.testing.assert_close(query, regions.features)


def test_uniform_image_keeps_its_whole_frame_only_with_the_fallback():
    image = torch.tensor(RED)[:, None, None].repeat(1, 64, 80)  # one colour: c-bar = 1, never cut
    with torch.no_grad():
        (kept,) = colour_claid().detect_regions([image])
        (none,) = colour_claid(whole_image_fallback=False).detect_regions([image])
    assert kept.boxes.tolist() == [[0.0, 0.0, 80.0, 64.0]]
    assert len(none) == 0 and none.features.shape == (0, 256)


def test_unknown_describe_layer_is_refused_at_construction():
    with pytest.raises(ValueError, match="unknown layer"):
        CLAID(patch_backbone=ColourPatches(), describe_backbone="small", describe_layer="layer4.0")


def test_training_free_module_refuses_fit():
    import pytorch_lightning as pl

    from instsearch.lightning_modules.training_free import TrainingFreeModule

    module = TrainingFreeModule(colour_claid())
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    loader = torch.utils.data.DataLoader([0])
    with pytest.raises(RuntimeError, match="training-free"):
        trainer.fit(module, loader)


def test_instsearch_test_runs_the_claid_config_without_a_checkpoint(tmp_path, small_benchmark, capsys):
    """The shipped synthetic config, made small, through `instsearch test`: metrics and run.json."""
    metrics, run = run_shipped_config("claid_synthetic", tmp_path, small_benchmark, capsys,
                                      dict(min_size=96, max_size=160))
    assert metrics["num_queries"] == 4
    assert metrics["regions_per_image"] >= 1.0  # every image keeps at least its whole frame
    assert set(run["rankings"]) == {q["id"] for q in json.loads(small_benchmark.read_text())["queries"]}
    assert run["method"] == "CLAID"  # the network, not the generic TrainingFreeModule
    # the decomposition's figures (the paper's Table V columns) reach costs.json
    costs = json.loads(next(tmp_path.rglob("costs.json")).read_text())
    assert set(costs["network"]) == {"cuts/img", "regions/img", "grid s/img", "decomposition s/img",
                                     "decomposition s/cut"}


def test_running_figures_count_the_cuts_and_regions_of_each_database_image():
    image, _, _ = planted_image()
    net = colour_claid()
    with torch.no_grad():
        cuts = sum(n.bisected for n in net.hierarchy(image))
        net.detect_regions([image, image.flip(-1)])
        net.describe_boxes([image], [torch.tensor([[0.0, 0.0, 50.0, 50.0]])])  # a query: not counted
    figures = net.progress_metrics()
    # the planted image: one cut of the root into background and objects, whose half falls into
    # two connected components (red, green), both output regions; its mirror image decomposes alike
    assert cuts == 1
    assert figures["cuts/img"] == 1.0 and figures["regions/img"] == 2.0
    assert figures["decomposition s/cut"] == pytest.approx(figures["decomposition s/img"])


# ------------------------------------------------------------------ paper defaults, public options
def test_claid_defaults_are_the_papers():
    """The CLAID paper's setting (Sec. IV-A and Fig. 5), written out: a changed default fails here."""
    import inspect

    paper = dict(patch_backbone="vit_base_patch8_224.dino", patch_layer=None, min_size=360, max_size=800,
                 resize="paper", describe_backbone="resnet50", describe_layer="conv5.0", pooling="avg",
                 pool_in_mask=False, tau1=0.97, tau2=0.2, alpha=0.2, energy_top=0.3, min_patches=15,
                 seed_selection=True, method="ksums", max_depth=None, filter_dummy=True)
    defaults = {k: p.default for k, p in inspect.signature(CLAID).parameters.items()}
    assert {k: defaults[k] for k in paper} == paper


def test_resize_public_is_torchvisions_resize_with_max_size():
    from instsearch.networks.claid import resize_public

    assert resize_public(480, 640, 360, 800) == (360, 480)
    assert resize_public(640, 481, 360, 800) == (479, 360)  # int(360 * 640 / 481) = int(479.002)
    assert resize_public(400, 1500, 360, 800) == (213, 800)  # 1350 > 800: int(800 * 360 / 1350) = 213
    # and as torchvision's own transform computes it
    from torchvision.transforms import Resize

    for h, w in [(480, 640), (640, 481), (400, 1500), (1500, 401), (777, 1033), (356, 356)]:
        out = Resize(360, max_size=800)(torch.zeros(1, h, w))
        assert resize_public(h, w, 360, 800) == tuple(out.shape[-2:]), (h, w)


def test_patch_frame_paper_and_public():
    paper, public = colour_claid(min_size=360, max_size=800), colour_claid(min_size=360, max_size=800, resize="public")
    f = paper.patch_frame(400, 1500)  # 213.3 -> 216 rows (27 patches, half up), 800 columns
    assert (f.resized, f.grid, f.covered) == ((216, 800), (27, 100), (400.0, 1500.0))
    f = public.patch_frame(400, 1500)  # resized to 213 x 800, the 5 bottom rows cropped
    assert (f.resized, f.grid) == ((213, 800), (26, 100))
    assert f.covered == pytest.approx((26 * 8 * 400 / 213, 1500.0))
    f = public.patch_frame(300, 501)  # short side <= 355: not resized, cropped to 296 x 496
    assert (f.resized, f.grid, f.covered) == ((300, 501), (37, 62), (296.0, 496.0))
    f = public.patch_frame(355, 600)  # 355 is not above 355: as it is
    assert (f.resized, f.grid) == ((355, 600), (44, 75))
    f = public.patch_frame(356, 600)  # 356 is: Resize(360) -> 360 x int(360 * 600 / 356) = 606
    assert (f.resized, f.grid) == ((360, 606), (45, 75))
    f = public.patch_frame(5, 3)  # smaller than a patch: enlarged to one patch, which covers it all
    assert (f.resized, f.grid, f.covered) == ((8, 8), (1, 1), (5.0, 3.0))


def test_public_resize_keeps_small_images_and_crops_to_whole_patches():
    image, boxes, green = planted_image()
    big = torch.nn.functional.pad(image, (0, 5, 0, 3), value=0.0)  # 99 x 133: not a multiple of 8
    big[:, 96:, :] = torch.tensor(BACKGROUND)[:, None, None]
    big[:, :, 128:] = torch.tensor(BACKGROUND)[:, None, None]
    with torch.no_grad():
        (regions,) = colour_claid(resize="public", min_size=360).detect_regions([big])
    # not resized (short side 99 <= 355): the planted objects' boxes, in the image's own pixels
    assert sorted(regions.boxes.tolist()) == sorted([[float(v) for v in boxes["red"]],
                                                     [float(v) for v in boxes["green"]]])
    assert regions.masks.shape[1:] == (99, 133)
    index = max(range(2), key=lambda i: regions.boxes[i, 0].item())
    expected = torch.zeros(99, 133)
    expected[:96, :128] = green.float()
    torch.testing.assert_close(regions.masks[index], expected)


def test_region_features_do_not_depend_on_the_batch():
    image, _, _ = planted_image()
    larger = torch.rand(3, 200, 260)
    net = colour_claid()
    with torch.no_grad():
        (alone,) = net.detect_regions([image])
        together, _ = net.detect_regions([image, larger])
        (query_alone,) = net.describe_boxes([image], [alone.boxes])
        query_together, _ = net.describe_boxes([image, larger], [alone.boxes, torch.tensor([[0.0, 0.0, 50.0, 50.0]])])
    assert torch.equal(alone.boxes, together.boxes)
    assert torch.equal(alone.features, together.features)
    assert torch.equal(query_alone, query_together)


def test_rank_nodes_orders_by_xi_then_depth_then_size_then_position():
    from instsearch.networks.claid import rank_nodes
    from instsearch.networks.bisecting import RegionNode

    def node(name, xi, level, cells):
        mask = torch.zeros(4, 4, dtype=torch.bool)
        mask.view(-1)[list(cells)] = True
        n = RegionNode(mask=mask, level=level, parent=0, connectivity=0.5, energy_ratio=xi, dummy=False, bisected=False)
        n.name = name
        return n

    nodes = [node("a", 0.5, 1, range(10)), node("b", 1.0, 2, range(9)), node("c", 1.0, 1, [5, 6]),
             node("d", 1.0, 1, [1, 2, 3]), node("e", 1.0, 1, [0, 9, 10]), node("f", 0.75, 3, [4]),
             node("g", 1.0, 1, [12, 13, 14, 15])]
    # g: the largest of the ties, though its first patch comes last
    assert [n.name for n in rank_nodes(nodes)] == ["g", "e", "d", "c", "b", "f", "a"]


def test_tied_scores_keep_the_networks_order_under_the_regions_cap():
    from instsearch.structures import Regions

    scores = torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    regions = Regions(boxes=torch.arange(18.0)[:, None].repeat(1, 4), scores=scores)
    assert regions.top_k(5).boxes[:, 0].tolist() == [0.0, 1.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("mirrored", [False, True])
def test_claid_regions_come_in_rank_order(mirrored):
    image, boxes, _ = planted_image()
    if mirrored:  # upside down, the L comes first in raster order, and so first in the hierarchy
        image = image.flip(-2)
        boxes = {k: [b[0], 96 - b[3], b[2], 96 - b[1]] for k, b in boxes.items()}
    with torch.no_grad():
        (regions,) = colour_claid().detect_regions([image])
    # both objects have xi = 1 at level 1: the larger (red, 30 patches) before the L (24 patches)
    assert regions.boxes.tolist() == [[float(v) for v in boxes["red"]], [float(v) for v in boxes["green"]]]


def test_decomposition_rules_reach_the_decomposition():
    """Two halves of close colours: every patch affine to every other (c = 1), so the paper's rule
    leaves the root uncut (the whole frame, by the fallback) and the public code's cut_root splits it;
    the brighter left half holds the whole high-energy set, the right half is a dummy."""
    image = torch.zeros(3, 64, 96)
    image[:, :, :48] = torch.tensor([1.0, 0.3, 0.0])[:, None, None]
    image[:, :, 48:] = torch.tensor([0.9, 0.0, 0.2])[:, None, None]
    with torch.no_grad():
        (paper,) = colour_claid(min_size=64).detect_regions([image])
        (public,) = colour_claid(min_size=64, decomposition_rules={"cut_root": True}).detect_regions([image])
    assert paper.boxes.tolist() == [[0.0, 0.0, 96.0, 64.0]]
    assert public.boxes.tolist() == [[0.0, 0.0, 48.0, 64.0]]
    with pytest.raises(ValueError, match=r"unknown decomposition_rules \['cut_roots'\]"):
        colour_claid(decomposition_rules={"cut_roots": True})
    with pytest.raises(ValueError, match=r"\['tau1'\] are CLAID arguments of their own"):
        colour_claid(decomposition_rules={"tau1": 0.9})


def test_claid_public_config_sets_the_public_codes_choices():
    """configs/claid_public.yaml, value by value, against the public code (CALID/detector.py,
    descriptor.py at 8a2fd4c): a drifted value fails here."""
    from config_runs import CONFIGS, load_config

    config = load_config(CONFIGS / "claid_public.yaml")
    net = config["model"]["init_args"]["net"]["init_args"]
    public = dict(patch_backbone="vit_base_patch8_224.dino", min_size=360, max_size=800, resize="public",
                  describe_backbone="resnet50", describe_layer="conv5.1", pooling="gem", gem_p=3.0, tau1=0.97,
                  tau2=0.1, alpha=0.2, energy_top=0.3, min_patches=15, seed_selection=True, method="ksums",
                  solver="sequential", max_iters=501,
                  decomposition_rules=dict(seed_rule="public", move_rule="public", cut_root=True,
                                           connectivity_diagonal=True, energy_rule="public"))
    assert {k: net[k] for k in public} == public
    assert config["data"]["init_args"]["max_side"] is None
