"""UDQ on the synthetic benchmark: the paper's Fig. 3 / Table 2 comparison at equal code size.

For each variant, ``configs/udq_synthetic.yaml`` is trained (``instsearch fit`` through the CLI,
variant options applied on top) and the table reports mAP@all and mIoU of

* Off-the-shelf: the PCA-d RoI features of the initialised network, exact search;
* Off-the-shelf-OPQ: the same features, OPQ fitted on them, ADC search (same code size as UDQ);
* UDQ after rounds 0, 1, 2: ADC search with the round's codebooks (the per-epoch evaluation);
* UDQ exact: the final ``f_t`` searched real-valued.

Variants: plain UDQ (M 8 x K 256 = 64 bits), UDQ-BFR / PBR / CBR (Section 3.4), the fast-scan
code size M 16 x K 16 (also 64 bits), OPQ refitted on the final features (``final_refit``) and the
null control: plain UDQ with every learning rate 0, whose rounds refit OPQ on unchanged features.
The paper's backbone and RPN have no local weights here: a trained instsearch detector stands in
(the demo's, ``make demo``), as in ``configs/udq_synthetic.yaml``.

A gain is only a gain beyond the spread over seeds: ``--seeds 0 1 2`` runs every variant once per
seed (``seed_everything`` for the training order and initialisation, and the module's ``seed`` for
the PCA draw, OPQ and k-means) and reports each column as mean ± standard deviation over the seeds.

    python benchmarks/udq_synthetic.py --detector-weights demo_out/checkpoints/last.ckpt \
        --benchmark demo_out/data/benchmark.json --variants "UDQ (M8 K256)" "null control (lr 0)" --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytorch_lightning as pl

from instsearch.lightning_cli import lightning_cli
from instsearch.console import quiet_framework_noise
from instsearch.eval.callback import RetrievalEvaluation, benchmark_of
from instsearch.eval.evaluator import extract_and_score

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "udq_synthetic.yaml"

#: every learning rate of the UDQ phase set to 0: rounds that refit OPQ on features that do not move
NULL_CONTROL = ["--model.init_args.optim.lr", "0"]

VARIANTS = {
    "UDQ (M8 K256)": [],
    "UDQ-BFR": ["--model.init_args.refinement", "bfr"],
    "UDQ-PBR": ["--model.init_args.refinement", "pbr"],
    "UDQ-CBR": ["--model.init_args.refinement", "cbr"],
    "UDQ (M16 K16, fast-scan size)": ["--model.init_args.num_subspaces", "16", "--model.init_args.nbits", "4"],
    "UDQ-final-refit": ["--model.init_args.final_refit", "true"],
    "null control (lr 0)": NULL_CONTROL,
}


class RoundRecorder(pl.Callback):
    """The retrieval metrics after every epoch (it runs after :class:`RetrievalEvaluation`)."""

    def __init__(self, evaluation: RetrievalEvaluation):
        self.evaluation, self.per_epoch = evaluation, []

    def on_train_epoch_end(self, trainer, module):
        result = self.evaluation.last_result
        self.per_epoch.append(None if result is None else result.metrics)


def run_variant(name: str, overrides: list[str], args, seed: int) -> dict:
    slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
    out = Path(args.out) / slug / f"seed{seed}"
    cli = lightning_cli([
        "--config", str(CONFIG),
        "--seed_everything", str(seed),
        "--model.init_args.seed", str(seed),
        "--data.init_args.benchmark", str(args.benchmark),
        *(["--model.init_args.net.init_args.detector_weights", str(args.detector_weights)]
          if args.detector_weights else []),
        "--model.init_args.progress", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger", json.dumps([{"class_path": "pytorch_lightning.loggers.CSVLogger",
                                          "init_args": {"save_dir": str(out), "name": "log"}}]),
        "--trainer.callbacks", "[]",
        "--retrieval.progress", "false",
        *overrides,
        *(f"--{option}" for option in args.set),
    ], run=False)
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, RetrievalEvaluation))
    recorder = RoundRecorder(evaluation)
    cli.trainer.callbacks.append(recorder)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - start
    module = cli.model
    benchmark = benchmark_of(cli.trainer, required=True)
    loaders = cli.datamodule.benchmark_dataloaders()
    exact = extract_and_score(module, loaders, module.make_evaluator(benchmark, quantized=False), step=module.search_step,
                     progress=False)
    return {"name": name, "seed": seed, "baselines": module.baseline_results, "rounds": recorder.per_epoch,
            "exact": exact.metrics, "stats": module.round_stats, "seconds": seconds,
            "bits": module.num_subspaces * module.nbits}


def band(values: list[float]) -> str:
    """``mean ± std`` (sample standard deviation; the value alone for one seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return "  n/a "
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.4f} ± {std:.4f}"


