"""`instsearch claid-figure`: one panel per depth of CLAID's hierarchy with the dummy nodes grey and
hatched, the kept regions' boxes where their patches are, and the command's options and errors.
"The public code" is the authors' CLAID code
(https://github.com/wlzhao22/CLAID, commit 8a2fd4c41c3d04b0a45c4703faf806ce85e13ba7)."""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from colour_patches import ColourPatches

from instsearch.claid_figure import claid_options, hierarchy_figure
from instsearch.cli import main
from instsearch.eval.visualize import DUMMY_GREY, HATCH, HATCH_PERIOD, HEADER, PALETTE
from instsearch.networks.claid import CLAID

REPO = Path(__file__).resolve().parents[1]
BACKGROUND = (0, 0, 76)  # low l1 norm: outside the high-energy set, a dummy
RED, GREEN = (255, 0, 0), (0, 255, 0)
PANEL = 128  # = the images' width: the panels show the image's own pixels


def colour_net() -> CLAID:
    torch.manual_seed(0)
    return CLAID(patch_backbone=ColourPatches(), describe_backbone="small", describe_layer="conv3", min_size=96,
                 max_size=400).eval()


def picture(blocks: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]]) -> Image.Image:
    """A 128 x 96 dark image with coloured ``(x1, y1, x2, y2)`` blocks (on the 8 px patch lattice)."""
    pixels = np.empty((96, 128, 3), np.uint8)
    pixels[:] = BACKGROUND
    for (x1, y1, x2, y2), colour in blocks:
        pixels[y1:y2, x1:x2] = colour
    return Image.fromarray(pixels)


def panels(figure: Image.Image) -> tuple[int, int]:
    """The number of ``PANEL``-wide panels of a figure (4 px apart) and the top of the panels'
    image area (below the title lines and headings)."""
    count, rest = divmod(figure.width - 4, PANEL + 4)
    assert rest == 0
    return count, figure.height - 96 - 4


def panel_pixels(figure: Image.Image, index: int) -> np.ndarray:
    count, top = panels(figure)
    x = 4 + index * (PANEL + 4)
    return np.asarray(figure).astype(int)[top:top + 96, x:x + PANEL]


def test_one_panel_per_depth_and_the_dummy_drawn_grey_and_hatched():
    # a red block with a green block attached: depth 1 = the background (a dummy) and the object,
    # depth 2 = the red and the green block
    image = picture([((16, 16, 56, 64), RED), ((56, 32, 88, 64), GREEN)])
    figure, summary = hierarchy_figure(colour_net(), image, panel=PANEL)
    assert panels(figure)[0] == 4  # the image, depth 1, depth 2, the kept regions
    assert "2 levels, 4 nodes below the root (1 dummy), 3 kept regions" in summary
    np.testing.assert_array_equal(panel_pixels(figure, 0), np.asarray(image))  # the image as it is

    depth1 = panel_pixels(figure, 1)
    # the background node, below the object and clear of its dashed box on the image's border:
    # desaturated to grey (r = g = b), hatched every HATCH_PERIOD pixels along the diagonal
    block = depth1[70:92, 4:124]
    ys, xs = np.mgrid[70:92, 4:124]
    on_hatch = (xs + ys) % HATCH_PERIOD < 2
    grey = round(0.5 * (0.114 * BACKGROUND[2]) + 0.5 * DUMMY_GREY[0])
    assert (block[on_hatch] == HATCH).all()
    assert (block[~on_hatch] == grey).all()
    # its box is the whole frame, dashed: 5 px on, 5 px off along the top row
    assert (depth1[0, 10:15] == HATCH).all() and (depth1[0, 5:8] == grey).all()
    # the object (not a dummy) is tinted in the first palette colour, halfway
    np.testing.assert_allclose(depth1[40, 30], (np.array(RED) + PALETTE[0]) / 2, atol=1)
    np.testing.assert_allclose(depth1[50, 70], (np.array(GREEN) + PALETTE[0]) / 2, atol=1)
    # depth 2: red and green each in their own colour; the background is not a node there
    depth2 = panel_pixels(figure, 2)
    tints = {tuple(depth2[40, 30]), tuple(depth2[50, 70])}
    assert len(tints) == 2 and all(len(set(t)) > 1 for t in tints)
    assert depth2[80, 60].tolist() == list(BACKGROUND)


