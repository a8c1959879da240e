"""Shared fixtures: one tiny synthetic benchmark per test session, and a trimmed copy of it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # pytest-xdist runs one worker per core


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from instsearch.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, preset="tiny", seed=0)
    return root


@pytest.fixture(scope="session")
def small_benchmark(synthetic_root) -> Path:
    """4 queries, their positives and a few negatives: the tiny benchmark cut to ~24 images."""
    from instsearch.formats import Benchmark

    bench = Benchmark.load(synthetic_root / "benchmark.json")
    queries = bench.queries[:4]
    keep: list[str] = []
    for q in queries:
        keep += [i for i in bench.ground_truth[q.id].positives if i not in keep]
    keep += [i for i in bench.database if i not in keep][: max(0, 24 - len(keep))]
    keep_set = set(keep)
    data = bench.to_dict()
    data["database"] = [i for i in bench.database if i in keep_set]
    data["queries"] = [q for q in data["queries"] if q["id"] in {q.id for q in queries}]
    data["ground_truth"] = {q.id: data["ground_truth"][q.id] for q in queries}
    for g in data["ground_truth"].values():
        g["positives"] = [p for p in g["positives"] if p["image"] in keep_set]
        g["junk"] = [j for j in g["junk"] if j in keep_set]
    path = synthetic_root / "benchmark_small.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="session")
def num_classes(synthetic_root) -> int:
    return len(json.loads((synthetic_root / "train.json").read_text())["categories"]) + 1
