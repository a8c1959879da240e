"""UDQ training (Algorithm 1 of Unsupervised Deep Quantization): rounds of {extract every proposal's
FC_S feature, optionally refine, refit OPQ, train on the new pseudo-labels}.

The network is :class:`~instsearch.networks.udq.UDQNet` (``model.net``); the data the database
images of a benchmark, without labels
(:class:`~instsearch.datamodules.unlabelled.DatabaseImagesDataModule`). Two phases (``phase``):

* ``"rpn"``: the RPN is trained on a detection DataModule (VOC 2007 in the paper, the synthetic
  training split on CPU) with everything else fixed -- "we fix the backbone network and train the
  RPN on PASCAL VOC";
* ``"udq"`` (default): the feature is trained. Training runs ``rounds + 1`` rounds of
  ``epochs_per_round`` epochs (``trainer.max_epochs`` must be their product). At the start of
  round ``r`` (:meth:`UDQModule.on_train_epoch_start`):

  1. every database image's proposals are extracted once, the first time (``proposals_per_image``
     per image, kept fixed with their pseudo-labels in a :class:`ProposalBank`), and in round 0
     FC_S is initialised as the PCA projection of the off-the-shelf RoI features ("module 1:
     quantization model initialization", fed by the RPN's features);
  2. the FC_S features ``f_t`` of every stored proposal are extracted (batched, each DDP rank its
     shard of images, gathered);
  3. optional refinement (``refinement``: BFR Eq. 11, PBR Eq. 12, CBR Eq. 13);
  4. OPQ (rotation + ``M`` codebooks of ``K = 2^nbits`` codewords) is refitted on them (Eq. 6) and
     their codes become the pseudo-labels ``h_t``; the subspace classifiers restart;
  5. the round trains ``L = L_sep + λ·L_dis`` (Eq. 7) on the stored proposals of each batch.

  Rounds ``1..rounds`` are the paper's "module 2" iterations (2 by default: "we choose to
  iterate 2 times").

Search (``search="adc"``, default): the database's proposals are encoded with the current round's
codebooks and searched by asymmetric distance, Sim = max over an image's proposals of
``1/‖f_q − φ(f_p)‖`` (Eqs. 1, 2, 5); ``"exact"`` searches the real-valued ``f_t`` by the same rule
(what the paper calls the real-valued representation). Algorithm 1's "final codebooks" (its line 8)
are by default the last round's: the features were trained towards exactly those codewords
(``L_dis``). With ``final_refit`` OPQ is fitted once more on the final features at the end of the
last epoch (before that epoch's evaluation and checkpoint), and their codes become ``H``.

With ``evaluate_baselines`` round 0 also scores the paper's two baselines (its Fig. 3) on the
DataModule's benchmark, right after initialisation and before any training: ``Off-the-shelf``
(the PCA-``d`` RoI features, exact search) and ``Off-the-shelf-OPQ`` (the same features, OPQ
fitted on them, ADC search); logged as ``baseline/off_the_shelf/*`` and
``baseline/off_the_shelf_opq/*``.

Checkpoints hold the round, the codebooks and the proposal bank with its labels
(``checkpoint["udq"]``), so ``instsearch test --ckpt_path`` searches with the trained codebooks and
a resumed run continues the round it was in with the same labels.

Pseudo-label memory: ``G x M`` bytes for ``K ≤ 256`` (``uint8``; 8 MB for one million proposals at
M = 8), twice that for ``K = 512``; the boxes add 16 bytes per proposal. A round boundary holds
every proposal's feature on each rank (``4·d`` bytes: 1.2 GB per million proposals at d = 300).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator
from instsearch.eval.extract import SearchBatch
from instsearch.lightning_modules.base import OptimizerConfig, RegionSearchModule
from instsearch.losses.udq import UDQLoss
from instsearch.networks.product_quantizer import OPQCodebook, faiss_threads
from instsearch.networks.udq import UDQNet, pca_projection
from instsearch.networks.udq_refine import refine_bfr, refine_cbr, refine_pbr
from instsearch.structures import Regions

log = logging.getLogger(__name__)

__all__ = ["UDQModule", "ProposalBank"]

Refinement = Literal["none", "bfr", "pbr", "cbr"]


@dataclass
class ProposalBank:
    """Every training proposal, fixed per image, with its pseudo-labels.

    ``boxes`` are in original-image pixels, concatenated image after image (``offsets[i]`` to
    ``offsets[i + 1]`` are image ``image_ids[i]``'s), ``scores`` the RPN's objectness; ``labels``
    ``(G, M)`` are the current round's codes (``uint8`` for ``K ≤ 256``, ``int16`` above), ``None``
    before the first round.
    """

    image_ids: list[str]
    boxes: Tensor  # (G, 4) float32
    scores: Tensor  # (G,) float32
    offsets: Tensor  # (N + 1,) int64
    labels: Optional[Tensor] = None  # (G, M)

    def __post_init__(self) -> None:
        self._rows = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._rows

    def span(self, image_id: str) -> tuple[int, int]:
        i = self._rows.get(image_id)
        if i is None:
            raise KeyError(f"image {image_id!r} has no stored proposals (not a database image of the round passes)")
        return int(self.offsets[i]), int(self.offsets[i + 1])

    def boxes_of(self, image_id: str) -> Tensor:
        a, b = self.span(image_id)
        return self.boxes[a:b]

    def scores_of(self, image_id: str) -> Tensor:
        a, b = self.span(image_id)
        return self.scores[a:b]

    def labels_of(self, image_id: str) -> Tensor:
        a, b = self.span(image_id)
        return self.labels[a:b]

    @classmethod
    def from_images(cls, image_ids: list[str], boxes: list[Tensor], scores: list[Tensor]) -> "ProposalBank":
        counts = torch.tensor([len(b) for b in boxes], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        cat = torch.cat(boxes).float() if boxes else torch.zeros(0, 4)
        cat_scores = torch.cat(scores).float() if scores else torch.zeros(0)
        return cls(list(image_ids), cat.reshape(-1, 4).contiguous(), cat_scores.contiguous(), offsets)

    def to_state(self) -> dict:
        return {"image_ids": list(self.image_ids), "boxes": self.boxes.clone(), "scores": self.scores.clone(),
                "offsets": self.offsets.clone(), "labels": None if self.labels is None else self.labels.clone()}

    @classmethod
    def from_state(cls, state: dict) -> "ProposalBank":
        return cls(list(state["image_ids"]), state["boxes"], state["scores"], state["offsets"], state["labels"])


def label_dtype(nbits: int) -> torch.dtype:
    """The smallest integer type holding codes of ``nbits`` bits."""
    return torch.uint8 if nbits <= 8 else torch.int16


def _scale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Boxes from an ``(h, w)`` frame to another."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def _all_gather(obj):
    """Every rank's ``obj`` as a list (``[obj]`` without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def _broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class UDQModule(RegionSearchModule):
    """UDQ: the LightningModule of Algorithm 1 (see the module docstring).

    Args:
        net: the :class:`UDQNet`.
        phase: ``"udq"`` (train the feature) or ``"rpn"`` (pre-train the RPN, all else fixed).
        num_subspaces: ``M``.
        nbits: bits per code, ``K = 2^nbits`` (8: K = 256 as the paper's Paris6K; 9: K = 512, Oxford5K;
            4 with M = 16 gives faiss's fast-scan size).
        lambda_dis: ``λ`` of Eq. 7 (0.01).
        rounds: iterations of module 2 after the initialisation round (2).
        epochs_per_round: training epochs per round.
        refinement: ``"none"``, ``"bfr"`` (Eq. 11), ``"pbr"`` (Eq. 12) or ``"cbr"`` (Eq. 13), applied
            before every OPQ fit.
        refine_neighbours: ``S``; ``None`` = the paper's 10 for BFR, 50 for PBR.
        refine_cells: k-means cells of PBR / CBR; ``None`` = ``round(sqrt(G))`` (the paper gives none).
        opq_iterations: OPQ's alternating iterations (faiss's default 50).
        pca_samples: off-the-shelf features the PCA initialisation is fitted on at most (a seeded
            draw of images; all proposals of a drawn image are used).
        search: ``"adc"`` (compact codes, the paper's search) or ``"exact"`` (real-valued ``f_t``).
        database_proposals: ``"stored"`` (a database image is searched by the proposals it was
            trained with, see :meth:`search_step`) or ``"detect"`` (proposals detected again).
        evaluate_baselines: score Off-the-shelf and Off-the-shelf-OPQ in round 0.
        faiss_threads: OpenMP threads of OPQ / k-means (fixed for repeatable fits; ``None`` = faiss's).
        seed: seeds the PCA draw, OPQ and k-means (round ``r`` uses ``seed + r``).
        progress: progress bars on the round passes.
        final_refit: refit OPQ on the final features after the last epoch (Algorithm 1, line 8);
            ``False``: the last round's codebooks are the final ones.
        save_index: a folder where ``instsearch test`` writes the searched database (faiss index of
            the codes + every proposal's image, box and score; :meth:`RegionIndex.save`), which
            :meth:`~instsearch.eval.search.RegionIndex.load` searches again without the network.
    """

    box_iou_types = ()  # class-agnostic proposals: no detection AP

    def __init__(self, net: UDQNet, phase: Literal["udq", "rpn"] = "udq", num_subspaces: int = 8, nbits: int = 8,
                 lambda_dis: float = 0.01, rounds: int = 2, epochs_per_round: int = 1,
                 refinement: Refinement = "none", refine_neighbours: Optional[int] = None,
                 refine_cells: Optional[int] = None, opq_iterations: int = 50, pca_samples: int = 100_000,
                 search: Literal["adc", "exact"] = "adc", database_proposals: Literal["stored", "detect"] = "stored",
                 evaluate_baselines: bool = True,
                 faiss_threads: Optional[int] = 1, seed: int = 0, progress: bool = True,
                 save_index: Optional[str] = None, final_refit: bool = False,
                 optim: Optional[OptimizerConfig] = None, retrieval: Optional[RetrievalConfig] = None):
        super().__init__(optim=optim or OptimizerConfig(lr=0.001, warmup_steps=0), retrieval=retrieval)
        # where to write files and whether to draw progress bars belong to a run, not to the model: a
        # checkpoint's hyper-parameters would override them at `instsearch test --ckpt_path`
        self.save_hyperparameters(ignore=["net", "save_index", "progress"])
        for name, value, allowed in (("phase", phase, ("udq", "rpn")), ("search", search, ("adc", "exact")),
                                     ("database_proposals", database_proposals, ("stored", "detect")),
                                     ("refinement", refinement, ("none", "bfr", "pbr", "cbr"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if net.feature_dim % num_subspaces:
            raise ValueError(f"feature_dim {net.feature_dim} is not divisible by num_subspaces={num_subspaces}: "
                             f"set model.net.init_args.feature_dim to a multiple (e.g. "
                             f"{net.feature_dim // num_subspaces * num_subspaces})")
        if rounds < 0 or epochs_per_round < 1:
            raise ValueError(f"need rounds >= 0 and epochs_per_round >= 1, got {rounds}, {epochs_per_round}")
        self.net = net
        self.udq_loss = UDQLoss(net.feature_dim, num_subspaces, 2 ** nbits, lambda_dis=lambda_dis)
        self.phase, self.search, self.database_proposals = phase, search, database_proposals
        self.num_subspaces, self.nbits = int(num_subspaces), int(nbits)
        self.rounds, self.epochs_per_round = int(rounds), int(epochs_per_round)
        self.refinement, self.refine_neighbours, self.refine_cells = refinement, refine_neighbours, refine_cells
        self.opq_iterations, self.pca_samples = int(opq_iterations), int(pca_samples)
        self.evaluate_baselines, self.faiss_threads = bool(evaluate_baselines), faiss_threads
        self.seed, self.progress, self.save_index = int(seed), bool(progress), save_index
        self.final_refit = bool(final_refit)
        self.codebook: Optional[OPQCodebook] = None
        self.bank: Optional[ProposalBank] = None
        self.fitted_round = -1
        self.round_stats: list[dict[str, float]] = []
        self.baseline_results: dict[str, dict] = {}
        self._freeze_for_phase()

    def _freeze_for_phase(self) -> None:
        """``rpn``: only the RPN trains. ``udq``: the RPN and the unused class head stay fixed (the
        proposals must not move under their labels); box head, FC_S, the unfrozen backbone stages
        and the subspace classifiers train."""
        if self.phase == "rpn":  # the whole backbone fixed, batch-norm statistics included
            self.net.backbone.freeze(len(self.net.backbone.stage_modules()))
        rpn = set(map(id, self.net.rpn.parameters()))
        fixed = set(map(id, self.net.detector.roi_heads.box_predictor.parameters()))
        for p in self.parameters():
            if self.phase == "rpn":
                p.requires_grad_(id(p) in rpn)
            elif id(p) in rpn or id(p) in fixed:
                p.requires_grad_(False)

    # ------------------------------------------------------------------ schedule
    @property
    def total_epochs(self) -> int:
        return (self.rounds + 1) * self.epochs_per_round

    def round_of_epoch(self, epoch: int) -> int:
        return min(epoch // self.epochs_per_round, self.rounds)

    def on_fit_start(self) -> None:
        if self.phase == "rpn":
            return super().on_fit_start()
        if not self.net.training:
            raise RuntimeError("UDQNet is in eval mode at the start of training; call .train() first")
        if self.trainer.max_epochs != self.total_epochs:
            raise ValueError(f"UDQ trains (rounds + 1) x epochs_per_round = ({self.rounds} + 1) x "
                             f"{self.epochs_per_round} = {self.total_epochs} epochs: set trainer.max_epochs="
                             f"{self.total_epochs} (it is {self.trainer.max_epochs})")
        if not hasattr(self.trainer.datamodule, "round_dataloader"):
            raise TypeError(f"UDQ trains on unlabelled database images: use "
                            f"instsearch.datamodules.unlabelled.DatabaseImagesDataModule, not "
                            f"{type(self.trainer.datamodule).__name__}")

    def on_train_epoch_start(self) -> None:
        if self.phase != "udq":
            return
        r = self.round_of_epoch(self.current_epoch)
        if r > self.fitted_round:
            self.start_round(r)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """With ``final_refit``, the last batch of the last epoch ends with Algorithm 1's line 8 --
        here rather than at epoch end, which callbacks (evaluation, checkpoints) see first."""
        if (self.phase == "udq" and self.final_refit and self.current_epoch == self.total_epochs - 1
                and batch_idx == self.trainer.num_training_batches - 1):
            self.refit_final()

    def refit_final(self) -> None:
        """OPQ fitted on the final features (no refinement: line 8 minimises ``L_pq`` on
        ``F_max``); their codes replace the labels as the final compact codes ``H``."""
        features = self._round_features().numpy()
        fitted = None
        if self.trainer.is_global_zero:
            stats = {"round": float(self.rounds + 1), "final_refit": 1.0,
                     "previous_quantization_error": self.codebook.quantization_error(features)}
            fitted = self._fit_labels(features, self.seed + self.rounds + 1, stats)
        self._adopt(fitted)
        self._publish(self.round_stats[-1], "UDQ final codebooks")

    # ------------------------------------------------------------------ a round boundary
    def start_round(self, r: int) -> None:
        """Steps 1-4 of a round (module docstring): features, refinement, OPQ, labels."""
        features = self._round_features().numpy()
        fitted, baseline_codebook = None, None
        if self.trainer.is_global_zero:
            stats = {"round": float(r), "proposals": float(len(self.bank)),
                     "feature_norm": float(np.linalg.norm(features, axis=1).mean())}
            with faiss_threads(self.faiss_threads):
                targets = self._refine(features, self.seed + r)
            fitted = self._fit_labels(targets, self.seed + r, stats)
            if r == 0 and self.evaluate_baselines and self.refinement != "none":
                # Off-the-shelf-OPQ is OPQ on the off-the-shelf features themselves, not on refined ones
                baseline_codebook = self._fit_opq(features, self.seed)
        previous = self.bank.labels
        self._adopt(fitted)
        stats = self.round_stats[-1]
        if previous is not None:
            # codeword indices are arbitrary per fit, so this measures re-labelling, not progress
            stats["labels_changed"] = float((previous != self.bank.labels).float().mean())
        self.udq_loss.classifiers.reset_parameters()
        self._reset_optimizer_state(self.udq_loss.parameters())
        self.fitted_round = r
        self._publish(stats, f"UDQ round {r}")
        if r == 0 and self.evaluate_baselines:
            self._evaluate_baselines(baseline_codebook or self.codebook)

    def _round_features(self) -> Tensor:
        """Every stored proposal's ``f_t`` (``(G, d)``, bank order), the network in eval mode; the
        first time, the proposals are stored and FC_S initialised first."""
        dm = self.trainer.datamodule
        rank, world = self.trainer.global_rank, self.trainer.world_size
        was_training = self.net.training
        self.net.eval()
        try:
            if self.bank is None:
                self._collect_proposals(dm, rank, world)
            return self._extract_features(dm, rank, world)
        finally:
            self.net.train(was_training)

    def _fit_opq(self, features: np.ndarray, seed: int) -> OPQCodebook:
        with faiss_threads(self.faiss_threads):
            return OPQCodebook.fit(features, self.num_subspaces, self.nbits, seed=seed,
                                   opq_iterations=self.opq_iterations)

    def _fit_labels(self, targets: np.ndarray, seed: int, stats: dict[str, float]) -> tuple:
        """OPQ on ``targets`` and their codes (rank 0), with the quantisation error in ``stats``:
        what :meth:`_adopt` hands every rank."""
        codebook = self._fit_opq(targets, seed)
        with faiss_threads(self.faiss_threads):  # the rotation's matrix product rounds per thread count
            codes = codebook.encode(targets)
        stats["quantization_error"] = codebook.quantization_error(targets, codes)
        return codebook.to_state(), codes.to(label_dtype(self.nbits)), stats

    def _adopt(self, fitted: Optional[tuple]) -> None:
        """Rank 0's ``(codebook state, labels, stats)`` become every rank's codebook, labels and
        latest round statistics."""
        state, labels, stats = _broadcast(fitted)
        self.codebook = OPQCodebook.from_state(state)
        self.bank.labels = labels
        self.round_stats.append(stats)

    def _publish(self, stats: dict[str, float], title: str) -> None:
        for logger in self.loggers:
            logger.log_metrics({f"udq/{k}": v for k, v in stats.items()}, step=self.global_step)
        rank_zero_info(f"{title}: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))

    def _refine(self, features: np.ndarray, seed: int) -> np.ndarray:
        if self.refinement == "none":
            return features
        cells = self.refine_cells or max(1, int(round(np.sqrt(len(features)))))
        if self.refinement == "bfr":
            return refine_bfr(features, num_neighbours=self.refine_neighbours or 10)
        if self.refinement == "pbr":
            return refine_pbr(features, n_cells=cells, num_neighbours=self.refine_neighbours or 50, seed=seed)
        return refine_cbr(features, n_cells=cells, seed=seed)

    def _reset_optimizer_state(self, params) -> None:
        """The restarted classifiers must not inherit the previous round's momentum."""
        if self._trainer is None or not self.trainer.optimizers:
            return
        params = list(params)
        for optimizer in self.trainer.optimizers:
            for p in params:
                optimizer.state.pop(p, None)

    def _round_batches(self, dm, rank: int, world: int, desc: str):
        from tqdm.auto import tqdm

        loader = dm.round_dataloader(rank, world)
        for images, metas in tqdm(loader, desc=desc, disable=not (self.progress and rank == 0), leave=False):
            pairs = [(im.to(self.device), m) for im, m in zip(images, metas) if im is not None]
            if pairs:
                yield pairs

    @torch.no_grad()
    def _collect_proposals(self, dm, rank: int, world: int) -> None:
        """First pass: every image's proposals (kept, original pixels) and, for a seeded draw of
        images, the off-the-shelf features the PCA initialisation of FC_S is fitted on."""
        bench = dm.load_benchmark()
        order = np.random.default_rng(self.seed).permutation(len(bench.database))
        take = max(1, int(np.ceil(self.pca_samples / self.net.proposals_per_image)))
        for_pca = {bench.database[i] for i in order[:take]}
        ids, proposals, samples = [], [], []
        for pairs in self._round_batches(dm, rank, world, "UDQ proposals"):
            out = self.net.proposals_with_representations([im for im, _ in pairs])
            for (b, s, reps), (im, meta) in zip(out, pairs):
                ids.append(meta.image_id)
                proposals.append((_scale_boxes(b, tuple(im.shape[-2:]), meta.orig_size).cpu(), s.float().cpu()))
                if meta.image_id in for_pca:
                    samples.append(reps.cpu())
        parts = _all_gather((ids, proposals,
                             torch.cat(samples) if samples else torch.zeros(0, self.net.representation_dim)))
        merged = {i: p for part_ids, part_proposals, _ in parts for i, p in zip(part_ids, part_proposals)}
        ordered = [i for i in bench.database if i in merged]
        self.bank = ProposalBank.from_images(ordered, [merged[i][0] for i in ordered], [merged[i][1] for i in ordered])
        if self.trainer.is_global_zero:
            projection = pca_projection(torch.cat([p[2] for p in parts]), self.net.feature_dim)
        else:
            projection = None
        self.net.set_projection(*_broadcast(projection))

    def _stored_boxes(self, pairs) -> list[Tensor]:
        """Each image's stored proposals in the pixels of the served ``(image, meta)``."""
        return [_scale_boxes(self.bank.boxes_of(m.image_id), m.orig_size, tuple(im.shape[-2:])).to(im)
                for im, m in pairs]

    @torch.no_grad()
    def _stored_features(self, pairs) -> list[Tensor]:
        """Each image's ``f_t`` of its stored proposals (float32, CPU), one network pass."""
        boxes = self._stored_boxes(pairs)
        features = self.net.box_features([im for im, _ in pairs], boxes).float().cpu()
        return list(features.split([len(b) for b in boxes]))

    @torch.no_grad()
    def _extract_features(self, dm, rank: int, world: int) -> Tensor:
        """Every stored proposal's ``f_t`` ``(G, d)``, in bank order (float32, CPU)."""
        ids, feats = [], []
        for pairs in self._round_batches(dm, rank, world, "UDQ features"):
            ids += [m.image_id for _, m in pairs]
            feats += self._stored_features(pairs)
        merged = {i: f for part_ids, part_feats in _all_gather((ids, feats)) for i, f in zip(part_ids, part_feats)}
        missing = [i for i in self.bank.image_ids if i not in merged]
        if missing:
            raise RuntimeError(f"UDQ round pass: {len(missing)} database image(s) gave no features "
                               f"(e.g. {missing[:3]}); the proposals were stored from a different image set")
        return torch.cat([merged[i] for i in self.bank.image_ids]) if merged else torch.zeros(0, self.net.feature_dim)

    def _evaluate_baselines(self, codebook: OPQCodebook) -> None:
        """Off-the-shelf and Off-the-shelf-OPQ on the benchmark, from one extraction."""
        from instsearch.eval.callback import benchmark_of
        from instsearch.eval.evaluator import evaluate

        benchmark = benchmark_of(self.trainer)
        if benchmark is None:
            return
        evaluator = self.make_evaluator(benchmark, quantized=False)
        loaders = self.trainer.datamodule.benchmark_dataloaders(rank=self.trainer.global_rank,
                                                                world_size=self.trainer.world_size)
        exact = evaluate(self, loaders, evaluator, step=self.search_step, progress=self.progress,
                         desc="UDQ baselines")
        if exact is None:  # not rank 0
            return
        evaluator.quantizer = codebook
        quantized = evaluator.compute(gather=False)
        for name, result in (("off_the_shelf", exact), ("off_the_shelf_opq", quantized)):
            self.baseline_results[name] = result.metrics
            metrics = {f"baseline/{name}/{k}": float(v) for k, v in result.metrics.items()
                       if isinstance(v, (int, float)) and np.isfinite(v)}
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)
            rank_zero_info(f"UDQ baseline {name}: mAP@all={result.metrics['mAP@all']:.4f} "
                           f"mIoU={result.metrics['mIoU']:.4f}")

    # ------------------------------------------------------------------ training step
    def training_step(self, batch, batch_idx: int) -> Tensor:
        if self.phase == "rpn":
            return super().training_step(batch, batch_idx)
        images, metas = batch
        pairs = [(im, m) for im, m in zip(images, metas) if im is not None and len(self.bank.boxes_of(m.image_id))]
        if not pairs:
            # an all-unreadable batch: a zero loss that still touches the graph (DDP needs every rank to step)
            return sum(p.sum() * 0.0 for p in self.udq_loss.parameters())
        codes = torch.cat([self.bank.labels_of(m.image_id) for _, m in pairs]).to(self.device)
        features = self.net.box_features([im for im, _ in pairs], self._stored_boxes(pairs))
        codebooks = self.codebook.codebooks.to(features)
        out = self.udq_loss(self.codebook.rotate(features), codes, codebooks)
        n = len(pairs)
        self.log("train/loss", out.total.detach(), prog_bar=True, batch_size=n)
        self.log_dict({"train/L_sep": out.separability.detach(), "train/L_dis": out.discriminability.detach()},
                      batch_size=n)
        return out.total

    # ------------------------------------------------------------------ search
    def search_step(self, batch: tuple[list, list]) -> SearchBatch:
        """As every method's, except that with ``database_proposals="stored"`` a database image
        with stored proposals is searched by those very proposals (the compact codes ``H`` of
        Algorithm 1 are codes of the training proposals), described by the current network. The
        RPN's input moves while the backbone trains, so proposals detected again would drift away
        from the ones the codebooks were fitted on. Other images (distractors, another benchmark,
        queries) go through the network as usual."""
        images, metas = batch
        stored = ([k for k, (im, m) in enumerate(zip(images, metas))
                   if im is not None and m.query_id is None and m.image_id in self.bank
                   and len(self.bank.boxes_of(m.image_id))]
                  if self.database_proposals == "stored" and self.bank is not None else [])
        if not stored:
            return super().search_step(batch)
        chosen = set(stored)
        rest = [k for k in range(len(images)) if k not in chosen]
        out = super().search_step(([images[k] for k in rest], [metas[k] for k in rest])) if rest else SearchBatch()
        pairs = [(images[k].to(self.device), metas[k]) for k in stored]
        for (_, m), f in zip(pairs, self._stored_features(pairs)):
            out.database.append((m, Regions(boxes=self.bank.boxes_of(m.image_id), scores=self.bank.scores_of(m.image_id),
                                            features=f, image_size=tuple(m.orig_size))))
        return out

    def make_evaluator(self, benchmark, quantized: Optional[bool] = None) -> RetrievalEvaluator:
        """ADC over the current codebooks when ``search="adc"`` (or ``quantized``), else exact."""
        quantized = self.search == "adc" if quantized is None else quantized
        if quantized and self.codebook is None:
            raise RuntimeError("UDQ's ADC search needs trained codebooks: pass --ckpt_path of a UDQ training run "
                               "(its checkpoint holds them) or set model.search=exact")
        return RetrievalEvaluator(benchmark, self.retrieval, method=type(self).__name__, device=self.device,
                                  quantizer=self.codebook if quantized else None)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.save_index and self.trainer.is_global_zero and self._evaluator.index is not None:
            written = self._evaluator.index.save(self.save_index)
            print(f"index: {written}")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["udq"] = {
            "fitted_round": self.fitted_round,
            "codebook": None if self.codebook is None else self.codebook.to_state(),
            "bank": None if self.bank is None else self.bank.to_state(),
            "round_stats": list(self.round_stats),
            "baseline_results": {k: {m: float(v) for m, v in d.items() if isinstance(v, (int, float))}
                                 for k, d in self.baseline_results.items()},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("udq")
        if state is None:
            return
        self.fitted_round = int(state["fitted_round"])
        self.codebook = None if state["codebook"] is None else OPQCodebook.from_state(state["codebook"])
        self.bank = None if state["bank"] is None else ProposalBank.from_state(state["bank"])
        self.round_stats = list(state.get("round_stats", []))
        self.baseline_results = dict(state.get("baseline_results", {}))