def main() -> None:
    quiet_framework_noise()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detector-weights", help="a trained detector checkpoint (the demo's); without it the "
                        "networks run randomly initialised (the mechanics only)")
    parser.add_argument("--benchmark", default="data/synthetic/benchmark.json")
    parser.add_argument("--out", default="runs/udq_synthetic_benchmark")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0],
                        help="one run per seed per variant; columns become mean ± std over them")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--figure", default="udq_rounds.png",
                        help="mAP@all after each epoch against the baselines (the paper's Fig. 3), a PNG")
    parser.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                        help="extra CLI options for every variant, e.g. --set model.init_args.net.init_args.frozen_stages=5")
    args = parser.parse_args()

    runs = {name: [run_variant(name, VARIANTS[name], args, seed) for seed in args.seeds] for name in args.variants}
    results = [r for per_seed in runs.values() for r in per_seed]

    def column(rs: list[dict], pick, key: str = "mAP@all") -> str:
        return band([pick(r)[key] if pick(r) else None for r in rs])

    print(f"\nUDQ, synthetic benchmark ({args.benchmark}); mAP@all, mean ± std over seeds {args.seeds}")
    epochs = max(len(r["rounds"]) for r in results)
    header = ["variant", "bits", "Off-the-shelf", "Off-the-shelf-OPQ",
              *(f"after epoch {e + 1}" for e in range(epochs)), "final exact", "train s"]
    print(" | ".join(header) + "   (epoch e + 1 ends round e with one epoch per round)")
    for name, rs in runs.items():
        rounds = [column(rs, lambda r, e=e: r["rounds"][e] if e < len(r["rounds"]) else None) for e in range(epochs)]
        print(" | ".join([name, str(rs[0]["bits"]), column(rs, lambda r: r["baselines"].get("off_the_shelf")),
                          column(rs, lambda r: r["baselines"].get("off_the_shelf_opq")), *rounds,
                          column(rs, lambda r: r["exact"]), f"{sum(r['seconds'] for r in rs) / len(rs):.0f}"]))
    print("mIoU, mean ± std:")
    for name, rs in runs.items():
        print(" | ".join([name, column(rs, lambda r: r["baselines"].get("off_the_shelf"), "mIoU"),
                          column(rs, lambda r: r["baselines"].get("off_the_shelf_opq"), "mIoU"),
                          *(column(rs, lambda r, e=e: r["rounds"][e] if e < len(r["rounds"]) else None, "mIoU")
                            for e in range(epochs)), column(rs, lambda r: r["exact"], "mIoU")]))
    for r in results:
        print(r["name"], f"seed {r['seed']}", "round statistics:",
              "; ".join(", ".join(f"{k}={v:.4g}" for k, v in s.items()) for s in r["stats"]))
    from instsearch.eval.visualize import metric_curves_figure

    first = results[0]["baselines"]
    references = {name: first[key]["mAP@all"] for name, key in (("Off-the-shelf", "off_the_shelf"),
                                                               ("Off-the-shelf-OPQ", "off_the_shelf_opq"))
                  if key in first}
    curves = {f"{r['name']} (seed {r['seed']})": [m["mAP@all"] for m in r["rounds"] if m] for r in results}
    figure = Path(args.out) / args.figure
    figure.parent.mkdir(parents=True, exist_ok=True)
    metric_curves_figure(curves, references, x_label="epoch (one epoch per round: epoch e ends round e)"
                         ).save(figure)
    print(f"figure: {figure}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
