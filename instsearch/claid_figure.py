"""``instsearch claid-figure``: the picture of one image's CLAID decomposition, for tuning its
thresholds.

The CLAID paper's Algorithm 1 bisects an image's patch grid while a node's average internal
connectivity ``c(S)`` is below ``tau1`` (the affinity of Eq. 5 thresholded at ``alpha``), and marks a
node a dummy when its energy ratio ``xi(S)`` (Eq. 10) is at most ``tau2``. The figure shows the image,
every depth of the hierarchy with each node's ``c`` and ``xi`` (dummies grey and hatched), and the
regions the network keeps with their boxes and ``xi`` scores -- as the paper's Fig. 3 draws them.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image

NET_KEYS = ("model", "init_args", "net", "init_args")


def claid_options(config: Path) -> tuple[dict[str, Any], int, Optional[int]]:
    """The CLAID arguments of a config -- its ``model.init_args.net.init_args`` mapping, without the
    null values (a null leaves the network's default in place) --, its ``seed_everything`` (0 when
    unset) and the ``data.init_args.max_side`` its images are served at (None: as they are)."""
    from instsearch.config_files import load_config

    root: Any = load_config(config)
    node = root
    for key in NET_KEYS:
        if not isinstance(node, dict) or key not in node:
            raise ValueError(f"{config}: no {'.'.join(NET_KEYS)} mapping (a CLAID config has one)")
        node = node[key]
    node = node or {}
    if not isinstance(node, dict):
        raise ValueError(f"{config}: {'.'.join(NET_KEYS)} is not a mapping")
    seed = root.get("seed_everything")
    data = (root.get("data") or {}).get("init_args") or {}
    max_side = data.get("max_side") if isinstance(data, dict) else None
    return ({key: value for key, value in node.items() if value is not None}, seed if isinstance(seed, int) else 0,
            max_side if isinstance(max_side, int) else None)


def hierarchy_figure(net, image: Image.Image, panel: int = 256) -> tuple[Image.Image, str]:
    """The figure of ``image``'s decomposition by ``net`` (a :class:`~instsearch.networks.claid.CLAID`)
    and a one-line summary of it."""
    from instsearch.datamodules.transforms import to_float_tensor
    from instsearch.eval.visualize import region_hierarchy_figure

    with torch.no_grad():
        nodes = net.hierarchy(to_float_tensor(image))
    root, shown = nodes[0], nodes[1:]  # the root is the whole image, never a region
    grid_h, grid_w = root.mask.shape

    def in_pixels(which: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes and bool masks in the image's pixels, as CLAID.detect_regions maps its regions."""
        boxes, masks = net.nodes_in_pixels(which, image.height, image.width)
        return boxes, masks > 0.5

    boxes, masks = in_pixels(shown)
    labels = [f"D xi {n.energy_ratio:.2f}" if n.dummy else f"c {n.connectivity:.2f} xi {n.energy_ratio:.2f}"
              for n in shown]
    options = net.decomposition
    kept = net.kept_nodes(nodes)  # as CLAID.detect_regions returns them, in its order
    fallback = len(kept) == 1 and kept[0] is root
    kept_boxes, _ = in_pixels(kept)
    frame = net.patch_frame(image.height, image.width)
    resized = f"detector input {frame.resized[1]}x{frame.resized[0]} px"  # width x height, as the image's
    if (round(frame.covered[0]), round(frame.covered[1])) != (image.height, image.width):
        resized += f"; the grid covers the image's top-left {frame.covered[1]:.0f}x{frame.covered[0]:.0f} px"
    cut = "cut" if root.bisected else "not cut"
    criterion = (f"depth < max_depth {options['max_depth']}" if options["max_depth"] is not None
                 else "cut while c < tau1")
    title = (f"CLAID  tau1 {options['tau1']:g}  tau2 {options['tau2']:g}  alpha {options['alpha']:g}  "
             f"grid {grid_h} rows x {grid_w} columns of {net.patch_stride} px patches ({resized})  "
             f"root c {root.connectivity:.3f} ({cut})"
             f" | colour tint: a node, c = connectivity ({criterion}), xi = energy ratio"
             f" | grey hatched, dashed box, D: a dummy node (xi <= tau2)"
             f" | kept: output regions in CLAID's order{' (none: the whole-image fallback)' if fallback else ''}")
    figure = region_hierarchy_figure(
        image, masks, torch.tensor([n.level for n in shown], dtype=torch.long), boxes, panel=panel,
        dummies=torch.tensor([n.dummy for n in shown], dtype=torch.bool), labels=labels, show_image=True,
        kept_boxes=kept_boxes, kept_labels=[f"{k + 1}: xi {n.energy_ratio:.2f}" for k, n in enumerate(kept)],
        title=title)
    depth = max((n.level for n in shown), default=0)
    dummies = sum(n.dummy for n in shown)
    summary = (f"tau1 {options['tau1']:g} tau2 {options['tau2']:g} alpha {options['alpha']:g}: "
               f"{depth} level{'' if depth == 1 else 's'}, {len(shown)} nodes below the root ({dummies} "
               f"dumm{'y' if dummies == 1 else 'ies'}), {len(kept)} kept region{'' if len(kept) == 1 else 's'}"
               f"{' (whole-image fallback)' if fallback else ''}")
    return figure, summary


