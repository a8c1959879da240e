"""CLAID on the synthetic benchmark: retrieval against a whole-image descriptor, regions per image, the
decomposition's cuts per image and time per cut (the CLAID paper's Table V columns), its ablation
variants (random initialisation, NCut bisecting, fixed depth, no dummy filtering; Tables V, VII,
VIII), and a picture of one image's region hierarchy (its Fig. 3).

The paper's networks (DINO ViT-B/8 patches, ImageNet ResNet-50 features) have no local weights
here: a trained instsearch checkpoint (the demo's, ``make demo``) stands in for both, its `small`
backbone giving the patch grid (conv3, stride 8 like ViT-B/8's patches) and the region features
(conv3; the rows "paper's alpha ..." show the paper's affinity threshold and its layer4.0-like
conv5.0 on this stand-in, see the comments in ``configs/claid_synthetic.yaml``).

    python benchmarks/claid_synthetic.py --ckpt demo_out/checkpoints/last.ckpt --data demo_out/data
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from instsearch.config_files import load_config
from instsearch.console import quiet_framework_noise
from instsearch.datamodules.benchmark import benchmark_dataloader
from instsearch.datamodules.image_io import load_rgb
from instsearch.datamodules.transforms import to_float_tensor
from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator, extract_and_score
from instsearch.eval.visualize import region_hierarchy_figure
from instsearch.formats import Benchmark
from instsearch.networks.bisecting import output_nodes
from instsearch.networks.claid import CLAID, regions_to_boxes, upsample_masks
from instsearch.networks.global_model import GlobalDescriptorModel

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "claid_synthetic.yaml"

#: the paper's ablations, as changes of the config's decomposition options
VARIANTS = {
    "CLAID": {},
    "paper's alpha 0.2": {"alpha": 0.2},
    "paper's alpha 0.2 and conv5.0 features": {"alpha": 0.2, "describe_layer": "conv5.0"},
    "random initialisation (Table VII)": {"seed_selection": False},
    "no dummy filtering (Table VII)": {"filter_dummy": False},
    "CLAID (NCut) (Tables I, V)": {"method": "ncut"},
    "depth 3, no tau1, no dummies (Table VIII)": {"max_depth": 3, "filter_dummy": False},
    "mask pooling": {"pool_in_mask": True},
}


def scores(model, bench: Benchmark) -> dict[str, float]:
    """One extraction, scored under both AP normalisations (the evaluator keeps what it processed)."""
    out = {}
    evaluator = RetrievalEvaluator(bench, RetrievalConfig(grid_queries=0))
    extract_and_score(model, [benchmark_dataloader(bench, batch_size=4)], evaluator, progress=False)
    for norm in ("min", "relevant"):
        evaluator.config = RetrievalConfig(normalization=norm, grid_queries=0)
        metrics = evaluator.compute(gather=False).metrics
        out[f"mAP@all ({norm})"] = metrics["mAP@all"]
        out[f"mAP@10 ({norm})"] = metrics["mAP@10"]
        out["mIoU"] = metrics["mIoU"]
        out["recall@IoU0.5"] = metrics["recall@IoU0.5"]
        out["regions_per_image"] = metrics["regions_per_image"]
    return out


def decomposition_timing(net: CLAID, bench: Benchmark) -> dict[str, float]:
    """Per database image: the patch grid's time, the decomposition's time and its cuts."""
    grid_s, split_s, cuts, regions = [], [], [], []
    for image_id in bench.database:
        image = to_float_tensor(load_rgb(bench.image_path(image_id)))
        with torch.no_grad():
            start = time.perf_counter()
            grid = net.patch_grid(image)
            grid_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            nodes = net.hierarchy_of_grid(grid)
            split_s.append(time.perf_counter() - start)
        cuts.append(sum(n.bisected for n in nodes))
        regions.append(len(output_nodes(nodes, net.decomposition["filter_dummy"])))
    n = len(bench.database)
    return {"cuts per image": sum(cuts) / n, "regions per image (decomposition)": sum(regions) / n,
            "patch grid s per image": sum(grid_s) / n, "decomposition s per image": sum(split_s) / n,
            "decomposition s per cut": sum(split_s) / max(sum(cuts), 1), "grid (last image)": list(grid.shape[:2])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=None, help="instsearch checkpoint whose `small` backbone stands in "
                                                           "for DINO and ResNet-50 (default: random weights)")
    p.add_argument("--data", type=Path, required=True, help="synthetic benchmark folder (benchmark.json)")
    p.add_argument("--out", type=Path, default=Path("runs/claid_synthetic"))
    p.add_argument("--threads", type=int, default=1, help="the paper times one CPU thread")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--figure-image", default=None, help="database image id for the hierarchy picture")
    a = p.parse_args()
    quiet_framework_noise()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    bench = Benchmark.load(a.data / "benchmark.json")
    options = load_config(CONFIG)["model"]["init_args"]["net"]["init_args"]
    weights = str(a.ckpt) if a.ckpt else None
    options.update(patch_weights=weights, describe_weights=weights)

    rows, timing = {}, {}
    for name in a.variants:
        net = CLAID(**{**options, **VARIANTS[name]}).eval()
        start = time.perf_counter()
        rows[name] = scores(net, bench)
        rows[name]["evaluation s"] = time.perf_counter() - start
        timing[name] = decomposition_timing(net, bench)
        print(name, json.dumps({**rows[name], **timing[name]}), flush=True)
    # whole-image GeM of the same backbone, at the image's own resolution as CLAID's descriptor
    # (max_upscale 1), over the layer CLAID pools and over the last stage
    for layer in dict.fromkeys([options["describe_layer"].split(".")[0], "conv5"]):
        gem = GlobalDescriptorModel(options["describe_backbone"], layer=layer, pooling="gem", weights=weights,
                                    max_upscale=1.0).eval()
        rows[f"whole-image GeM ({layer})"] = scores(gem, bench)
        print(f"GeM {layer}", json.dumps(rows[f"whole-image GeM ({layer})"]), flush=True)

    # one image's hierarchy: every output node, coloured by level (the paper's Fig. 3); without
    # --figure-image, the deepest hierarchy among the first 30 database images
    net = CLAID(**options).eval()
    best = (-1, -1, None, None, [])
    for image_id in [a.figure_image] if a.figure_image else bench.database[:30]:
        image = load_rgb(bench.image_path(image_id))
        with torch.no_grad():
            nodes = output_nodes(net.hierarchy(to_float_tensor(image)), True)
        depth = max((n.level for n in nodes), default=0)
        if (depth, len(nodes)) > best[:2]:
            best = (depth, len(nodes), image_id, image, nodes)
    _, _, image_id, image, nodes = best
    if nodes:
        masks = torch.stack([n.mask for n in nodes])
        levels = torch.tensor([n.level for n in nodes])
        size = (image.height, image.width)
        figure = region_hierarchy_figure(image, upsample_masks(masks, size) > 0.5, levels,
                                         regions_to_boxes(masks, size))
        figure.save(a.out / "claid_hierarchy.png")
        print(f"hierarchy of {image_id}: {a.out / 'claid_hierarchy.png'}")

    result = {"ckpt": weights, "threads": a.threads, "benchmark": bench.name, "database": len(bench.database),
              "queries": len(bench.queries), "retrieval": rows, "decomposition": timing}
    (a.out / "claid_synthetic.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
