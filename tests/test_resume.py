"""Preemption-safe training: checkpoints every epoch, atomic writes, exact resumption after SIGKILL
or SIGTERM at an epoch end or mid-epoch (docs/resuming.md)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import SequentialSampler

from instsearch.checkpointing import CheckpointError, DurableCheckpointIO, LastCheckpoint
from instsearch.datamodules.samplers import EpochRandomSampler, GroupedBatchSampler, TrainingBatchSampler
from instsearch.seeding import derive_seed, seeded_rng

TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------ seeds and samplers
def test_derive_seed_depends_on_every_key_and_their_order():
    seeds = {derive_seed(7, e, i) for e in range(20) for i in range(50)}
    assert len(seeds) == 1000  # no collisions between nearby positions
    assert derive_seed(7, 1, 2) == derive_seed(7, 1, 2)
    assert derive_seed(7, 1, 2) != derive_seed(7, 2, 1) != derive_seed(8, 1, 2)
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(0, -1)


def test_seeded_rng_repeats_draws_and_leaves_the_caller_stream_alone():
    torch.manual_seed(0)
    with seeded_rng(123):
        a = torch.rand(5)
    after = torch.rand(3)
    torch.manual_seed(99)
    with seeded_rng(123):
        b = torch.rand(5)
    torch.manual_seed(0)
    assert torch.equal(a, b)
    assert torch.equal(after, torch.rand(3))  # the block did not advance the outer generator


def test_epoch_random_sampler_is_a_function_of_seed_and_epoch():
    s1, s2 = EpochRandomSampler(range(50), seed=3), EpochRandomSampler(range(50), seed=3)
    s1.set_epoch(4)
    torch.manual_seed(1)
    first = list(s1)
    torch.manual_seed(2)  # the global generator plays no part
    s2.set_epoch(4)
    assert first == list(s2) and sorted(first) == list(range(50))
    s2.set_epoch(5)
    assert list(s2) != first
    assert list(EpochRandomSampler(range(50), seed=4)) != list(EpochRandomSampler(range(50), seed=3))


def _whole_epochs(make, epochs):
    out = []
    for e in epochs:
        bs = make(None)
        bs.set_epoch(e)
        out.append(list(bs))
    return out


@pytest.mark.parametrize("grouped", [False, True])
def test_batch_sampler_start_skips_the_done_batches_of_that_epoch_only(grouped):
    groups = np.arange(37) % 3

    def make(start):
        sampler = EpochRandomSampler(range(37), seed=5)
        if grouped:
            return GroupedBatchSampler(sampler, groups, 4, sample_seed=11, start=start)
        return TrainingBatchSampler(sampler, 4, sample_seed=11, start=start)

    full = _whole_epochs(make, [2, 3])
    resumed = make((2, 3))
    assert list(resumed) == full[0][3:]  # epoch 2 from its fourth batch, same indices, same seeds
    resumed.set_epoch(3)
    assert list(resumed) == full[1]  # the next epoch is whole
    moved_on = make((2, 3))
    moved_on.set_epoch(3)  # Lightning moved to another epoch before the first iteration
    assert list(moved_on) == full[1]
    assert len(make((2, 3))) == len(full[0])


def test_sample_seeds_follow_index_and_epoch():
    bs = TrainingBatchSampler(SequentialSampler(range(6)), 3, sample_seed=2)
    bs.set_epoch(0)
    e0 = [key for batch in bs for key in batch]
    bs.set_epoch(1)
    e1 = [key for batch in bs for key in batch]
    assert [i for i, _ in e0] == [i for i, _ in e1] == list(range(6))
    assert e0[4][1] == derive_seed(2, 0, 4) and e1[4][1] == derive_seed(2, 1, 4)
    assert len({s for _, s in e0 + e1}) == 12
    assert list(TrainingBatchSampler(SequentialSampler(range(5)), 2)) == [[0, 1], [2, 3], [4]]  # plain indices
    inner = EpochRandomSampler(range(6), seed=1)
    grouped = GroupedBatchSampler(inner, np.zeros(6, dtype=int), 3, sample_seed=2)
    inner.set_epoch(3)  # Lightning sets the epoch on batch_sampler.sampler only
    assert all(seed == derive_seed(2, 3, i) for batch in grouped for i, seed in batch)


def test_augmentation_follows_the_sample_seed_not_the_global_generator(synthetic_root):
    from instsearch.datamodules.synthetic import SyntheticDataModule

    dm = SyntheticDataModule(root=synthetic_root, batch_size=2, num_workers=0)
    dm.setup("fit")
    ds = dm.train_dataset
    torch.manual_seed(0)
    a_img, a_t = ds[(3, 1234)]
    torch.manual_seed(1)
    b_img, b_t = ds[(3, 1234)]
    assert torch.equal(a_img, b_img) and torch.equal(a_t["boxes"], b_t["boxes"])
    shapes = {tuple(ds[(3, seed)][0].shape) for seed in range(12)}
    assert len(shapes) > 1  # different seeds draw different scales


# ------------------------------------------------------------------------------------ checkpoint files
def test_durable_checkpoint_io_replaces_only_complete_files(tmp_path, monkeypatch):
    io = DurableCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"w": torch.arange(4)}, path)
    assert torch.equal(io.load_checkpoint(path)["w"], torch.arange(4))

    def crash(*args, **kwargs):  # the process dies half-way through writing
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["w"], torch.arange(4))  # the previous one is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left


def test_truncated_checkpoint_is_refused_with_its_name(tmp_path):
    io = DurableCheckpointIO()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint({"w": torch.randn(1000)}, good)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt \(2000 bytes\) is not a complete checkpoint"):
        io.load_checkpoint(cut)


def test_last_checkpoint_schedule():
    cb = LastCheckpoint(dirpath="x", every_n_train_steps=50)
    assert cb.save_last is True and cb.save_top_k == 0 and cb.monitor is None and cb.every_n_steps == 50
    with pytest.raises(ValueError, match="every_n_train_steps"):
        LastCheckpoint(every_n_train_steps=0)


# ------------------------------------------------------------------------------------ kill and resume
EPOCHS, BATCHES = 3, 4


def _config(tmp_path: Path, root: Path, benchmark: Path, num_classes: int, name: str, every_n_steps=None,
            signal_at=None, filename: str = "config.json") -> Path:
    out = tmp_path / name
    callbacks = [{"class_path": "instsearch.checkpointing.LastCheckpoint",
                  "init_args": {"dirpath": str(out / "ckpt"), "every_n_train_steps": every_n_steps}}]
    if signal_at is not None:
        callbacks.insert(0, {"class_path": "resume_callbacks.SignalAtStep",
                             "init_args": {"step": signal_at[0], "signal_name": signal_at[1]}})
    cfg = {
        "seed_everything": 0,
        "trainer": {"max_epochs": EPOCHS, "limit_train_batches": BATCHES, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 1, "default_root_dir": str(out),
                    "logger": [{"class_path": "pytorch_lightning.loggers.CSVLogger",
                                "init_args": {"save_dir": str(out), "name": "logs", "flush_logs_every_n_steps": 1}}],
                    "callbacks": callbacks},
        "model": {"class_path": "instsearch.lightning_modules.detector.DetectorModule",
                  "init_args": {"net": {"class_path": "instsearch.networks.deep_region_cnn.DeepRegionCNN",
                                        "init_args": {"backbone": "small", "num_classes": num_classes, "top_k": 5,
                                                      "feature_layers": ["conv4"], "min_size": 96, "max_size": 160}},
                                "optim": {"lr": 0.01, "warmup_steps": 3, "milestones": [2]}}},
        # two workers: augmentation must not depend on which worker loads a sample
        "data": {"class_path": "instsearch.datamodules.synthetic.SyntheticDataModule",
                 "init_args": {"root": str(root), "benchmark": str(benchmark), "batch_size": 2, "num_workers": 2,
                               "train_short_sides": [80, 96, 112], "max_size": 160}},
        "retrieval": {"every_n_epochs": 100, "progress": False},
    }
    path = out / filename
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def _fit(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", "import sys; from instsearch.cli import main; sys.exit(main())",
                           "fit", "--config", str(config), *extra], env=env, capture_output=True, text=True,
                          timeout=600)


def _losses(out: Path) -> list[dict[int, float]]:
    """step -> train/loss of each CSV log in the run's folder: the killed run's, then the resumed one's."""
    runs = []
    for log in sorted(out.glob("logs/version_*/metrics.csv")):
        with log.open() as f:
            runs.append({int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")})
    return runs


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_root, small_benchmark, num_classes):
    tmp = tmp_path_factory.mktemp("resume")
    config = _config(tmp, synthetic_root, small_benchmark, num_classes, "uninterrupted")
    done = _fit(config)
    assert done.returncode == 0, done.stderr[-3000:]
    out = config.parent
    (losses,) = _losses(out)
    return tmp, losses, _weights(out / "ckpt" / "last.ckpt")


@pytest.mark.parametrize("signal_name,kill_step,every_n_steps", [
    ("SIGKILL", BATCHES + 1, None),  # killed in epoch 2: resumes from epoch 1's checkpoint
    ("SIGKILL", 3, 2),  # killed mid-epoch 1, after the step-2 checkpoint: resumes mid-epoch
    ("SIGTERM", 6, None),  # preempted mid-epoch 2: saves last.ckpt on the way out
])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(uninterrupted, synthetic_root, small_benchmark,
                                                             num_classes, signal_name, kill_step, every_n_steps):
    tmp, ref_losses, ref_weights = uninterrupted
    name = f"{signal_name}_{kill_step}"
    config = _config(tmp, synthetic_root, small_benchmark, num_classes, name, every_n_steps, (kill_step, signal_name))
    out = config.parent
    killed = _fit(config)
    checkpoint = out / "ckpt" / "last.ckpt"
    if signal_name == "SIGKILL":
        assert killed.returncode == -9
    else:  # SIGTERM: the step under way finishes, last.ckpt is written, the process exits cleanly
        assert killed.returncode == 0, killed.stderr[-3000:]
        assert torch.load(checkpoint, weights_only=False)["global_step"] == kill_step + 1
    resume_from = torch.load(checkpoint, weights_only=False)["global_step"]
    assert 0 < resume_from <= kill_step + 1
    resume = _config(tmp, synthetic_root, small_benchmark, num_classes, name, every_n_steps, filename="resume.json")
    resumed = _fit(resume, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    before, after = _losses(out)
    assert sorted(before) == list(range(kill_step + (signal_name == "SIGTERM")))  # flushed every step
    assert sorted(after) == list(range(resume_from, EPOCHS * BATCHES))  # the resumed run starts at its checkpoint
    for run in (before, after):  # the same loss at every logged step, bit for bit
        assert run == {step: ref_losses[step] for step in run}
    weights = _weights(checkpoint)
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def _test_metrics(config: Path, ckpt: Path, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "import sys; from instsearch.cli import main; sys.exit(main())", "test",
                           "--config", str(config), "--ckpt_path", str(ckpt),
                           *extra], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    path = next(line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("metrics: "))
    return json.loads(Path(path).read_text())


def test_two_process_gloo_test_writes_the_same_metrics_json(uninterrupted, synthetic_root, small_benchmark,
                                                              num_classes):
    """`instsearch test` sharded over 2 CPU processes (gloo) scores exactly what one process scores."""
    tmp = uninterrupted[0]
    config = _config(tmp, synthetic_root, small_benchmark, num_classes, "uninterrupted", filename="test.json")
    ckpt = config.parent / "ckpt" / "last.ckpt"
    one = _test_metrics(config, ckpt)
    two = _test_metrics(config, ckpt, "--trainer.devices=2", "--trainer.strategy=ddp_spawn")
    assert one.keys() == two.keys() and "mAP@all" in one
    for key, value in one.items():
        assert two[key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key


def test_fit_refuses_a_truncated_checkpoint_by_name(uninterrupted, synthetic_root, small_benchmark, num_classes):
    tmp = uninterrupted[0]
    config = _config(tmp, synthetic_root, small_benchmark, num_classes, "truncated")
    good = tmp / "uninterrupted" / "ckpt" / "last.ckpt"
    cut = config.parent / "ckpt" / "last.ckpt"
    cut.parent.mkdir(parents=True, exist_ok=True)
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    done = _fit(config, "--ckpt_path", str(cut))
    assert done.returncode != 0
    assert f"{cut} (" in done.stderr and "is not a complete checkpoint" in done.stderr
    assert good.is_file()