def figure_main(argv: Optional[list[str]] = None) -> int:
    """``instsearch claid-figure IMAGE --out fig.png``: one image's CLAID region hierarchy level by
    level (dummy nodes marked) and the regions kept, with tau1 / tau2 / alpha -- the picture to tune
    them by (the CLAID paper's Fig. 3)."""
    from instsearch.datamodules.benchmark import shrink_to_max_side
    from instsearch.datamodules.image_io import BadImageError, load_rgb
    from instsearch.networks.claid import CLAID
    from instsearch.seeding import seed_all

    p = argparse.ArgumentParser(prog="instsearch claid-figure", description=figure_main.__doc__)
    p.add_argument("image", type=Path)
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--config", type=Path, default=None,
                   help="a CLAID config (configs/claid_*.yaml): its model.init_args.net.init_args build the "
                        "network; without it, CLAID's defaults (DINO ViT-B/8 and ResNet-50)")
    p.add_argument("--patch-weights", default=None, help="the detector backbone's weights (overrides the config)")
    p.add_argument("--describe-weights", default=None, help="the descriptor backbone's weights (overrides the config)")
    p.add_argument("--tau1", type=float, default=None, help="connectivity threshold: cut while c(S) < tau1")
    p.add_argument("--tau2", type=float, default=None, help="dummy threshold: a dummy when xi(S) <= tau2")
    p.add_argument("--alpha", type=float, default=None, help="affinity threshold of Eq. 5")
    p.add_argument("--max-side", type=int, default=None,
                   help="shrink the image to this long side first, as `instsearch test` serves it (default: the "
                        "config's data.init_args.max_side)")
    p.add_argument("--panel", type=int, default=256, help="width of each panel in pixels")
    a = p.parse_args(argv)
    options: dict[str, Any] = {}
    seed, max_side = 0, None
    if a.config is not None:
        if not a.config.is_file():
            p.error(f"config {a.config}: no such file")
        try:
            options, seed, max_side = claid_options(a.config)
        except (ValueError, OSError) as err:
            p.error(str(err))
        except Exception as err:  # yaml.YAMLError and friends: say which file
            p.error(f"config {a.config}: {err}")
    for key in ("patch_weights", "describe_weights", "tau1", "tau2", "alpha"):
        if getattr(a, key) is not None:
            options[key] = getattr(a, key)
    try:
        image = load_rgb(a.image)
    except BadImageError as err:
        p.error(str(err))  # the file and what is wrong with it, no traceback
    image = shrink_to_max_side(image, a.max_side if a.max_side is not None else max_side)
    seed_all(seed)  # as `instsearch test --config` (seed_everything): a randomly initialised backbone is reproducible
    try:
        net = CLAID(**options).eval()
    except (TypeError, ValueError, FileNotFoundError) as err:
        p.error(f"cannot build CLAID{f' from {a.config}' if a.config else ''}: {err}")
    figure, summary = hierarchy_figure(net, image, panel=a.panel)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(a.out)
    print(f"wrote {a.out}")
    print(f"{a.image}: {summary}")
    return 0
