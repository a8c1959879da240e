"""Time of the CLAID region decomposition per image: batched k-sums against the per-patch loop.

Both runs decompose identical feature sets with :func:`instsearch.networks.bisecting.build_hierarchy`
and differ only in the k-sums solver: ``solver="batched"`` (prefix moves in closed form on the
image's Gram matrix) and ``solver="sequential"`` (the CLAID paper's Eq. 2-4, one patch at a time in
random order). The feature sets are 45x60 grids of 768-D features, the patch grid and width of DINO
ViT-B/8 on a 360x480 image, with a planted three-level region hierarchy: objects made of parts,
some parts made of sub-parts, each block a shared direction plus noise, on a two-part low-energy
background. Reported per solver: median and best seconds per image, regions and cuts (bisected
nodes, Table V's "#cut") per image; then the speed ratio and how well the two outputs agree (for
each region of one run the best IoU in the other, its mean, and the share matched at IoU >= 0.9),
and the image's float32 Gram matrix on the same threads - as the decomposition computes it
(``bisecting._gram``) and as one ``x @ x.T`` - with the batched run's time as a multiple of it.
``--profile`` breaks both runs down (Gram matrix, packed affinity, bisections, connected components,
level degrees, the rest) and gives the bisections-only ratio.

The CLAID paper times one CPU thread (Table V), hence ``--threads 1`` by default.

``--vit-weights PATH`` adds real DINO ViT-B/8 patch tokens (timm ``vit_base_patch8_224.dino``
loaded from that local file; ``--image`` picks the picture, a random one otherwise). It runs only
when the file is given (docs/claid.md says which rows were measured with real tokens).

    python benchmarks/claid_bisect.py --images 5 --out runs/claid_bisect.json

**Agreement with the public code** (``--reference DIR``). ``DIR`` is a checkout of the authors'
code (https://github.com/wlzhao22/CLAID, ``CALID/detector.py``; measured at commit
8a2fd4c41c3d04b0a45c4703faf806ce85e13ba7), fetched by the user. Its module is imported at run time
from there (``sys.path``; nothing of it is copied): the imports its module top needs but
``k_sum_main`` does not (sklearn, networkx, matplotlib when missing; ``vit_feature`` always, it loads
a model from torch hub) are stubbed in ``sys.modules``, its ``CLAID`` object is made with ``__new__``
(its ``__init__`` loads DINO from torch hub), ``img`` and ``patch_size`` are set and
``updata_total_param(tokens)`` / ``k_sum_main("aim")`` run on each grid, python's ``random`` seeded
with ``--seed`` before each image. The same grids go through :func:`build_hierarchy` with every
rule set to the public code's (``PUBLIC_RULES``: seed_rule, move_rule, energy_rule "public",
max_iters 500, cut_root, connectivity_diagonal, tau2 0.1), with the sequential solver (the public
k-sums is a per-patch loop in random order; the orders differ, python's ``random`` there, a torch
generator here) and with the batched one, and once more with the paper's defaults. Reported per
configuration: the share of regions of one side with an identical region (IoU 1.0) / one at IoU >=
0.9 on the other side, in both directions, the share of images whose region sets are identical,
regions per image, and seconds per image next to the image's float32 Gram matrix (torch ``x @ x^T``
and numpy's, the product the public code computes) on the same threads. The grids are the planted
45x60x768 ones and the DINO ViT-B/8 tokens (timm ``vit_base_patch8_224.dino``, randomly initialised
unless ``--vit-weights`` is given: the output says which) of the JPEGs in ``--photos`` (default
``DIR/CALID/data/images``), resized as ``get_input_var`` does (short side 360, long side <= 800, for
images whose short side exceeds 355; cropped to whole patches).

``--threads 1,2`` measures at each thread count in a fresh process, so that numpy's BLAS threads
are set (``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` / ``MKL_NUM_THREADS``) before numpy is
imported; torch's with ``torch.set_num_threads``.

    python benchmarks/claid_bisect.py --reference /tmp/claid_public --threads 1,2 --images 3 \
        --out runs/claid_reference.json
"""
from __future__ import annotations

import os
import sys


def _single_thread_count(argv: list[str]) -> int | None:
    """``--threads N`` (one count) from the command line, read before numpy is imported."""
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--threads=") else None)
        if value is not None:
            value = value.strip()
            if value == "all":
                return os.cpu_count() or 1
            return int(value) if value.isdigit() else None
    return None


