"""DetectionDataModule: grouped multi-scale batches, validation, bad images from worker processes,
DDP sampling (its own or Lightning's), and a fit under a Lightning Trainer."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.utils.data import DistributedSampler

from coco_files import make_coco
from instsearch.datamodules.detection import DetectionDataModule
from instsearch.datamodules.instance_dataset import detection_collate
from instsearch.datamodules.samplers import GroupedBatchSampler


def _dm(images_dir, ann, **kw) -> DetectionDataModule:
    defaults = dict(batch_size=2, num_workers=0, train_short_sides=(32, 40), max_size=80, test_short_side=32)
    defaults.update(kw)
    return DetectionDataModule(images_dir, ann, images_dir, ann, benchmark="bench.json", **defaults)


def test_detection_datamodule_batches(tmp_path):
    images_dir, ann = make_coco(tmp_path, n_extra=5)
    dm = _dm(images_dir, ann)
    assert dm.num_classes == 4 and dm.category_names[1:] == ["person", "car", "dog"]
    assert dm.benchmark == "bench.json"
    dm.setup("fit")
    assert len(dm.train_dataset) == 7 and len(dm.val_dataset) == 8
    torch.manual_seed(0)
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, GroupedBatchSampler)
    ratios = dm.train_dataset.aspect_ratios()
    n = 0
    for images, targets in loader:
        assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
        # images of one batch share orientation (portrait b.jpg never batched with landscape ones)
        assert len({img.shape[-1] > img.shape[-2] for img in images}) == 1
        for img, t in zip(images, targets):
            assert min(img.shape[-2:]) in (32, 40) and max(img.shape[-2:]) <= 80
            assert t["masks"].shape[-2:] == img.shape[-2:] and (t["iscrowd"] == 0).all()
        n += 1
    assert n == len(loader) == 4
    assert ratios.shape == (7,)
    val_images, val_targets = next(iter(dm.val_dataloader()))
    assert min(val_images[0].shape[-2:]) == 32 and val_targets[0]["iscrowd"].tolist() == [0, 0, 0, 1]


def test_datamodule_without_grouping_and_without_val(tmp_path):
    images_dir, ann = make_coco(tmp_path)
    dm = DetectionDataModule(images_dir, ann, batch_size=2, num_workers=0, group_by_aspect_ratio=False,
                             train_short_sides=(32,), max_size=64, masks=False)
    loader = dm.train_dataloader()
    assert type(loader.batch_sampler).__name__ == "TrainingBatchSampler"  # plain batches, epoch-seeded
    assert sum(len(b[0]) for b in loader) == 2
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="both val_images and val_annotations"):
        DetectionDataModule(images_dir, ann, val_images=images_dir)


def test_worker_processes_report_bad_images(tmp_path):
    images_dir, ann = make_coco(tmp_path, n_extra=3, corrupt=True)
    dm = _dm(images_dir, ann, num_workers=1, masks=False)
    dm.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(dm.train_dataloader())
    assert sum(len(b[0]) for b in batches) == 6
    report = dm.bad_image_report()
    assert [e["image"] for e in report.entries] == ["2"]


def test_explicit_distributed_sampler_when_lightning_does_not_inject(tmp_path, monkeypatch):
    images_dir, ann = make_coco(tmp_path, n_extra=5)
    dm = _dm(images_dir, ann, masks=False)
    dm.setup("fit")
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    loader = dm.train_dataloader()
    sampler = loader.batch_sampler.sampler
    assert isinstance(sampler, DistributedSampler) and sampler.num_replicas == 2 and sampler.rank == 1
    assert len(loader) == 2  # ceil(ceil(7 / 2) / 2)


def test_lightning_injects_distributed_sampler_into_grouped_batches(tmp_path):
    """What Lightning does under DDP with use_distributed_sampler=True, without spawning processes."""
    from pytorch_lightning.utilities.data import _update_dataloader
    from lightning_fabric.utilities.data import _replace_dunder_methods
    from torch.utils.data import BatchSampler, DataLoader

    images_dir, ann = make_coco(tmp_path, n_extra=5)
    dm = _dm(images_dir, ann, masks=False)
    dm.setup("fit")
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()
    for rank in range(2):
        injected = _update_dataloader(loader, DistributedSampler(dm.train_dataset, num_replicas=2, rank=rank))
        assert isinstance(injected.batch_sampler, GroupedBatchSampler)
        assert injected.batch_sampler.sampler.rank == rank
        assert injected.collate_fn is detection_collate
        assert injected.batch_sampler.sample_seed == dm.seed  # augmentation seeds survive the re-creation
        batches = list(injected.batch_sampler)
        shard = set(injected.batch_sampler.sampler)
        assert len(batches) == 2 and all({i for i, _ in b} <= shard for b in batches)


def test_fits_under_a_lightning_trainer(tmp_path):
    import pytorch_lightning as pl

    class Probe(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[int] = []

        def training_step(self, batch, batch_idx):
            images, targets = batch
            self.seen += [int(t["image_id"]) for t in targets]
            return (self.w - torch.stack([img.mean() for img in images]).mean()) ** 2

        def validation_step(self, batch, batch_idx):
            images, targets = batch
            assert self.trainer.datamodule.benchmark == "bench.json"
            self.log("val_boxes", float(sum(len(t["boxes"]) for t in targets)), batch_size=len(images))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    images_dir, ann = make_coco(tmp_path, n_extra=3, corrupt=True)
    dm = _dm(images_dir, ann, masks=True)
    model = Probe()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    # 5 training items (c.jpg holds only a crowd): ceil(5 / 2) = 3 batches of 2; b.jpg is unreadable
    assert len(model.seen) == 2 * 3 and 2 not in model.seen
    report = json.loads((tmp_path / "bad_images.json").read_text())
    assert report["skipped"] == 1 and report["images"][0]["path"].endswith("b.jpg")
