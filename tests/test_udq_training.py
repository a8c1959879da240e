"""UDQ's network, rounds and search: PCA initialisation, the proposal bank, pseudo-labels equal to
faiss's encoding of the round's features, labels moving between rounds, checkpoints that restore
the codebooks (same rankings), determinism, the RPN phase and the encoded database on disk."""
from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from instsearch.datamodules.unlabelled import DatabaseImagesDataModule
from instsearch.eval.callback import RetrievalEvaluation
from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator, evaluate
from instsearch.eval.search import RegionIndex, RegionStore
from instsearch.lightning_modules.udq import ProposalBank, UDQModule
from instsearch.networks.product_quantizer import OPQCodebook
from instsearch.networks.udq import UDQNet, pca_projection

NET = dict(backbone="small", min_size=160, max_size=333, proposals_per_image=30, feature_dim=32)
MODULE = dict(num_subspaces=4, nbits=4, rounds=1, epochs_per_round=1, progress=False)


def make_module(**options) -> UDQModule:
    torch.manual_seed(0)
    return UDQModule(UDQNet(**NET), **{**MODULE, **options})


def fit(module: UDQModule, benchmark, tmp_path=None, callbacks=(), max_epochs=2, ckpt_path=None) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=list(callbacks),
                         enable_checkpointing=tmp_path is not None, default_root_dir=tmp_path)
    trainer.fit(module, DatabaseImagesDataModule(str(benchmark), batch_size=4), ckpt_path=ckpt_path)
    return trainer


# ---------------------------------------------------------------- network pieces
def test_pca_projection_matches_numpy_svd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    weight, bias = pca_projection(torch.from_numpy(x).float(), 3)
    projected = (torch.from_numpy(x).float() @ weight.T + bias).numpy()
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    # same axes up to sign, same variances, centred output
    np.testing.assert_allclose(np.abs(weight.numpy() @ vt[:3].T), np.eye(3), atol=1e-4)
    np.testing.assert_allclose(projected.var(axis=0, ddof=1), s[:3] ** 2 / 199, rtol=1e-4)
    np.testing.assert_allclose(projected.mean(axis=0), 0, atol=1e-4)
    # the sign rule: each axis's largest loading is positive
    assert (weight.gather(1, weight.abs().argmax(1, keepdim=True)) > 0).all()


def test_udq_net_proposals_features_and_rpn_losses():
    torch.manual_seed(0)
    net = UDQNet(**NET).eval()
    images = [torch.rand(3, 160, 160), torch.rand(3, 100, 200)]
    regions = net.detect_regions(images)
    for r, img in zip(regions, images):
        assert 1 <= len(r) <= 30 and r.features.shape == (len(r), 32)
        assert (r.boxes[:, 2] <= img.shape[-1] + 1e-4).all() and (r.boxes[:, 3] <= img.shape[-2] + 1e-4).all()
        assert torch.all(r.scores[:-1] >= r.scores[1:])  # best first
    # a proposal described as a query box gets the feature it has in the database
    box = regions[1].boxes[:1]
    np.testing.assert_allclose(net.describe_boxes([images[1]], [box])[0], regions[1].features[:1], atol=1e-4)
    torch.testing.assert_close(regions[0].features.norm(dim=1), torch.ones(len(regions[0])))  # l2_normalize default
    raw = UDQNet(**NET, l2_normalize=False).eval()
    raw.load_state_dict(net.state_dict())
    assert not torch.allclose(raw.detect_regions(images[:1])[0].features.norm(dim=1), torch.ones(len(regions[0])))
    net.train()
    losses = net(images, [{"boxes": torch.tensor([[10.0, 10, 90, 90]]), "labels": torch.tensor([1])}] * 2)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg"}


def test_phases_train_what_the_paper_trains():
    rpn_phase = make_module(phase="rpn")
    trainable = {n for n, p in rpn_phase.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("net.detector.rpn.") for n in trainable)
    udq_phase = make_module()
    trainable = {n for n, p in udq_phase.named_parameters() if p.requires_grad}
    assert not any(n.startswith("net.detector.rpn.") or "box_predictor" in n for n in trainable)
    assert {"net.fc_s.weight", "udq_loss.classifiers.weight"} <= trainable
    assert any(n.startswith("net.detector.roi_heads.box_head.") for n in trainable)


def test_feature_dim_must_split_into_subspaces():
    with pytest.raises(ValueError, match="not divisible by num_subspaces=8.*e.g. 96"):
        UDQModule(UDQNet(backbone="small", feature_dim=100), num_subspaces=8)