def test_kept_regions_are_boxed_at_their_patches():
    # a red rectangle and a green L, apart: both kept, the background a dummy
    image = picture([((16, 16, 56, 64), RED), ((72, 40, 96, 88), GREEN), ((96, 72, 120, 88), GREEN)])
    figure, summary = hierarchy_figure(colour_net(), image, panel=PANEL)
    count, _ = panels(figure)
    assert count == 3 and "1 level, 3 nodes below the root (1 dummy), 2 kept regions" in summary
    kept = panel_pixels(figure, 2)
    colours = {tuple(PALETTE[0]), tuple(PALETTE[1])}
    # each box's 2 px outline on its first / last patch's outer pixels, clear of the labels (top left)
    for x1, y1, x2, y2 in ((16, 16, 56, 64), (72, 40, 120, 88)):
        left = kept[y1 + 18:y2, x1:x1 + 2].reshape(-1, 3)
        colour = tuple(left[0])
        assert colour in colours
        colours.discard(colour)
        assert (left == colour).all()
        assert (kept[y1 + 18:y2, x2 - 2:x2] == colour).all()  # right edge
        assert (kept[y2 - 2:y2, x1:x2] == colour).all()  # bottom edge
        assert (kept[y1 + 18:y2, x1 - 1] == BACKGROUND).all()  # nothing drawn outside the box
        assert (kept[y1 + 18:y2, x2] == BACKGROUND).all()
    assert (kept[50, 30] == RED).all()  # the kept panel shows the image untinted


def write_config(path: Path, **net) -> Path:
    options = dict(patch_backbone="small", patch_layer="conv3", patch_weights=None, describe_backbone="small",
                   describe_layer="conv3", describe_weights=None, min_size=64, max_size=128, tau1=0.97, tau2=0.2,
                   alpha=0.5, max_depth=None)
    options.update(net)
    config = {"seed_everything": 0,
              "model": {"class_path": "instsearch.lightning_modules.training_free.TrainingFreeModule",
                        "init_args": {"net": {"class_path": "instsearch.networks.claid.CLAID",
                                              "init_args": options}}}}
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_writes_the_figure_with_the_config_and_its_overrides(tmp_path, capsys):
    image = tmp_path / "planted.png"
    picture([((16, 16, 56, 64), RED), ((72, 40, 120, 88), GREEN)]).save(image)
    config = write_config(tmp_path / "claid.yaml")
    out = tmp_path / "figs" / "claid.png"
    assert main(["claid-figure", str(image), "--out", str(out), "--config", str(config), "--tau2", "0.3",
                 "--alpha", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert "tau1 0.97 tau2 0.3 alpha 0.9:" in printed and "kept region" in printed  # config value + overrides
    with Image.open(out) as figure:
        assert figure.format == "PNG"
        assert (figure.width - 4) % (256 + 4) == 0 and (figure.width - 4) // (256 + 4) >= 3
        assert figure.height > 256 * 96 // 128 + 2 * HEADER


def test_cli_errors_name_the_file(tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    config = write_config(tmp_path / "claid.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["claid-figure", str(broken), "--out", str(tmp_path / "f.png"), "--config", str(config)])
    assert exit_.value.code == 2 and str(broken) in capsys.readouterr().err
    image = tmp_path / "planted.png"
    picture([]).save(image)
    missing = tmp_path / "nowhere.yaml"
    with pytest.raises(SystemExit) as exit_:
        main(["claid-figure", str(image), "--out", str(tmp_path / "f.png"), "--config", str(missing)])
    assert exit_.value.code == 2 and str(missing) in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  class_path: x\n")
    with pytest.raises(SystemExit) as exit_:
        main(["claid-figure", str(image), "--out", str(tmp_path / "f.png"), "--config", str(other)])
    assert exit_.value.code == 2 and str(other) in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("claid_*.yaml")))
def test_shipped_configs_give_claid_arguments(name):
    options, seed, max_side = claid_options(REPO / "configs" / name)
    inspect.signature(CLAID).bind(**options)  # every key is an argument of CLAID
    assert None not in options.values() and {"tau1", "tau2", "alpha"} <= set(options) and seed == 0
    # the figure shrinks an image as `instsearch test` serves it: the public code reads the file as it is
    assert max_side == {"claid_synthetic.yaml": None, "claid_public.yaml": None}.get(name, 1000)


def test_the_figure_shrinks_the_image_to_the_configs_max_side(tmp_path, monkeypatch):
    from instsearch.cli import main

    seen = []
    hierarchy = CLAID.hierarchy
    monkeypatch.setattr(CLAID, "hierarchy", lambda self, image: seen.append(tuple(image.shape[-2:]))
                        or hierarchy(self, image))
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  init_args:\n    net:\n      init_args: {patch_backbone: small, patch_layer: conv3, "
                      "describe_backbone: small, describe_layer: conv3, min_size: 64, max_size: 64}\n"
                      "data:\n  init_args: {max_side: 50}\n")
    image = tmp_path / "i.png"
    Image.new("RGB", (100, 80), (200, 30, 30)).save(image)
    assert main(["claid-figure", str(image), "--out", str(tmp_path / "a.png"), "--config", str(config)]) == 0
    assert main(["claid-figure", str(image), "--out", str(tmp_path / "b.png"), "--config", str(config),
                 "--max-side", "80"]) == 0
    assert seen == [(40, 50), (64, 80)]
