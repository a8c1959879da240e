"""Training on a benchmark's own database images, without any label: what UDQ learns from.

UDQ's input is "reference images X = {x_i}" and nothing else (Algorithm 1): its pseudo-labels come
from product quantisation of the proposals of these very images. :class:`DatabaseImagesDataModule`
serves them

* for training, shuffled per epoch from ``(seed, epoch)`` in batches of ``batch_size`` images
  (items ``(image, ImageMeta)``; an unreadable image comes as ``None`` and is skipped by the
  training step), resumable mid-epoch like every instsearch DataModule (docs/resuming.md);
* for the passes at round boundaries, in database order (:meth:`round_dataloader`, sharded over
  ranks);
* and, as every DataModule with a ``benchmark``, the benchmark itself for retrieval evaluation.

Every image is served as evaluation serves it (long side capped at ``max_side``, no augmentation),
so a proposal stored in original pixels is the same box at every pass.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from instsearch.checkpointing import ResumesTrainingPosition
from instsearch.datamodules.benchmark import BenchmarkImages, ServesBenchmark, benchmark_dataloader, collate_images
from instsearch.datamodules.samplers import TrainingBatchSampler, training_sampler

__all__ = ["DatabaseImagesDataModule"]


class DatabaseImagesDataModule(ServesBenchmark, ResumesTrainingPosition, pl.LightningDataModule):
    """The database images of ``benchmark`` as unlabelled training data.

    Args:
        benchmark: the ``benchmark.json`` whose database is trained on and searched.
        batch_size: images per training step (and per batch of the round passes).
        num_workers: DataLoader workers.
        max_side: cap of the served long side (as evaluation serves the benchmark).
        seed: the shuffling seed (training order = function of ``(seed, epoch)``).
        synthetic_preset: when ``benchmark`` does not exist, generate the synthetic benchmark of
            this preset (``"tiny"``, ...) into its folder first (as ``instsearch synth`` would);
            ``None``: a missing file is an error naming it.
    """

    def __init__(self, benchmark: str, batch_size: int = 4, num_workers: int = 0, max_side: Optional[int] = 1600,
                 seed: int = 0, synthetic_preset: Optional[str] = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.benchmark = str(benchmark)
        self.batch_size = int(batch_size)
        self.benchmark_batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.benchmark_max_side = max_side
        self.seed = int(seed)
        self.synthetic_preset = synthetic_preset
        self._resume_at: Optional[tuple[int, int]] = None

    def prepare_data(self) -> None:
        path = Path(self.benchmark)
        if path.is_file():
            return
        if self.synthetic_preset is None:
            raise FileNotFoundError(f"benchmark not found: {path} (expected an instsearch-benchmark/1 JSON file, "
                                    f"e.g. written by `instsearch synth` or a converter; or set synthetic_preset)")
        from instsearch.synthetic import generate

        written = generate(path.parent, self.synthetic_preset, self.seed)
        if Path(written) != path:
            raise FileNotFoundError(f"the synthetic generator wrote {written}, not {path}: point benchmark at it")

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare_data()

    def train_dataloader(self) -> DataLoader:
        dataset = BenchmarkImages(self.load_benchmark(), part="database", max_side=self.benchmark_max_side)
        if len(dataset) == 0:
            raise RuntimeError(f"{self.benchmark}: the benchmark lists no database image to train on")
        sampler = training_sampler(dataset, self.trainer, self.seed)
        batch_sampler = TrainingBatchSampler(sampler, self.batch_size, start=self._resume_at)
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                          collate_fn=collate_images, persistent_workers=self.num_workers > 0)

    def round_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Every database image in benchmark order (this rank's shard: positions ``rank::world_size``)."""
        bench = self.load_benchmark()
        indices = list(range(rank, len(bench.database), world_size)) if world_size > 1 else None
        return benchmark_dataloader(bench, "database", self.batch_size, self.num_workers, self.benchmark_max_side,
                                    indices=indices)

    def teardown(self, stage: Optional[str] = None) -> None:
        if stage == "fit":
            self.forget_resume_position()