_THREADS = _single_thread_count(sys.argv[1:])
if _THREADS is not None:  # numpy's BLAS reads these once, when it is first imported
    for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = str(_THREADS)

import argparse  # noqa: E402
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterator, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from timing import best_of  # noqa: E402

from instsearch.networks import bisecting
from instsearch.networks.bisecting import RegionNode, build_hierarchy, output_nodes

# (row0, row1, col0, col1) on the 45x60 grid; parts and sub-parts lie inside their parent
OBJECTS = [
    {"box": (4, 22, 3, 27), "parts": [
        {"box": (4, 22, 3, 14), "parts": [(4, 12, 3, 14), (12, 22, 3, 14)]},
        {"box": (4, 22, 14, 27), "parts": []},
    ]},
    {"box": (6, 30, 33, 57), "parts": [
        {"box": (6, 16, 33, 57), "parts": []},
        {"box": (16, 30, 33, 57), "parts": [(16, 30, 33, 45), (16, 30, 45, 57)]},
    ]},
    {"box": (28, 41, 6, 28), "parts": [
        {"box": (28, 41, 6, 17), "parts": []},
        {"box": (28, 41, 17, 28), "parts": []},
    ]},
]
BACKGROUND_SPLIT = 24  # rows above: "sky", below: "ground", both low energy


def planted_grid(seed: int, height: int = 45, width: int = 60, dim: int = 768,
                 noise: float = 0.018) -> tuple[Tensor, list[tuple[int, int, int, int]]]:
    """One image's features and the boxes of its planted regions (objects, parts, sub-parts).

    A block's direction mixes its ancestors' directions with its own (object 1, part 0.4/0.917,
    sub-part 0.25/0.35/0.9 before normalising), so siblings are close to each other yet below the
    Eq. 5 affinity threshold (dot ~0.16-0.19 < 0.2): the terminate condition has something to cut at
    every level. Objects have l1 energy 2-3x the background's, so the background nodes are dummies.
    """
    g = torch.Generator().manual_seed(seed)
    directions = iter(F.normalize(torch.randn(64, dim, generator=g), dim=1))
    feats = torch.empty(height, width, dim)

    def fill(box: tuple[int, int, int, int], direction: Tensor, norm: float) -> None:
        r0, r1, c0, c1 = box
        n = torch.randn(r1 - r0, c1 - c0, dim, generator=g) * noise
        scale = norm * (1 + 0.1 * torch.rand(r1 - r0, c1 - c0, 1, generator=g))
        feats[r0:r1, c0:c1] = F.normalize(direction + n, dim=-1) * scale

    sky = next(directions)
    fill((0, BACKGROUND_SPLIT, 0, width), sky, 1.0)
    fill((BACKGROUND_SPLIT, height, 0, width), 0.6 * sky + 0.8 * next(directions), 1.2)
    boxes = []
    for obj in OBJECTS:
        u_obj = next(directions)
        boxes.append(obj["box"])
        for part in obj["parts"]:
            u_part = next(directions)
            boxes.append(part["box"])
            fill(part["box"], 0.4 * u_obj + 0.917 * u_part, 3.0)
            for sub in part["parts"]:
                boxes.append(sub)
                fill(sub, 0.25 * u_obj + 0.35 * u_part + 0.9 * next(directions), 3.0)
    return feats, boxes


