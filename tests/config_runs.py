"""Shipped configs, made small, run through `instsearch test`: the outputs a user reads back."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from instsearch.config_files import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
__all__ = ["CONFIGS", "load_config", "run_shipped_config"]


def run_shipped_config(name: str, tmp_path: Path, benchmark: Path, capsys,
                       net_options: dict[str, Any]) -> tuple[dict, dict]:
    """``configs/<name>.yaml`` (its included pieces read in: :func:`load_config`) with a CSV logger
    in ``tmp_path``, no progress bar, ``net_options`` applied to the network and ``benchmark``
    served by ``BenchmarkDataModule``, through ``instsearch test`` (no checkpoint).

    Returns the printed ``metrics.json`` and ``run.json``, read back."""
    from instsearch.cli import main

    config = load_config(CONFIGS / f"{name}.yaml")
    config["trainer"]["logger"] = [{"class_path": "pytorch_lightning.loggers.CSVLogger",
                                    "init_args": {"save_dir": str(tmp_path), "name": name}}]
    config["trainer"]["enable_progress_bar"] = False
    config["model"]["init_args"]["net"]["init_args"].update(net_options)
    config["data"] = {"class_path": "instsearch.datamodules.benchmark.BenchmarkDataModule",
                      "init_args": {"benchmark": str(benchmark), "batch_size": 4}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["test", "--config", str(path)]) == 0
    out = capsys.readouterr().out

    def printed(label: str) -> dict:
        return json.loads(Path(next(line.split(": ", 1)[1] for line in out.splitlines()
                                    if line.startswith(f"{label}: "))).read_text())

    return printed("metrics"), printed("run")