def test_proposal_bank_spans_and_state_round_trip():
    bank = ProposalBank.from_images(["a", "b", "c"], [torch.ones(2, 4), torch.zeros(0, 4), 2 * torch.ones(3, 4)],
                                    [torch.ones(2), torch.zeros(0), torch.arange(3.0)])
    bank.labels = torch.arange(10, dtype=torch.uint8).reshape(5, 2)
    assert bank.span("c") == (2, 5) and len(bank.boxes_of("b")) == 0 and bank.scores_of("c").tolist() == [0, 1, 2]
    assert "c" in bank and "z" not in bank
    assert bank.labels_of("c").tolist() == [[4, 5], [6, 7], [8, 9]]
    again = ProposalBank.from_state(bank.to_state())
    assert torch.equal(again.boxes_of("c"), bank.boxes_of("c")) and torch.equal(again.labels, bank.labels)
    with pytest.raises(KeyError, match="'z'"):
        bank.span("z")


# ---------------------------------------------------------------- rounds
class RoundProbe(pl.Callback):
    """At the first batch of each round (labels fresh, no step taken yet): the labels, and faiss's
    encoding of the features the module extracts at that moment."""

    def __init__(self):
        self.labels, self.encoded = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx:
            return
        module.net.eval()
        features = module._extract_features(trainer.datamodule, 0, 1)
        module.net.train()
        self.labels.append(module.bank.labels.clone())
        self.encoded.append(module.codebook.encode(features))


def test_rounds_label_with_faiss_codes_and_labels_change(small_benchmark):
    module, probe = make_module(evaluate_baselines=False), RoundProbe()
    fit(module, small_benchmark, callbacks=[probe])
    assert [s["round"] for s in module.round_stats] == [0.0, 1.0]
    assert len(module.bank) == module.round_stats[0]["proposals"] > 24  # several proposals per image
    for labels, encoded in zip(probe.labels, probe.encoded):
        assert labels.dtype == torch.uint8
        assert torch.equal(labels.long(), encoded)  # the pseudo-labels are faiss's codes of f_t
    assert not torch.equal(probe.labels[0], probe.labels[1])
    assert 0 < module.round_stats[1]["labels_changed"] <= 1


def test_max_epochs_must_match_the_rounds(small_benchmark):
    with pytest.raises(ValueError, match="max_epochs=2"):
        fit(make_module(), small_benchmark, max_epochs=3)


def test_baselines_and_checkpoint_restores_codebooks_and_rankings(small_benchmark, tmp_path):
    from instsearch.formats import Benchmark

    module = make_module()
    trainer = fit(module, small_benchmark, tmp_path=tmp_path, callbacks=[RetrievalEvaluation(progress=False)])
    assert set(module.baseline_results) == {"off_the_shelf", "off_the_shelf_opq"}
    assert module.baseline_results["off_the_shelf"]["mAP@all"] != module.baseline_results["off_the_shelf_opq"]["mAP@all"]
    # database images are searched by the proposals they were trained with (their codes' proposals)
    loader = DatabaseImagesDataModule(str(small_benchmark)).benchmark_dataloaders()[0]
    images, metas = next(iter(loader))
    module.eval()
    searched = module.search_step((images, metas))
    assert len(searched.database) == len(images)
    for meta, regions in searched.database:
        assert torch.equal(regions.boxes, module.bank.boxes_of(meta.image_id))
        assert torch.equal(regions.scores, module.bank.scores_of(meta.image_id))
    path = tmp_path / "udq.ckpt"
    trainer.save_checkpoint(path)

    torch.manual_seed(123)  # a differently initialised network: everything must come from the checkpoint
    restored = UDQModule.load_from_checkpoint(path, net=UDQNet(**NET), map_location="cpu")
    assert torch.equal(restored.codebook.codebooks, module.codebook.codebooks)
    assert torch.equal(restored.bank.labels, module.bank.labels) and restored.fitted_round == 1
    bench = Benchmark.load(small_benchmark)
    loaders = [DatabaseImagesDataModule(str(small_benchmark)).benchmark_dataloaders()[0]]
    runs = []
    for m in (module, restored):
        result = evaluate(m, loaders, m.make_evaluator(bench), step=m.search_step, progress=False)
        runs.append({q: [(h.image, h.score) for h in hits] for q, hits in result.run.rankings.items()})
    assert runs[0] == runs[1] and len(runs[0]) == 4