def vit_grid(weights: Path, image: Optional[Path], seed: int) -> Tensor:
    """DINO ViT-B/8 patch tokens ``(h, w, 768)`` of a 360x480 picture (the given one, or noise)."""
    import timm

    model = timm.create_model("vit_base_patch8_224.dino", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights)), dynamic_img_size=True).eval()
    if image is not None:
        from PIL import Image

        picture = Image.open(image).convert("RGB").resize((480, 360))
        pixels = torch.frombuffer(bytearray(picture.tobytes()), dtype=torch.uint8).reshape(360, 480, 3)
        pixels = pixels.permute(2, 0, 1).float() / 255
    else:
        pixels = torch.rand(3, 360, 480, generator=torch.Generator().manual_seed(seed))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        tokens = model.forward_features(((pixels - mean) / std)[None])[0, model.num_prefix_tokens:]
    return tokens.reshape(360 // 8, 480 // 8, -1)


def best_iou(a: Tensor, b: Tensor) -> Tensor:
    """For each mask of ``a (R, h, w)`` the best IoU with a mask of ``b``; 0 when ``b`` is empty."""
    if a.shape[0] == 0:
        return torch.zeros(0)
    if b.shape[0] == 0:
        return torch.zeros(a.shape[0])
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return (inter / union).amax(1)


def output_masks(nodes: list[RegionNode], filter_dummy: bool = True) -> Tensor:
    kept = [n.mask for n in output_nodes(nodes, filter_dummy)]
    return torch.stack(kept) if kept else torch.zeros(0, *nodes[0].mask.shape, dtype=torch.bool)


def time_solver(grids: list[Tensor], solver: str, repeats: int) -> tuple[list[float], list[list[RegionNode]]]:
    """Per image the best of ``repeats`` runs, and the hierarchy of the last run."""
    seconds, hierarchies = [], []
    for grid in grids:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            nodes = build_hierarchy(grid, solver=solver, generator=torch.Generator().manual_seed(0))
            best = min(best, time.perf_counter() - start)
        seconds.append(best)
        hierarchies.append(nodes)
    return seconds, hierarchies


@contextmanager
def timed(totals: dict[str, float], name: str, function: str, owner: Any = bisecting) -> Iterator[None]:
    """Wrap ``owner.<function>`` (a function of ``bisecting`` by default) so its time is added to
    ``totals[name]``."""
    original = getattr(owner, function)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start

    setattr(owner, function, wrapper)
    try:
        yield
    finally:
        setattr(owner, function, original)


def gram_seconds(grid: Tensor, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of the image's float32 Gram matrix: as the decomposition computes
    it (``bisecting._gram``, the triangle and its mirror) and as one ``x @ x.T``."""
    x = F.normalize(grid.reshape(-1, grid.shape[-1]).float(), dim=1)
    return {"gram (bisecting._gram)": best_of(lambda: bisecting._gram(x), repeats),
            "gram (x @ x.T)": best_of(lambda: x @ x.T, repeats)}


def profile(grids: list[Tensor], solver: str = "batched") -> dict[str, float]:
    """Seconds per image of one solver's run spent in the Gram matrix (measured alone), the packed
    affinity, the bisections (k-sums / NCut), connected components, the level degrees, and the rest."""
    gram = [gram_seconds(grid, 3)["gram (bisecting._gram)"] for grid in grids]
    totals: dict[str, float] = {}
    with timed(totals, "bisections (k-sums)", "_bisect_node"), \
            timed(totals, "components", "connected_components"), \
            timed(totals, "packed affinity", "__init__", bisecting._Affinity), \
            timed(totals, "level degrees (popcount)", "degrees", bisecting._Affinity):
        start = time.perf_counter()
        for grid in grids:
            build_hierarchy(grid, solver=solver, generator=torch.Generator().manual_seed(0))
        total = time.perf_counter() - start
    out = {"total": total / len(grids), "gram": sum(gram) / len(grids)}
    out.update({k: v / len(grids) for k, v in totals.items()})
    out["rest (energy, normalisation, bookkeeping)"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    return out


# ----------------------------------------------------------------------------- the public code
#: every decomposition rule set to the public code's (``CALID/detector.py``: ``k_sum_main``, ``ksum_Is``,
#: ``updata_total_param``); see networks/bisecting.py for each
PUBLIC_RULES = dict(seed_rule="public", move_rule="public", energy_rule="public", max_iters=500, cut_root=True,
                    connectivity_diagonal=True, tau2=0.1)


class _Stub(types.ModuleType):
    """A stand-in module: any attribute is a function that refuses to run."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError(f"{self.__name__}.{name} is stubbed out by benchmarks/claid_bisect.py")

        return refuse


def _stub(name: str, always: bool = False) -> None:
    """Put ``name`` (and its parent packages) in ``sys.modules`` as a stub when it cannot be imported."""
    if not always:
        try:
            importlib.import_module(name)
            return
        except Exception:  # noqa: BLE001 - missing, or broken on this machine: either way not needed
            pass
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules or always:
            stub = sys.modules[sub] = _Stub(sub)
            stub.__path__ = []  # a package, so submodules resolve
            stub.__spec__ = importlib.machinery.ModuleSpec(sub, None, is_package=True)  # find_spec asks for it


def load_reference(directory: Path) -> types.ModuleType:
    """Import the public ``detector.py`` from ``directory`` (or its ``CALID/``) without running model code."""
    folder = directory / "CALID" if (directory / "CALID" / "detector.py").exists() else directory
    path = folder / "detector.py"
    if not path.exists():
        raise SystemExit(f"--reference: no detector.py under {directory}")
    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in ("sklearn.metrics.pairwise", "sklearn.datasets", "networkx", "matplotlib.pyplot", "tqdm"):
        _stub(name)
    _stub("vit_feature", always=True)  # loads DINO from torch hub; k_sum_main does not use it
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("claid_public_detector", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_regions(module: types.ModuleType, grid: Tensor, seed: int, timeout_s: int) -> tuple[Tensor, float]:
    """The public code's regions of an ``(h, w, D)`` token grid and its seconds (``updata_total_param``,
    which computes the Gram matrix, plus ``k_sum_main``), or ``(None, seconds)`` after ``timeout_s``."""
    h, w, dim = grid.shape
    claid = module.CLAID.__new__(module.CLAID)  # __init__ would load DINO from torch hub
    claid.patch_size = 8
    claid.img = torch.empty(3, h * claid.patch_size, w * claid.patch_size)
    random.seed(seed)

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(timeout_s)
    start = time.perf_counter()
    try:
        claid.updata_total_param(grid.reshape(h * w, dim).float())
        levels, _ = claid.k_sum_main("aim")
    except TimeoutError:
        return None, time.perf_counter() - start
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - start
    masks = [torch.from_numpy(np.asarray(m) > 0) for level in levels for m in level]
    return (torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool)), seconds


def photo_grids(folder: Path, weights: Optional[Path], limit: int) -> tuple[list[Tensor], list[str], str]:
    """DINO ViT-B/8 tokens of the JPEGs in ``folder``, each resized as the public ``get_input_var``
    does: torchvision ``Resize(360, max_size=800)`` when the short side exceeds 355, then the bottom
    and right edges cropped to whole 8-pixel patches."""
    import timm
    from PIL import Image
    from torchvision.transforms import functional as TF

    torch.manual_seed(0)
    if weights is not None:
        model = timm.create_model("vit_base_patch8_224.dino", pretrained=True, dynamic_img_size=True,
                                  pretrained_cfg_overlay=dict(file=str(weights)))
        source = f"DINO ViT-B/8 weights from {weights}"
    else:
        model = timm.create_model("vit_base_patch8_224.dino", pretrained=False, dynamic_img_size=True)
        source = "vit_base_patch8_224.dino RANDOMLY INITIALISED (torch seed 0; no --vit-weights)"
    model.eval()
    grids, names = [], []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for path in files[:limit] if limit > 0 else files:
        picture = Image.open(path).convert("RGB")
        if min(picture.size) > 355:
            picture = TF.resize(picture, 360, max_size=800)
        pixels = TF.normalize(TF.to_tensor(picture), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        height, width = pixels.shape[1] // 8 * 8, pixels.shape[2] // 8 * 8
        with torch.no_grad():
            tokens = model.forward_features(pixels[None, :, :height, :width])[0, model.num_prefix_tokens:]
        grids.append(tokens.reshape(height // 8, width // 8, -1).contiguous())
        names.append(path.name)
    return grids, names, source


def agreement(ours: list[Tensor], theirs: list[Optional[Tensor]]) -> dict[str, float]:
    """How the region sets of two runs over the same images agree: for each region of one side its
    best IoU on the other side, shares at 1.0 and >= 0.9 in both directions, and identical sets."""
    a_to_b, b_to_a, identical, images = [], [], 0, 0
    for mine, other in zip(ours, theirs):
        if other is None:
            continue
        images += 1
        forward, backward = best_iou(mine, other), best_iou(other, mine)
        a_to_b.append(forward)
        b_to_a.append(backward)
        identical += int(mine.shape[0] == other.shape[0] and bool((forward == 1).all()) and bool((backward == 1).all()))
    fa = torch.cat(a_to_b) if a_to_b else torch.zeros(0)
    fb = torch.cat(b_to_a) if b_to_a else torch.zeros(0)

    def share(x: Tensor, at: float) -> float:
        return float((x >= at).float().mean()) if x.numel() else float("nan")

    return {"ours matched at IoU 1.0": share(fa, 1.0), "ours matched at IoU >= 0.9": share(fa, 0.9),
            "public matched at IoU 1.0": share(fb, 1.0), "public matched at IoU >= 0.9": share(fb, 0.9),
            "images with identical region sets": identical / images if images else float("nan"),
            "images compared": images}


def seed_ties(grid: Tensor, hierarchies: list[RegionNode], alpha: float = 0.2) -> dict[str, int]:
    """How many bisections of a hierarchy had several features of the highest (lowest) degree: where
    the seed tie rule decides. (The public code picks among them by numpy's ``argsort``, which is not
    stable; its degree sums of tied features are equal floats, so the choice is the sort's.)"""
    x = F.normalize(grid.reshape(-1, grid.shape[-1]).float(), dim=1)
    cuts = tied_b = tied_w = 0
    for node in hierarchies:
        if not node.bisected:
            continue
        index = node.mask.flatten().nonzero().squeeze(1)
        degree = ((x[index] @ x[index].T) > alpha).sum(1)
        cuts += 1
        tied_b += int((degree == degree.max()).sum() > 1)
        tied_w += int((degree == degree.min()).sum() > 1)
    return {"bisections": cuts, "tied highest degree": tied_b, "tied lowest degree": tied_w}


def measure_reference(grids: list[Tensor], module: types.ModuleType, threads: int, seed: int, repeats: int,
                      timeout_s: int) -> dict[str, Any]:
    """One thread count: every configuration on every grid, times and agreement with the public code."""
    torch.set_num_threads(threads)
    build_hierarchy(grids[0], solver="batched")  # warm-up (allocator, BLAS)
    configs = {"ours, public rules, sequential": dict(PUBLIC_RULES, solver="sequential"),
               "ours, public rules, batched": dict(PUBLIC_RULES, solver="batched"),
               "ours, paper defaults, batched": dict(solver="batched")}
    out: dict[str, Any] = {"threads": threads, "numpy BLAS threads (env)": os.environ.get("OPENBLAS_NUM_THREADS")}
    gram_torch, gram_numpy = [], []
    for grid in grids:
        x = F.normalize(grid.reshape(-1, grid.shape[-1]).float(), dim=1)
        xn = x.numpy()
        gram_torch.append(best_of(lambda: x @ x.T, max(repeats, 3)))
        gram_numpy.append(best_of(lambda: xn @ xn.T, max(repeats, 3)))
    out["gram float32 torch s/image"] = statistics.median(gram_torch)
    out["gram float32 numpy s/image"] = statistics.median(gram_numpy)
    theirs, their_seconds = [], []
    for grid in grids:
        regions, seconds = reference_regions(module, grid, seed, timeout_s)
        theirs.append(regions)
        their_seconds.append(seconds)
    out["public k_sum_main"] = {
        "s/image (median)": statistics.median(their_seconds),
        "x gram (torch)": statistics.median(their_seconds) / out["gram float32 torch s/image"],
        "regions/image": (sum(r.shape[0] for r in theirs if r is not None) / max(1, sum(r is not None for r in theirs))),
        "timed out": sum(r is None for r in theirs)}
    for name, options in configs.items():
        seconds, regions, ties = [], [], {}
        runs = 1 if options["solver"] == "sequential" else repeats
        for grid in grids:
            holder: list[list[RegionNode]] = []
            seconds.append(best_of(lambda: holder.append(
                build_hierarchy(grid, generator=torch.Generator().manual_seed(seed), **options)), runs))
            regions.append(output_masks(holder[-1], options.get("filter_dummy", True)))
            for key, value in seed_ties(grid, holder[-1]).items():
                ties[key] = ties.get(key, 0) + value
        row = {"s/image (median)": statistics.median(seconds),
               "x gram (torch)": statistics.median(seconds) / out["gram float32 torch s/image"],
               "regions/image": sum(r.shape[0] for r in regions) / len(regions), "seed ties (all images)": ties}
        row.update(agreement(regions, theirs))
        out[name] = row
    return out


def print_reference_table(report: dict[str, Any]) -> None:
    for set_name, per_threads in report["sets"].items():
        print(f"\n## {set_name}  ({report['grids'][set_name]})")
        header = (f"{'threads':>7} {'run':<32} {'s/image':>9} {'x gram':>7} {'regions':>8} "
                  f"{'ours@1.0':>9} {'ours@.9':>8} {'pub@1.0':>8} {'pub@.9':>7} {'same set':>9}")
        print(header)
        for row in per_threads:
            t = row["threads"]
            print(f"{t:>7} {'gram float32 (torch x @ x.T)':<32} {row['gram float32 torch s/image']:>9.4f}")
            print(f"{t:>7} {'gram float32 (numpy)':<32} {row['gram float32 numpy s/image']:>9.4f}")
            pub = row["public k_sum_main"]
            print(f"{t:>7} {'public k_sum_main':<32} {pub['s/image (median)']:>9.3f} {pub['x gram (torch)']:>7.1f} "
                  f"{pub['regions/image']:>8.1f}" + (f"  ({pub['timed out']} timed out)" if pub["timed out"] else ""))
            for name, r in row.items():
                if not name.startswith("ours"):
                    continue
                print(f"{t:>7} {name:<32} {r['s/image (median)']:>9.3f} {r['x gram (torch)']:>7.1f} "
                      f"{r['regions/image']:>8.1f} {r['ours matched at IoU 1.0']:>9.1%} "
                      f"{r['ours matched at IoU >= 0.9']:>8.1%} {r['public matched at IoU 1.0']:>8.1%} "
                      f"{r['public matched at IoU >= 0.9']:>7.1%} {r['images with identical region sets']:>9.1%}")
        for row in per_threads[:1]:
            for name, r in row.items():
                if name.startswith("ours"):
                    t = r["seed ties (all images)"]
                    print(f"  {name}: {t['bisections']} bisections, {t['tied highest degree']} with a tied highest "
                          f"degree, {t['tied lowest degree']} with a tied lowest degree")


def reference_child(a: argparse.Namespace) -> None:
    """One thread count, in this process (its BLAS thread variables were set before numpy loaded)."""
    payload = torch.load(a.child, weights_only=False)
    module = load_reference(a.reference)
    result = {name: measure_reference(grids, module, int(a.threads), a.seed, a.repeats, a.reference_timeout)
              for name, grids in payload["sets"].items()}
    Path(a.child).with_suffix(f".t{a.threads}.json").write_text(json.dumps(result))


def reference_main(a: argparse.Namespace) -> None:
    """Make the grids once, measure each thread count in a fresh process, print and save the table."""
    counts = [os.cpu_count() or 1 if t.strip() == "all" else int(t) for t in str(a.threads).split(",")]
    load_reference(a.reference)  # fail early when the checkout is not usable
    sets = {"planted 45x60x768": [planted_grid(a.seed + i)[0] for i in range(a.images)]}
    names: dict[str, Any] = {"planted 45x60x768": f"{a.images} planted grids, seeds {a.seed}..{a.seed + a.images - 1}"}
    photos = a.photos
    if photos is None:
        for candidate in (a.reference / "CALID" / "data" / "images", a.reference / "data" / "images"):
            if candidate.is_dir():
                photos = candidate
    if photos is not None and a.photo_limit != 0:
        grids, files, source = photo_grids(photos, a.vit_weights, a.photo_limit)
        key = "DINO ViT-B/8 tokens of photographs"
        sets[key] = grids
        names[key] = f"{len(grids)} images of {photos}: {source}; grids {sorted({tuple(g.shape[:2]) for g in grids})}"
    report: dict[str, Any] = {"reference": str(a.reference), "public rules": PUBLIC_RULES, "grids": names,
                              "machine": f"{os.cpu_count()} CPU threads", "sets": {k: [] for k in sets}}
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "grids.pt"
        torch.save({"sets": sets}, payload)
        for count in counts:
            command = [sys.executable, str(Path(__file__).resolve()), "--reference", str(a.reference), "--child",
                       str(payload), "--threads", str(count), "--seed", str(a.seed), "--repeats", str(a.repeats),
                       "--reference-timeout", str(a.reference_timeout)]
            subprocess.run(command, check=True)
            result = json.loads(payload.with_suffix(f".t{count}.json").read_text())
            for name, row in result.items():
                report["sets"][name].append(row)
    print_reference_table(report)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5, help="planted feature sets (images)")
    p.add_argument("--repeats", type=int, default=3, help="runs per image for the batched solver (best kept)")
    p.add_argument("--threads", default="1",
                   help="CPU threads (the paper times one); with --reference a comma list, e.g. 1,2 or 1,all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="break both solvers' time down (Gram, k-sums, ...)")
    p.add_argument("--vit-weights", type=Path, default=None,
                   help="local DINO ViT-B/8 weights (timm vit_base_patch8_224.dino) to add real patch tokens")
    p.add_argument("--image", type=Path, default=None, help="picture for --vit-weights (random pixels otherwise)")
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    p.add_argument("--reference", type=Path, default=None,
                   help="a checkout of the public CLAID code: measure agreement and time against its k_sum_main")
    p.add_argument("--photos", type=Path, default=None,
                   help="JPEGs for ViT grids with --reference (default: REFERENCE/CALID/data/images)")
    p.add_argument("--photo-limit", type=int, default=-1, help="at most this many photographs (0: none, -1: all)")
    p.add_argument("--reference-timeout", type=int, default=900, help="seconds before one public run is given up")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.reference is not None:
        if a.child is not None:
            reference_child(a)
        else:
            reference_main(a)
        return
    a.threads = _THREADS if _THREADS is not None else int(a.threads)
    torch.set_num_threads(a.threads)

    sets = {"planted 45x60x768": [planted_grid(a.seed + i)[0] for i in range(a.images)]}
    if a.vit_weights is not None:
        sets["DINO ViT-B/8 tokens"] = [vit_grid(a.vit_weights, a.image, a.seed)]
    report: dict[str, object] = {"threads": a.threads, "images": a.images}
    for name, grids in sets.items():
        build_hierarchy(grids[0])  # warm-up (allocator, BLAS)
        fast, fast_nodes = time_solver(grids, "batched", a.repeats)
        slow, slow_nodes = time_solver(grids, "sequential", 1)
        ious_a, ious_b = [], []
        for nf, ns in zip(fast_nodes, slow_nodes):
            mf, ms = output_masks(nf), output_masks(ns)
            ious_a.append(best_iou(mf, ms))
            ious_b.append(best_iou(ms, mf))
        both = torch.cat(ious_a + ious_b)

        def stats(seconds: list[float], hierarchies: list[list[RegionNode]]) -> dict[str, float]:
            return {"median s/image": statistics.median(seconds), "best s/image": min(seconds),
                    "regions/image": sum(len(output_masks(n)) for n in hierarchies) / len(hierarchies),
                    "cuts/image": sum(sum(x.bisected for x in n) for n in hierarchies) / len(hierarchies),
                    "nodes/image": sum(len(n) for n in hierarchies) / len(hierarchies)}

        grams = [gram_seconds(grid, a.repeats) for grid in grids]
        gram = {key: statistics.median(g[key] for g in grams) for key in grams[0]}
        row = {"grid": list(grids[0].shape), "batched": stats(fast, fast_nodes),
               **{f"{key} median s/image": value for key, value in gram.items()},
               **{f"batched / {key} (per image, median)": statistics.median(f / g[key] for f, g in zip(fast, grams))
                  for key in gram},
               "sequential (per-patch loop)": stats(slow, slow_nodes),
               "speed ratio (median)": statistics.median(slow) / statistics.median(fast),
               "mean best IoU between the two outputs": float(both.mean()) if both.numel() else 1.0,
               "share of regions matched at IoU >= 0.9": float((both >= 0.9).float().mean()) if both.numel() else 1.0}
        if name.startswith("planted"):
            truth = []
            for i, nodes in enumerate(fast_nodes):
                planted = torch.zeros(0, *grids[i].shape[:2], dtype=torch.bool)
                for r0, r1, c0, c1 in planted_grid(a.seed + i)[1]:
                    m = torch.zeros(1, *grids[i].shape[:2], dtype=torch.bool)
                    m[0, r0:r1, c0:c1] = True
                    planted = torch.cat([planted, m])
                truth.append(best_iou(planted, output_masks(nodes)))
            truth_all = torch.cat(truth)
            row["planted regions recovered by batched at IoU >= 0.9"] = float((truth_all >= 0.9).float().mean())
        if a.profile:
            row["batched profile (s/image)"] = profile(grids, "batched")
            row["sequential profile (s/image)"] = profile(grids, "sequential")
            row["k-sums speed ratio"] = (row["sequential profile (s/image)"]["bisections (k-sums)"]
                                         / row["batched profile (s/image)"]["bisections (k-sums)"])
        report[name] = row
    print(json.dumps(report, indent=1))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
