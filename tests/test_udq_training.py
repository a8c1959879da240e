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
from instsearch.eval.evaluator import RetrievalConfig, extract_and_score
from instsearch.eval.search import RegionIndex, RegionStore
from instsearch.lightning_modules.base import OptimizerConfig
from instsearch.lightning_modules.udq import UDQModule
from instsearch.lightning_modules.udq_bank import ProposalBank
from instsearch.eval.searchers import FaissSearcher
from instsearch.networks.product_quantizer import OPQCodebook
from instsearch.networks.udq import UDQNet, pca_projection

NET = dict(backbone="small", min_size=160, max_size=333, proposals_per_image=30, feature_dim=32)
MODULE = dict(num_subspaces=4, nbits=4, rounds=1, epochs_per_round=1, progress=False,
              # the shipped config's rule at this size (M 4, K 16, a randomly initialised network):
              # λ equalising the two gradients at round 0 (grad_sep 5.1, grad_dis 5.0), FC_S and the
              # classifiers at 1e-3, the pretrained layers at 1e-5
              lambda_dis=6.0, head_lr_multiplier=100.0)


def make_module(**options) -> UDQModule:
    torch.manual_seed(0)
    options.setdefault("optim", OptimizerConfig(lr=1e-5, warmup_steps=0))
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
    """At the first batch of each round (labels fresh, no step taken yet): the features the module
    extracts at that moment (eval mode), the labels, faiss's encoding of the features, the fresh
    classifiers' argmax, the batch's images; after that batch's backward pass the gradients of FC_S,
    the box head and the classifiers, and the step's per-proposal ``L_dis``."""

    def __init__(self):
        self.rounds = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx:
            return
        module.net.eval()
        features = module._extract_features(trainer.datamodule, 0, 1)
        module.net.train()
        with torch.no_grad():
            argmax = module.udq_loss.classifiers(module.label_codebook.rotate(features)).argmax(dim=2)
        self.rounds.append({"features": features, "labels": module.bank.labels.clone(),
                            "codebook": module.label_codebook,
                            "encoded": module.codebook.encode(features), "argmax": argmax,
                            "images": [m.image_id for im, m in zip(*batch) if im is not None]})

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if "grads" not in self.rounds[-1]:
            parameters = {"fc_s": module.net.fc_s.weight, "classifiers": module.udq_loss.classifiers.weight,
                          "box_head": next(module.net.detector.roi_heads.box_head.parameters())}
            self.rounds[-1]["grads"] = {k: None if p.grad is None else float(p.grad.abs().sum())
                                        for k, p in parameters.items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if not batch_idx:
            self.rounds[-1]["L_dis"] = outputs["L_dis_per_proposal"].cpu()


def test_rounds_label_with_faiss_codes_and_the_first_step_trains_against_them(small_benchmark):
    """Per round: labels = faiss's codes of f_t; the classifiers start as the nearest-codeword rule
    (argmax = label); the first training step (training mode, BatchNorm statistics frozen) computes
    exactly the per-proposal ‖R f − φ(f)‖² of the round pass, rotation included; its gradient reaches
    FC_S, the box head and the classifiers (a detached feature would not)."""
    module, probe = make_module(evaluate_baselines=False), RoundProbe()
    fit(module, small_benchmark, callbacks=[probe])
    assert [s["round"] for s in module.round_stats] == [0.0, 1.0]
    assert len(module.bank) == module.round_stats[0]["proposals"] > 24  # several proposals per image
    assert len(probe.rounds) == 2
    for seen, stats in zip(probe.rounds, module.round_stats):
        labels = seen["labels"].long()
        assert seen["labels"].dtype == torch.uint8
        assert torch.equal(labels, seen["encoded"])  # the pseudo-labels are faiss's codes of f_t
        assert torch.equal(seen["argmax"], labels)  # classifiers initialised at the nearest codeword
        assert stats["label_accuracy_start"] == 1.0
        rows = torch.cat([torch.arange(*module.bank.span(i)) for i in seen["images"]])
        codebook = seen["codebook"]
        residual = (codebook.rotate(seen["features"][rows]) - codebook.decode(labels[rows])).pow(2).sum(dim=1)
        torch.testing.assert_close(seen["L_dis"], residual, rtol=1e-4, atol=1e-5)
        assert all(g is not None and g > 0 for g in seen["grads"].values()), seen["grads"]


def test_a_round_learns_its_labels(small_benchmark):
    """Over each round, on the whole bank: L_sep falls, the classifiers still predict their labels far
    above chance (1/K), and the features move across codeword cells (codes changed under the round's
    own codebook); the training batches' means are logged every epoch."""
    module = make_module(evaluate_baselines=False)
    trainer = fit(module, small_benchmark)
    for stats in module.round_stats:
        assert stats["L_sep_end"] < stats["L_sep_start"], stats
        assert stats["label_accuracy_end"] > 0.5, stats
        assert 0 < stats["codes_changed"] <= 1, stats
        assert stats["grad_sep"] > 0 and stats["grad_dis"] > 0
    assert {"udq/L_sep", "udq/L_dis", "udq/label_accuracy"} <= set(trainer.callback_metrics)
    # FC_S and the classifiers at their own learning rate, the backbone stages and box head at optim.lr
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(module.optim.lr)
    assert groups["head"]["lr"] == pytest.approx(module.optim.lr * module.head_lr_multiplier)
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in [*module.net.fc_s.parameters(),
                                                                           *module.udq_loss.parameters()]}
    assert id(next(module.net.detector.roi_heads.box_head.parameters())) in {id(p) for p in
                                                                               groups["backbone"]["params"]}