def test_same_seed_same_codebooks_and_labels(small_benchmark):
    a, b = make_module(evaluate_baselines=False), make_module(evaluate_baselines=False)
    fit(a, small_benchmark)
    fit(b, small_benchmark)
    assert torch.equal(a.codebook.codebooks, b.codebook.codebooks) and torch.equal(a.bank.labels, b.bank.labels)
    assert torch.equal(a.net.fc_s.weight, b.net.fc_s.weight)


def test_resumed_run_equals_uninterrupted(small_benchmark, tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    whole = make_module(evaluate_baselines=False)
    fit(whole, small_benchmark, tmp_path=tmp_path / "a",
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                                   filename="{epoch}")])
    resumed = make_module(evaluate_baselines=False)
    fit(resumed, small_benchmark, tmp_path=tmp_path / "b", ckpt_path=tmp_path / "ckpt" / "epoch=0.ckpt")
    assert torch.equal(resumed.bank.labels, whole.bank.labels)
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-6), name


def test_refinement_changes_the_labels(small_benchmark):
    plain, refined = make_module(evaluate_baselines=False, rounds=0), make_module(evaluate_baselines=False, rounds=0,
                                                                                   refinement="cbr", refine_cells=8)
    fit(plain, small_benchmark, max_epochs=1)
    fit(refined, small_benchmark, max_epochs=1)
    assert plain.round_stats[0]["quantization_error"] != refined.round_stats[0]["quantization_error"]
    assert not torch.equal(plain.bank.labels, refined.bank.labels)


# ---------------------------------------------------------------- search side
def test_adc_search_needs_codebooks_and_refuses_whitening(small_benchmark):
    from instsearch.formats import Benchmark

    bench = Benchmark.load(small_benchmark)
    with pytest.raises(RuntimeError, match="ckpt_path"):
        make_module().make_evaluator(bench)
    codebook = OPQCodebook.fit(np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32), 2, 4)
    with pytest.raises(ValueError, match="whitening"):
        RetrievalEvaluator(bench, RetrievalConfig(whitening=True), quantizer=codebook)


def test_encoded_database_written_and_reloaded_ranks_the_same(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(600, 16)).astype(np.float32)
    store = RegionStore(image_ids=[f"im{i}" for i in range(60)], features=features,
                        image_index=np.repeat(np.arange(60), 10), boxes=rng.uniform(0, 50, (600, 4)).astype(np.float32),
                        scores=rng.uniform(size=600).astype(np.float32))
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    for l2_index in (OPQCodebook.fit(features, 4, 4, seed=0).to_faiss_index(), None):
        index = RegionIndex(store, l2_index=l2_index)
        saved = index.save(tmp_path / ("adc" if l2_index is not None else "exact"))
        again = RegionIndex.load(saved)
        for a, b in zip(index.search(queries, top_images=20), again.search(queries, top_images=20)):
            np.testing.assert_array_equal(a.images, b.images)
            np.testing.assert_array_equal(a.regions, b.regions)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)
        np.testing.assert_array_equal(again.store.boxes, store.boxes)  # the localisation boxes come back
        assert again.store.image_ids == store.image_ids
    with pytest.raises(FileNotFoundError, match="regions.npz"):
        RegionIndex.load(tmp_path / "nothing")


def test_missing_benchmark_is_named(tmp_path):
    dm = DatabaseImagesDataModule(str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match="absent.json.*instsearch-benchmark/1"):
        dm.prepare_data()


def test_rpn_phase_fit_changes_only_the_rpn(synthetic_root):
    from instsearch.datamodules.synthetic import SyntheticDataModule

    module = make_module(phase="rpn")
    module.optim.lr, module.optim.warmup_steps = 0.01, 0
    before = {k: v.clone() for k, v in module.state_dict().items()}
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, SyntheticDataModule(synthetic_root, batch_size=2))
    changed = {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("net.detector.rpn.") for k in changed)
    assert "train/loss_objectness" in trainer.callback_metrics


def test_label_dtype_holds_9_bit_codes():
    from instsearch.lightning_modules.udq import label_dtype

    codebook = OPQCodebook.fit(np.random.default_rng(0).normal(size=(1200, 8)).astype(np.float32), 2, 9, seed=0)
    codes = codebook.encode(np.random.default_rng(1).normal(size=(300, 8)).astype(np.float32))
    assert label_dtype(8) == torch.uint8 and label_dtype(9) == torch.int16
    assert codes.max() > 255 and torch.equal(codes.to(label_dtype(9)).long(), codes)


