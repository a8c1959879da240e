"""The synthetic benchmark as training data: :class:`SyntheticDataModule`.

It reads what ``instsearch synth`` (:mod:`instsearch.synthetic`) writes, and generates it on
first use when asked to. The generator itself is not a DataModule and lives in its own package.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from instsearch.datamodules.detection import DetectionDataModule
from instsearch.datamodules.instance_dataset import InstanceDataset

__all__ = ["SyntheticDataModule"]


class SyntheticDataModule(DetectionDataModule):
    """The synthetic benchmark's training data, as written by ``instsearch synth``::

        root/images/*   root/train.json   root/val.json   root/benchmark.json

    With ``generate=True`` a root without ``train.json`` is generated in :meth:`prepare_data` by
    ``instsearch.synthetic.generate(root, preset, seed)``. The default scales suit ~160 px images:
    the short side is drawn from 128–200 px, so nothing is upscaled beyond 1.25x (more would only
    teach the detector blur), and evaluation runs at the native 160 px.
    """

    def __init__(self, root: str | Path, generate: bool = True, preset: str = "tiny", seed: int = 0,
                 benchmark: Optional[str | Path] = None,
                 train_short_sides: Sequence[int] = (128, 144, 160, 176, 200), max_size: Optional[int] = 333,
                 test_short_side: int = 160, **kwargs: Any):
        root = Path(root)
        super().__init__(train_images=root / "images", train_annotations=root / "train.json",
                         val_images=root / "images", val_annotations=root / "val.json",
                         benchmark=benchmark if benchmark is not None else root / "benchmark.json",
                         train_short_sides=train_short_sides, max_size=max_size,
                         test_short_side=test_short_side, seed=seed, **kwargs)
        self.root, self.generate, self.preset = root, generate, preset

    def prepare_data(self) -> None:
        if (self.root / "train.json").is_file():
            return
        if not self.generate:
            raise FileNotFoundError(f"synthetic data not found: {self.root / 'train.json'} (expected layout: "
                                    f"{self.root}/images/, train.json, val.json, benchmark.json as written by "
                                    f"`instsearch synth`; or pass generate=True)")
        from instsearch.synthetic import generate  # only generating data needs the generator

        generate(self.root, self.preset, self.seed)

    def ensure_data(self) -> None:
        self.prepare_data()

    def build_dataset(self, split: str) -> Optional[InstanceDataset]:
        if split == "val" and not (self.root / "val.json").is_file():
            return None
        return super().build_dataset(split)
