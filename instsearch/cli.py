"""The ``instsearch`` command: Lightning's fit/validate/test/predict plus the project's tools.

Lightning (and with it torch) is imported only by the commands that run a model: ``instsearch
index build`` and ``instsearch evaluate`` stay within their own memory (the LightningCLI lives in
:mod:`instsearch.lightning_cli`)."""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional

TOOLS: dict[str, tuple[str, str]] = {
    "synth": ("instsearch.synthetic:main", "generate the synthetic instance-search benchmark"),
    "convert": ("instsearch.datamodules.converters:main", "convert a public benchmark (INSTRE, Oxford, Paris, Holidays, ...) to benchmark.json"),
    "extract": ("instsearch.extract_cli:main", "a benchmark's regions and query features into region shards on disk (restartable, DDP)"),
    "index": ("instsearch.index_cli:main", "build an ANN index over region shards (faiss key or memory budget; IVF lists merged on disk)"),
    "search": ("instsearch.search_cli:main", "search region shards through an index (ANN shortlist, exact best-region rescoring) -> run.json, metrics.json"),
    "evaluate": ("instsearch.eval.score_run:main", "score a run.json against a benchmark.json (mAP@k, mIoU)"),
    "whitening": ("instsearch.whitening_cli:main", "fit the PCA-whitening on another benchmark's database and save it (.npz)"),
    "compare": ("instsearch.compare_cli:main", "methods x benchmarks under one protocol, resumable: results.csv, per-query AP, bootstrap intervals, report"),
    "demo": ("instsearch.demo:main", "synthetic benchmark -> untrained vs trained vs global GeM, end to end"),
    "vlad-vocabulary": ("instsearch.vlad_vocabulary:main", "fit DASR's VLAD* vocabulary (words, LCS, PCA) on another benchmark's database"),
    "dasr-figure": ("instsearch.dasr_figure:figure_main", "DASR's picture of one image: mean activation, peak maps, ellipses"),
    "claid-figure": ("instsearch.claid_figure:figure_main", "CLAID's picture of one image: the region hierarchy by depth, dummies, kept regions"),
}
LIGHTNING = {
    "fit": "train a model (LightningCLI; --config configs/*.yaml)",
    "validate": "run the validation loop and retrieval evaluation once",
    "test": "score a checkpoint on a benchmark: --ckpt_path X.ckpt [--data.benchmark B.json]; writes run.json, metrics.json",
    "predict": "extract regions and features of a benchmark's database",
}


def _usage() -> str:
    width = max(map(len, list(TOOLS) + list(LIGHTNING)))
    lines = ["usage: instsearch <command> [options]   (instsearch <command> --help for a command's options)", "",
             "training and evaluation (LightningCLI):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING.items()]
    lines += ["", "tools:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in TOOLS.items()]
    return "\n".join(lines)


def _load(target: str) -> Callable[[list[str]], int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in TOOLS:
        return int(_load(TOOLS[command][0])(rest) or 0)
    if command in LIGHTNING:
        from instsearch.lightning_cli import lightning_cli

        lightning_cli([command, *rest])
        return 0
    print(f"instsearch: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