def test_two_process_round_passes_cover_every_image(small_benchmark, tmp_path):
    """DDP (2 CPU processes, gloo): each rank extracts its shard, rank 0 fits, every rank gets the
    codebooks; the checkpoint rank 0 writes holds the whole bank in database order."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from instsearch.formats import Benchmark

    module = make_module(evaluate_baselines=False)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last")])
    trainer.fit(module, DatabaseImagesDataModule(str(small_benchmark), batch_size=4))
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)["udq"]
    bank = ProposalBank.from_state(state["bank"])
    assert bank.image_ids == Benchmark.load(small_benchmark).database
    assert state["fitted_round"] == 1 and bank.labels.shape == (len(bank), 4) and len(bank) > 24
    codebook = OPQCodebook.from_state(state["codebook"])
    assert codebook.num_subspaces == 4 and codebook.num_codewords == 16


def test_shipped_config_fits_tests_and_writes_a_reloadable_index(small_benchmark, tmp_path, capsys):
    """configs/udq_synthetic.yaml, made small: `instsearch fit`, then `instsearch test` of its
    checkpoint writes run.json and the encoded database, which searches again without the network
    to the same ranking."""
    import yaml

    from instsearch.cli import main
    from instsearch.datamodules.benchmark import benchmark_dataloader
    from instsearch.eval.extract import extract_batch
    from instsearch.formats import Benchmark, Run
    from config_runs import CONFIGS

    config = yaml.safe_load((CONFIGS / "udq_synthetic.yaml").read_text())
    config["trainer"].update(max_epochs=2, enable_progress_bar=False, logger=[
        {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path), "name": "udq"}}])
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "ckpt")
    model = config["model"]["init_args"]
    model["net"]["init_args"].update(proposals_per_image=30, feature_dim=32)
    model.update(num_subspaces=4, nbits=4, rounds=1, progress=False, evaluate_baselines=False)
    config["data"]["init_args"].update(benchmark=str(small_benchmark), synthetic_preset=None)
    config["retrieval"] = {"every_n_epochs": 1, "progress": False}
    path = tmp_path / "udq.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert main(["test", "--config", str(path), "--ckpt_path", str(ckpt),
                 "--model.init_args.save_index", str(tmp_path / "index")]) == 0
    out = capsys.readouterr().out
    run = Run.load(next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("run: ")))

    # a --model option on the command line wins over the checkpoint's hyper-parameters
    assert main(["test", "--config", str(path), "--ckpt_path", str(ckpt), "--model.init_args.search", "exact"]) == 0
    exact = Run.load(next(line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()
                          if line.startswith("run: ")))
    assert exact.rankings != run.rankings  # real-valued f_t, not codes

    index = RegionIndex.load(tmp_path / "index")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["udq"]
    assert index.store.image_ids == Benchmark.load(small_benchmark).database
    assert len(index.store) == len(state["bank"]["boxes"])  # every stored proposal, as codes
    module = UDQModule.load_from_checkpoint(ckpt, net=UDQNet(**{**NET, "proposals_per_image": 30}),
                                            map_location="cpu").eval()
    queries = extract_batch(module.net, *next(iter(benchmark_dataloader(small_benchmark, "queries", 8)))).queries
    rankings = index.search(torch.stack([q.feature for q in queries]))
    for q, ranking in zip(queries, rankings):
        assert [index.store.image_ids[i] for i in ranking.images[:5]] == \
            [h.image for h in run.rankings[q.meta.query_id][:5]]


def test_bf16_mixed_precision_trains(small_benchmark):
    module = make_module(evaluate_baselines=False, rounds=0)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=1, precision="bf16-mixed", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, limit_train_batches=2)
    trainer.fit(module, DatabaseImagesDataModule(str(small_benchmark), batch_size=4))
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and module.codebook is not None


def test_final_refit_fits_opq_on_the_final_features(small_benchmark):
    module = make_module(evaluate_baselines=False, final_refit=True)
    fit(module, small_benchmark)
    final = module.round_stats[-1]
    assert [s["round"] for s in module.round_stats] == [0.0, 1.0, 2.0] and final["final_refit"] == 1.0
    assert final["quantization_error"] < final["previous_quantization_error"]
    module.net.eval()
    features = module._extract_features(module.trainer.datamodule, 0, 1)
    assert torch.equal(module.bank.labels.long(), module.codebook.encode(features))  # H = codes of F_max
