"""``instsearch dasr-figure``: DASR's picture of one image (the DASR paper's Fig. 3).

    instsearch dasr-figure IMAGE --out fig.png [--star] [--backbone resnet50 --weights W.pth]

``X̄`` with its peaks, the kept regions' peak response maps with their ellipses, and every
ellipse and box (:func:`~instsearch.eval.visualize.salient_region_figure`).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from instsearch.networks.dasr import DASR

__all__ = ["dasr_figure", "figure_main"]


def dasr_figure(net: DASR, image: Tensor, max_maps: int = 7, panel: int = 192):
    """The figure of one ``(3, H, W)`` image in ``[0, 1]`` as a PIL image (``net`` in eval mode)."""
    from PIL import Image

    from instsearch.eval.visualize import salient_region_figure

    with torch.no_grad():
        det = net.explain(image, keep_maps=True)
        shown = F.interpolate(image[None].float(), size=det.size, mode="bilinear", align_corners=False,
                              antialias=True)[0]
    rgb = Image.fromarray((shown.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
    k = det.kept
    return salient_region_figure(rgb, det.xbar, det.maps[k], det.centres[k], det.covs[k], det.boxes[k],
                                 peaks=det.peaks[k], ellipse_scale=net.ellipse_scale, max_maps=max_maps,
                                 panel=panel)


def figure_main(argv: Optional[list[str]] = None) -> int:
    """``instsearch dasr-figure IMAGE --out fig.png``: X̄, the peak response maps and the fitted
    ellipses / boxes of one image (the DASR paper's Fig. 3)."""
    from instsearch.datamodules.image_io import BadImageError, load_rgb
    from instsearch.datamodules.transforms import to_float_tensor

    p = argparse.ArgumentParser(prog="instsearch dasr-figure", description=figure_main.__doc__)
    p.add_argument("image", type=Path)
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--weights", default=None, help="ImageNet state dict or an instsearch checkpoint")
    p.add_argument("--star", action="store_true", help="DASR* instead of DASR")
    p.add_argument("--long-side", type=int, default=512)
    p.add_argument("--max-maps", type=int, default=7)
    a = p.parse_args(argv)
    try:
        image = load_rgb(a.image)
    except BadImageError as err:
        p.error(str(err))  # the file and what is wrong with it, no traceback
    net = DASR(a.backbone, weights=a.weights, star=a.star, long_side=a.long_side).eval()
    fig = dasr_figure(net, to_float_tensor(image), max_maps=a.max_maps)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.save(a.out)
    print(f"wrote {a.out}")
    return 0
