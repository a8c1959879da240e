"""DASR / DASR* detection throughput: every peak of an image through one batched backward
(``strategy="batched"``, chunks of ``--chunk`` peaks through ``vmap`` of the backward) against one
backward per peak through a retained graph (``strategy="sequential"``, the authors' scheme).

Both strategies run the same forward and the same arithmetic per peak. On a CPU one peak at a
time keeps each layer's gradients in cache and measured faster (which is why ``strategy="auto"``
picks it there); on a GPU, where a single peak's backward is too small to fill the device,
batching is what pays (``--device cuda``).

Reported per detector and strategy: images per second of the whole detection (resize, forward,
peaks, back-propagation, regions), peaks and regions per image, the peak memory of a fresh process
running only that strategy, and the largest difference between the two strategies' maps.

    python benchmarks/dasr_throughput.py --images 2 --threads 1            # ResNet-50, 512 px
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import platform
import resource
import time
from pathlib import Path

import torch


def _images(count: int, side: int, data: Path | None) -> list[torch.Tensor]:
    """``count`` test images: the synthetic benchmark's first database images when ``data`` is
    given (resized to ``side`` by the network), else seeded noise blobs at ``side`` x ``3/4 side``."""
    if data is not None:
        from instsearch.datamodules.image_io import load_rgb
        from instsearch.datamodules.transforms import to_float_tensor
        from instsearch.formats import Benchmark

        bench = Benchmark.load(data / "benchmark.json")
        return [to_float_tensor(load_rgb(bench.image_path(i))) for i in bench.database[:count]]
    g = torch.Generator().manual_seed(0)
    return [torch.nn.functional.interpolate(torch.rand(1, 3, side // 32, side // 43, generator=g),
                                            size=(side * 3 // 4, side), mode="bilinear")[0] for _ in range(count)]


def _job(backbone: str, star: bool, strategy: str, chunk: int, side: int, count: int, data: str | None,
         threads: int, device: str, warmup: bool) -> dict:
    """One detector and strategy in a fresh process (its own peak memory)."""
    torch.set_num_threads(threads)
    from instsearch.console import quiet_framework_noise
    from instsearch.networks.dasr import DASR

    quiet_framework_noise()
    torch.manual_seed(0)
    net = DASR(backbone, star=star, long_side=side, strategy=strategy, chunk_size=chunk).eval().to(device)
    images = [i.to(device) for i in _images(count, side, Path(data) if data else None)]
    if warmup:  # first calls of torch.func / vmap (seconds), kernels, allocator: on a small copy
        net.long_side = 128
        net.explain(images[0], keep_maps=False)
        net.long_side = side
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    maps, peaks, regions = [], [], []
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        for image in images:
            det = net.explain(image, keep_maps=True)
            maps.append(det.maps.cpu())
            peaks.append(len(det.peaks))
            regions.append(len(det.kept))
    sync()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": len(images) / seconds, "peaks_per_image": sum(peaks) / len(peaks),
            "regions_per_image": sum(regions) / len(regions),
            "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            "max_gpu_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.startswith("cuda") else None,
            "maps": maps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--side", type=int, default=512, help="long side (the paper's 512)")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--data", type=Path, default=None, help="synthetic benchmark folder (default: noise images)")
    p.add_argument("--chunk", type=int, default=16, help="peaks per batched backward")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up at 128 px")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--detectors", nargs="*", default=["DASR", "DASR*"], choices=["DASR", "DASR*"])
    p.add_argument("--out", type=Path, default=Path("runs/dasr_throughput.json"))
    a = p.parse_args()
    rows = {}
    context = multiprocessing.get_context("spawn")
    for name in a.detectors:
        results = {}
        for strategy in ("sequential", "batched"):
            with cf.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                results[strategy] = pool.submit(_job, a.backbone, name == "DASR*", strategy, a.chunk, a.side,
                                                a.images, str(a.data) if a.data else None, a.threads,
                                                a.device, not a.no_warmup).result()
        diff = max(float((s - b).abs().max()) if len(s) else 0.0
                   for s, b in zip(results["sequential"]["maps"], results["batched"]["maps"]))
        scale = max(float(s.abs().max()) if len(s) else 0.0 for s in results["sequential"]["maps"])
        rows[name] = {k: {key: v for key, v in r.items() if key != "maps"} for k, r in results.items()}
        rows[name]["max_abs_diff"] = diff
        rows[name]["max_map_value"] = scale
        rows[name]["speedup"] = results["batched"]["images_per_s"] / results["sequential"]["images_per_s"]
        print(name, json.dumps(rows[name]), flush=True)
    device = (torch.cuda.get_device_name() if a.device.startswith("cuda")
              else f"CPU, {a.threads} thread(s) ({platform.processor() or platform.machine()})")
    out = {"backbone": a.backbone, "side": a.side, "images": a.images, "chunk": a.chunk, "threads": a.threads,
           "warmup": not a.no_warmup,
           "device": device, "weights": "random", "data": str(a.data) if a.data else "noise", "results": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