def test_null_control_changes_no_code(small_benchmark):
    """Learning rate 0 and one OPQ seed for every round: the features do not move, no code changes
    and the next refit gives the very same labels (they "changed" before only because OPQ was
    re-seeded)."""
    module, probe = make_module(evaluate_baselines=False, reseed_each_round=False), RoundProbe()
    module.optim.lr = 0.0
    fit(module, small_benchmark, callbacks=[probe])
    assert [s["codes_changed"] for s in module.round_stats] == [0.0, 0.0]
    assert torch.equal(probe.rounds[0]["labels"], probe.rounds[1]["labels"])
    assert torch.equal(probe.rounds[0]["features"], probe.rounds[1]["features"])


def test_batchnorm_statistics_stay_fixed_in_the_udq_phase():
    module = make_module()
    module.train()
    norms = [m for m in module.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and module.net.fc_s.training
    module.net.train()  # whoever calls it
    assert not any(m.training for m in norms)
    assert any(m.training for m in make_module(freeze_batchnorm=False).net.train().modules()
               if isinstance(m, torch.nn.BatchNorm2d))


def test_epochs_follow_the_rounds_and_fast_dev_run_runs_every_round(small_benchmark):
    module = make_module(evaluate_baselines=False, final_statistics=False)
    trainer = fit(module, small_benchmark, max_epochs=None)  # unset: (rounds + 1) x epochs_per_round
    assert trainer.current_epoch == 2 and [s["round"] for s in module.round_stats] == [0.0, 1.0]
    with pytest.raises(ValueError, match="trainer.max_epochs is 3.*set it to 2"):
        fit(make_module(), small_benchmark, max_epochs=3)
    module = make_module()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(fast_dev_run=True, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DatabaseImagesDataModule(str(small_benchmark), batch_size=4))
    assert trainer.global_step == 2 and [s["round"] for s in module.round_stats] == [0.0, 1.0]
    assert len(module.bank) >= 4 * 16  # the first batches of the round pass: proposals for K = 16 codewords
    assert not module.baseline_results and "codes_changed" in module.round_stats[-1]


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
        result = extract_and_score(m, loaders, m.make_evaluator(bench), step=m.search_step, progress=False)
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


def test_refinement_labels_from_targets_database_codes_from_features(small_benchmark):
    """With refinement the labels come from OPQ on the refined targets, the codebooks that encode the
    database from the features themselves (Algorithm 1 line 8): the reported quantisation error is
    the encoded database's, and equals plain UDQ's fit on the same features."""
    plain = make_module(evaluate_baselines=False, rounds=0, final_statistics=False)
    refined = make_module(evaluate_baselines=False, rounds=0, final_statistics=False, refinement="cbr",
                          refine_cells=8)
    refined.optim.lr = 0.0  # the features searched below are the ones the codebooks were fitted on
    fit(plain, small_benchmark, max_epochs=1)
    fit(refined, small_benchmark, max_epochs=1)
    stats = refined.round_stats[0]
    assert refined.label_codebook is not refined.codebook
    assert not torch.equal(plain.bank.labels, refined.bank.labels)
    assert stats["label_quantization_error"] != stats["quantization_error"]
    assert stats["quantization_error"] == pytest.approx(plain.round_stats[0]["quantization_error"], rel=1e-5)
    refined.eval()
    loader = DatabaseImagesDataModule(str(small_benchmark)).benchmark_dataloaders()[0]
    database = [f for images, metas in loader
                for _, regions in refined.search_step((images, metas)).database for f in [regions.features]]
    encoded = torch.cat(database)
    assert len(encoded) == len(refined.bank)
    assert refined.codebook.quantization_error(encoded) == pytest.approx(stats["quantization_error"], rel=1e-4)
    assert torch.equal(refined.bank.codes.long(), refined.codebook.encode(encoded))


# ---------------------------------------------------------------- search side
def test_adc_search_needs_codebooks_and_refuses_whitening(small_benchmark):
    from instsearch.formats import Benchmark

    bench = Benchmark.load(small_benchmark)
    with pytest.raises(RuntimeError, match="ckpt_path"):
        make_module().make_evaluator(bench)
    module = make_module()
    module.codebook = OPQCodebook.fit(np.random.default_rng(0).normal(size=(500, 8)).astype(np.float32), 2, 4)
    module.retrieval = RetrievalConfig(whitening=True)
    with pytest.raises(ValueError, match="whitening"):
        module.make_evaluator(bench)


def test_encoded_database_written_and_reloaded_ranks_the_same(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(600, 16)).astype(np.float32)
    store = RegionStore(image_ids=[f"im{i}" for i in range(60)], features=features,
                        image_index=np.repeat(np.arange(60), 10), boxes=rng.uniform(0, 50, (600, 4)).astype(np.float32),
                        scores=rng.uniform(size=600).astype(np.float32))
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    adc = FaissSearcher.adc(OPQCodebook.fit(features, 4, 4, seed=0).to_faiss_index())
    for name, searcher in (("adc", adc), ("exact", None)):
        index = RegionIndex(store, searcher)
        saved = index.save(tmp_path / name)
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


def test_database_only_collection_trains_without_baselines(small_benchmark, tmp_path, caplog):
    """A user's own folder (``instsearch convert folder``, no queries): the rounds train, the round-0
    baselines say they are skipped instead of failing on a benchmark with nothing to score."""
    import json
    import logging

    data = json.loads(small_benchmark.read_text())
    data.update(queries=[], ground_truth={})
    collection = small_benchmark.with_name("database_only.json")
    collection.write_text(json.dumps(data))
    module = make_module(rounds=0, evaluate_baselines=True)
    with caplog.at_level(logging.INFO):
        fit(module, collection, max_epochs=1)
    assert not module.baseline_results and module.round_stats[0]["proposals"] > 0
    assert "no queries (a database-only collection), baselines skipped" in caplog.text


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
    from instsearch.lightning_modules.udq_bank import label_dtype

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
    from instsearch.eval.extraction import extract_batch
    from instsearch.formats import Benchmark, Run
    from config_runs import CONFIGS, load_config

    config = load_config(CONFIGS / "udq_synthetic.yaml")
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


def test_exact_search_ranks_by_l2_distance_as_eq_2(small_benchmark):
    """``search: exact`` scores a proposal by ``1/‖f_q − f_p‖`` (Eq. 2) and an image by its best
    proposal (Eq. 1); on features that are not unit-norm this differs from the inner product. The
    evaluator's ranking equals an independent numpy L2 ranking."""
    from instsearch.eval.extraction import QueryFeature, SearchBatch
    from instsearch.formats import Benchmark
    from instsearch.structures import ImageMeta, Regions

    bench = Benchmark.load(small_benchmark)
    module = UDQModule(UDQNet(**{**NET, "l2_normalize": False}), **{**MODULE, "search": "exact"})
    evaluator = module.make_evaluator(bench)
    rng = np.random.default_rng(0)
    d = module.net.feature_dim
    counts = rng.integers(1, 6, len(bench.database))
    features = [rng.normal(size=(c, d)).astype(np.float32) * rng.uniform(0.2, 5.0, (c, 1)).astype(np.float32)
                for c in counts]
    queries = rng.normal(size=(len(bench.queries), d)).astype(np.float32) * 2
    batch = SearchBatch()
    for image_id, f in zip(bench.database, features):
        batch.database.append((ImageMeta(image_id, (100, 100)), Regions(
            boxes=torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(len(f), 1), scores=torch.ones(len(f)),
            features=torch.from_numpy(f), image_size=(100, 100))))
    for q, f in zip(bench.queries, queries):
        batch.queries.append(QueryFeature(ImageMeta(q.image, (100, 100), query_id=q.id), torch.from_numpy(f)))
    evaluator.process(batch)
    run = evaluator.compute().run
    inner_product_differs = False
    for q, f in zip(bench.queries, queries):
        nearest = np.array([np.sqrt(((x - f) ** 2).sum(axis=1)).min() for x in features])
        order = np.argsort(nearest, kind="stable")
        hits = run.rankings[q.id]
        assert [h.image for h in hits] == [bench.database[i] for i in order]
        np.testing.assert_allclose([h.score for h in hits], 1 / nearest[order], rtol=1e-4)
        best_ip = np.array([(x @ f).max() for x in features])
        inner_product_differs |= list(np.argsort(-best_ip, kind="stable")) != list(order)
    assert inner_product_differs  # the case the L2 rule exists for
