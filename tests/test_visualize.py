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
