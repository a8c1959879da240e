"""SyntheticDataModule: reads the files of `instsearch synth`, and generates them when asked to."""
from __future__ import annotations

from pathlib import Path

import pytest

from coco_files import make_coco
from instsearch.datamodules.synthetic import SyntheticDataModule


def test_synthetic_datamodule_reads_and_generates(tmp_path, monkeypatch):
    root = tmp_path / "synth"
    root.mkdir()
    make_coco(root, "images")
    (root / "annotations" / "instances_images.json").rename(root / "train.json")
    dm = SyntheticDataModule(root, generate=False, num_workers=0)
    assert dm.benchmark == str(root / "benchmark.json") and dm.val_dataloader() == []
    assert dm.num_classes == 4 and max(dm.train_short_sides) <= 1.25 * 160
    with pytest.raises(FileNotFoundError, match="train.json"):
        SyntheticDataModule(tmp_path / "empty", generate=False).prepare_data()

    calls = []

    def fake_generate(out, preset, seed):
        calls.append((Path(out), preset, seed))
        make_coco(Path(out), "images")
        (Path(out) / "annotations" / "instances_images.json").rename(Path(out) / "train.json")

    import types
    import sys
    monkeypatch.setitem(sys.modules, "instsearch.synthetic", types.SimpleNamespace(generate=fake_generate))
    gen = SyntheticDataModule(tmp_path / "new", preset="tiny", seed=5, num_workers=0)
    gen.prepare_data()
    assert calls == [(tmp_path / "new", "tiny", 5)]
    gen.prepare_data()  # idempotent
    assert len(calls) == 1 and gen.num_classes == 4
