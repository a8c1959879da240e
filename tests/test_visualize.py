"""Region hierarchy figure: one panel per depth, tints inside regions only."""
import numpy as np
import pytest
import torch
from PIL import Image

from instsearch.eval.visualize import PALETTE, region_hierarchy_figure


def test_region_hierarchy_figure_panels_and_tints():
    image = Image.new("RGB", (40, 20), (100, 100, 100))
    masks = torch.zeros(3, 20, 40, dtype=torch.bool)
    masks[0, :, :20] = True  # level 1, left half
    masks[1, :, 20:] = True  # level 1, right half
    masks[2, 5:15, 5:15] = True  # level 2
    levels = torch.tensor([1, 1, 2])
    fig = region_hierarchy_figure(image, masks, levels, panel=40, alpha=0.5)
    assert fig.size == (2 * (40 + 4) + 4, 20 + 14 + 4)
    pix = np.asarray(fig).astype(int)
    header = 14
    # panel 1: left half tinted with the first colour, right half with the second, each halfway
    np.testing.assert_allclose(pix[header + 10, 4 + 10], np.round((np.array(PALETTE[0]) + 100) / 2), atol=1)
    np.testing.assert_allclose(pix[header + 10, 4 + 30], np.round((np.array(PALETTE[1]) + 100) / 2), atol=1)
    # panel 2: only the level-2 square is tinted; the rest of the image is unchanged
    x0 = 4 + 44
    np.testing.assert_allclose(pix[header + 10, x0 + 10], np.round((np.array(PALETTE[0]) + 100) / 2), atol=1)
    assert pix[header + 2, x0 + 30].tolist() == [100, 100, 100]
    with pytest.raises(ValueError, match="like the image"):
        region_hierarchy_figure(image, masks[:, :10], levels)


def test_metric_curves_figure_draws_each_series_where_its_values_are():
    from instsearch.eval.visualize import GREY, SERIES_COLOURS, metric_curves_figure

    img = metric_curves_figure({"UDQ": [0.20, 0.25, 0.30]}, {"OPQ": 0.25}, size=(400, 300))
    assert img.size == (400, 300)
    pixels = np.asarray(img)[:, : 400 - 180]  # the plot area (the legend is on the right)
    ys, xs = np.nonzero((pixels == SERIES_COLOURS[0]).all(axis=2))
    # the series rises left to right: its leftmost pixels sit lower (larger y) than its rightmost
    assert ys[xs == xs.min()].mean() > ys[xs == xs.max()].mean()
    # the reference line is horizontal at the middle value, which the series crosses
    ref_rows = np.unique(np.nonzero((pixels == GREY).all(axis=2))[0])
    middle = ys[np.abs(xs - (xs.min() + xs.max()) / 2) <= 1].mean()
    assert np.abs(ref_rows - middle).min() <= 2
    with pytest.raises(ValueError, match="at least one value"):
        metric_curves_figure({})


def test_region_hierarchy_figure_dummies_image_and_kept_panels():
    from instsearch.eval.visualize import DUMMY_GREY, HATCH, HATCH_PERIOD, HEADER

    image = Image.new("RGB", (40, 20), (100, 100, 100))
    masks = torch.zeros(2, 20, 40, dtype=torch.bool)
    masks[0, :, :20] = True  # a dummy
    masks[1, :, 20:] = True
    levels, dummies = torch.tensor([1, 1]), torch.tensor([True, False])
    fig = region_hierarchy_figure(image, masks, levels, panel=40, dummies=dummies, show_image=True,
                                  kept_boxes=torch.tensor([[20.0, 0.0, 40.0, 20.0]]), title="a title")
    assert fig.size == (3 * (40 + 4) + 4, HEADER + 20 + 14 + 4)  # image, depth 1, kept; one title line
    pix = np.asarray(fig).astype(int)[2 * HEADER:2 * HEADER + 20]
    assert (pix[:, 4:44] == 100).all()  # the image untouched
    hierarchy = pix[:, 48:88]
    ys, xs = np.mgrid[:20, :20]
    hatch = (xs + ys) % HATCH_PERIOD < 2
    assert (hierarchy[:, :20][hatch] == HATCH).all()  # the dummy: grey and hatched, not a colour
    assert (hierarchy[:, :20][~hatch] == round(0.5 * 100 + 0.5 * DUMMY_GREY[0])).all()
    np.testing.assert_allclose(hierarchy[10, 30], np.round((np.array(PALETTE[0]) + 100) / 2), atol=1)
    kept = pix[:, 92:132]
    assert (kept[:, 20:22] == PALETTE[0]).all() and (kept[:, 38:40] == PALETTE[0]).all()
    assert (kept[5:15, 5:15] == 100).all()
    with pytest.raises(ValueError, match="dummy flags"):
        region_hierarchy_figure(image, masks, levels, dummies=dummies[:1])
    with pytest.raises(ValueError, match="labels need boxes"):
        region_hierarchy_figure(image, masks, levels, labels=["a", "b"])
