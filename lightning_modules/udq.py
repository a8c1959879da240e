"""UDQ training (Algorithm 1 of Unsupervised Deep Quantization): rounds of {extract every proposal's
FC_S feature, optionally refine, refit OPQ, train on the new pseudo-labels}.

The network is :class:`~instsearch.networks.udq.UDQNet` (``model.net``); the data the database
images of a benchmark, without labels
(:class:`~instsearch.datamodules.unlabelled.DatabaseImagesDataModule`). Two phases (``phase``):

* ``"rpn"``: the RPN is trained on a detection DataModule (VOC 2007 in the paper, the synthetic
  training split on CPU) with everything else fixed -- "we fix the backbone network and train the
  RPN on PASCAL VOC";
* ``"udq"`` (default): the feature is trained. Training runs ``rounds + 1`` rounds of
  ``epochs_per_round`` epochs (``trainer.max_epochs`` is set to their product when the run leaves
  it unset; a different value is refused). At the start of round ``r``
  (:meth:`UDQModule.on_train_epoch_start`):

  1. every database image's proposals are extracted once, the first time (``proposals_per_image``
     per image, kept fixed with their pseudo-labels in a :class:`ProposalBank`), and in round 0
     FC_S is initialised as the PCA projection of the off-the-shelf RoI features ("module 1:
     quantization model initialization", fed by the RPN's features);
  2. the FC_S features ``f_t`` of every stored proposal are extracted (batched, each DDP rank its
     shard of images, gathered as padded tensors);
  3. optional refinement (``refinement``: BFR Eq. 11, PBR Eq. 12, CBR Eq. 13);
  4. OPQ (rotation + ``M`` codebooks of ``K = 2^nbits`` codewords) is refitted on them (Eq. 6) and
     their codes become the pseudo-labels ``h_t``; the subspace classifiers restart as the
     nearest-codeword classifiers of these codebooks (``classifier_init``);
  5. the round trains ``L = L_sep + λ·L_dis`` (Eq. 7) on the stored proposals of each batch.

  Rounds ``1..rounds`` are the paper's "module 2" iterations (2 by default: "we choose to
  iterate 2 times").

**What makes a round learn** (each an option; the figures are the synthetic benchmark's,
docs/udq.md):

* ``classifier_init="codebook"``: the classifiers start as ``W_{m,k} = s_m c^m_k``, ``b_{m,k} =
  −s_m/2 ‖c^m_k‖²`` (:meth:`~instsearch.losses.udq.SubspaceClassifiers.init_from_codebooks`), i.e.
  ``logit_k = −s_m/2 ‖f^m − c^m_k‖² + const``: their argmax *is* the pseudo-label at the first
  step. ``classifier_scale`` is ``s`` (``None``: ``s_m = d_m / E‖f^m − c^m_h‖²``, the isotropic
  Gaussian mixture around the codewords fitted to the round's residuals, so the softmax starts as
  that mixture's posterior). Freshly drawn ``nn.Linear`` classifiers (``"uniform"``) see
  l2-normalised sub-vectors of norm ~0.35: logits ~0.05, a uniform softmax, ``L_sep = M·ln K``
  with vanishing gradients, and a round of 38 steps at lr 0.001 left their accuracy at chance.
* ``head_lr_multiplier``: FC_S and the classifiers (new, randomly or PCA-initialised layers) train
  at ``optim.lr ×`` this; the backbone stages and box head (pretrained) at ``optim.lr``. Both are
  ``0`` with ``optim.lr = 0`` (the null control).
* ``lambda_dis``: ``L_dis`` scales with ``‖f‖²`` and the paper's ``λ = 0.01`` was chosen for its
  (unreported) feature scale, where "the two losses are roughly equally weighted". With
  l2-normalised features ``L_dis`` is the quantisation error (~0.1), so the configs set ``λ`` such
  that the two gradients reaching the features are of the same order; every round logs both
  (``grad_sep``, ``grad_dis``: RMS over proposals of ``‖∂L_sep/∂f‖`` and ``‖∂(λ L_dis)/∂f‖``,
  projected on the sphere's tangent plane when ``f`` is normalised).
* ``epochs_per_round``: steps per round.
* ``freeze_batchnorm``: the backbone's BatchNorm layers keep their statistics (eval mode) during
  the UDQ phase, so a training step and the round pass that labels it see the same network
  (batches of a few images would otherwise shift the statistics under the labels).

**Statistics** (``round_stats``, logged as ``udq/<name>``): at each refit ``quantization_error``
(the search codebook's ``L_pq / G`` on the features it encodes), ``L_sep_start``, ``L_dis_start``,
``label_accuracy_start`` (the whole bank with the fresh classifiers), ``classifier_scale`` and the
two gradient norms; at each round's end (before the next refit, and after the last batch)
``L_sep_end``, ``L_dis_end``, ``label_accuracy_end`` over the whole bank with the round's
classifiers and labels, and ``codes_changed``: the share of proposals whose code changed during
the round, both codes taken with *that round's* codebook (the round-end features encoded with it
against the codes it gave at the round's start). Codeword indices are arbitrary per fit, so codes
of two fits cannot be compared index by index; this is zero exactly when no feature crossed a
cell boundary, whatever OPQ's seed. Every epoch logs the training batches' means ``udq/L_sep``,
``udq/L_dis`` and ``udq/label_accuracy`` (argmax of each subspace's classifier == its label).

**Search** (``search="adc"``, default): the database's proposals are encoded with the current
round's search codebooks and searched by asymmetric distance, Sim = max over an image's proposals
of ``1/‖f_q − φ(f_p)‖`` (Eqs. 1, 2, 5); ``"exact"`` searches the real-valued ``f_t`` by Eq. 2
itself, ``1/‖f_q − f_p‖`` (faiss ``IndexFlatL2``; not the inner product, which ranks the same only
on unit-norm features). Algorithm 1's "final codebooks" (its line 8) are by default the last
round's: the features were trained towards exactly those codewords (``L_dis``). With
``final_refit`` OPQ is fitted once more on the final features at the end of the last epoch (before
that epoch's evaluation and checkpoint), and their codes become ``H``.

**Refinement and the codebooks.** With BFR / PBR / CBR the pseudo-labels come from OPQ fitted on
the refined targets (``label_codebook``: its rotation, codewords and codes drive ``L_sep`` and
``L_dis``), while the database is encoded from the unrefined features; so each round also fits
OPQ on the features themselves (Algorithm 1 line 8: the codebooks ``C`` and codes ``H`` are those
of the features ``F``), and that ``codebook`` encodes the database and gives the reported
``quantization_error`` (``label_quantization_error``: the refined targets'). Without refinement
the two are one fit.

With ``evaluate_baselines`` round 0 also scores the paper's two baselines (its Fig. 3) on the
DataModule's benchmark, right after initialisation and before any training: ``Off-the-shelf``
(the PCA-``d`` RoI features, exact search) and ``Off-the-shelf-OPQ`` (the same features, OPQ
fitted on them, ADC search); logged as ``baseline/off_the_shelf/*`` and
``baseline/off_the_shelf_opq/*``.

``trainer.fast_dev_run`` runs every round with one training step each; the round passes then
cover the first few database batches (enough proposals for ``K`` codewords), images outside them
are labelled on the fly by the round's codebook, and the baselines are skipped.

Checkpoints hold the round, the codebooks and the proposal bank with its labels
(``checkpoint["udq"]``), so ``instsearch test --ckpt_path`` searches with the trained codebooks and
a resumed run continues the round it was in with the same labels.

Pseudo-label memory: ``G x M`` bytes for ``K ≤ 256`` (``uint8``; 8 MB for one million proposals at
M = 8), twice that for ``K = 512`` (and again for the search codes with refinement); the boxes add
16 bytes per proposal. A round boundary holds every proposal's feature on each rank (``4·d``
bytes: 1.2 GB per million proposals at d = 300), gathered as one padded tensor per rank.
"""
from __future__ import annotations

import logging
from typing import Literal, Optional

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from instsearch.distributed import all_gather_rows, broadcast_from_rank0
from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator
from instsearch.eval.extraction import SearchBatch, iterate_batches, to_original_frame, to_served_frame
from instsearch.eval.searchers import FaissSearcher, Searcher
from instsearch.lightning_modules.base import OptimizerConfig, RegionSearchModule
from instsearch.lightning_modules.udq_bank import ProposalBank, label_dtype
from instsearch.losses.udq import UDQLoss, discriminability_loss, residual_scale, separability_from_logits
from instsearch.networks.product_quantizer import OPQCodebook, faiss_threads
from instsearch.networks.udq import UDQNet, pca_projection
from instsearch.networks.udq_refine import refine_bfr, refine_cbr, refine_pbr
from instsearch.structures import Regions

log = logging.getLogger(__name__)

__all__ = ["UDQModule"]

Refinement = Literal["none", "bfr", "pbr", "cbr"]

#: proposals per chunk when statistics are computed over the whole bank
_CHUNK = 1 << 15


class UDQModule(RegionSearchModule):
    """UDQ: the LightningModule of Algorithm 1 (see the module docstring).

    Args:
        net: the :class:`UDQNet`.
        phase: ``"udq"`` (train the feature) or ``"rpn"`` (pre-train the RPN, all else fixed).
        num_subspaces: ``M``.
        nbits: bits per code, ``K = 2^nbits`` (8: K = 256 as the paper's Paris6K; 9: K = 512, Oxford5K;
            4 with M = 16 gives faiss's fast-scan size).
        lambda_dis: ``λ`` of Eq. 7 (the paper's 0.01 is for its feature scale; see the module
            docstring and the configs for unit-norm features).
        rounds: iterations of module 2 after the initialisation round (2).
        epochs_per_round: training epochs per round.
        classifier_init: ``"codebook"`` (nearest-codeword classifiers of the round's codebooks,
            default) or ``"uniform"`` (``nn.Linear``'s draw).
        classifier_scale: ``s`` of the codebook initialisation; ``None``: per subspace
            ``1 / E‖f^m − c^m_h‖²`` on the round's features
            (:func:`~instsearch.losses.udq.residual_scale`).
        head_lr_multiplier: FC_S and the classifiers train at ``optim.lr`` times this (the backbone
            stages and the box head at ``optim.lr``).
        freeze_batchnorm: the backbone's BatchNorm statistics stay fixed (eval mode) in the UDQ phase.
        refinement: ``"none"``, ``"bfr"`` (Eq. 11), ``"pbr"`` (Eq. 12) or ``"cbr"`` (Eq. 13), applied
            before every OPQ fit of the labels.
        refine_neighbours: ``S``; ``None`` = the paper's 10 for BFR, 50 for PBR.
        refine_cells: k-means cells of PBR / CBR; ``None`` = ``round(sqrt(G))`` (the paper gives none).
        opq_iterations: OPQ's alternating iterations (faiss's default 50).
        pca_samples: off-the-shelf features the PCA initialisation is fitted on at most (a seeded
            draw of images; all proposals of a drawn image are used).
        search: ``"adc"`` (compact codes, the paper's search) or ``"exact"`` (real-valued ``f_t``,
            Eq. 2: inverse L2 distance).
        database_proposals: ``"stored"`` (a database image is searched by the proposals it was
            trained with, see :meth:`search_step`) or ``"detect"`` (proposals detected again).
        evaluate_baselines: score Off-the-shelf and Off-the-shelf-OPQ in round 0.
        faiss_threads: OpenMP threads of OPQ / k-means (fixed for repeatable fits; ``None`` = faiss's).
        seed: seeds the PCA draw, OPQ and k-means.
        reseed_each_round: round ``r`` fits OPQ (and the refinement's k-means) with ``seed + r``;
            ``False``: every fit uses ``seed`` (features that did not move then give the same codes).
        progress: progress bars on the round passes.
        final_refit: refit OPQ on the final features after the last epoch (Algorithm 1, line 8);
            ``False``: the last round's codebooks are the final ones.
        final_statistics: after the last batch, one more pass over the bank gives the last round's
            end statistics (``L_sep_end``, ``codes_changed``, ...); shared with ``final_refit``'s.
        save_index: a folder where ``instsearch test`` writes the searched database (faiss index of
            the codes + every proposal's image, box and score; :meth:`RegionIndex.save`), which
            :meth:`~instsearch.eval.search.RegionIndex.load` searches again without the network.
    """

    box_iou_types = ()  # class-agnostic proposals: no detection AP

    def __init__(self, net: UDQNet, phase: Literal["udq", "rpn"] = "udq", num_subspaces: int = 8, nbits: int = 8,
                 lambda_dis: float = 0.01, rounds: int = 2, epochs_per_round: int = 1,
                 classifier_init: Literal["codebook", "uniform"] = "codebook",
                 classifier_scale: Optional[float] = None, head_lr_multiplier: float = 1.0,
                 freeze_batchnorm: bool = True,
                 refinement: Refinement = "none", refine_neighbours: Optional[int] = None,
                 refine_cells: Optional[int] = None, opq_iterations: int = 50, pca_samples: int = 100_000,
                 search: Literal["adc", "exact"] = "adc", database_proposals: Literal["stored", "detect"] = "stored",
                 evaluate_baselines: bool = True,
                 faiss_threads: Optional[int] = 1, seed: int = 0, reseed_each_round: bool = True,
                 progress: bool = True, save_index: Optional[str] = None, final_refit: bool = False,
                 final_statistics: bool = True,
                 optim: Optional[OptimizerConfig] = None, retrieval: Optional[RetrievalConfig] = None):
        super().__init__(optim=optim or OptimizerConfig(lr=0.001, warmup_steps=0), retrieval=retrieval)
        # where to write files and whether to draw progress bars belong to a run, not to the model: a
        # checkpoint's hyper-parameters would override them at `instsearch test --ckpt_path`
        self.save_hyperparameters(ignore=["net", "save_index", "progress"])
        for name, value, allowed in (("phase", phase, ("udq", "rpn")), ("search", search, ("adc", "exact")),
                                     ("database_proposals", database_proposals, ("stored", "detect")),
                                     ("refinement", refinement, ("none", "bfr", "pbr", "cbr")),
                                     ("classifier_init", classifier_init, ("codebook", "uniform"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if net.feature_dim % num_subspaces:
            raise ValueError(f"feature_dim {net.feature_dim} is not divisible by num_subspaces={num_subspaces}: "
                             f"set model.net.init_args.feature_dim to a multiple (e.g. "
                             f"{net.feature_dim // num_subspaces * num_subspaces})")
        if rounds < 0 or epochs_per_round < 1:
            raise ValueError(f"need rounds >= 0 and epochs_per_round >= 1, got {rounds}, {epochs_per_round}")
        if classifier_scale is not None and not classifier_scale > 0:
            raise ValueError(f"classifier_scale must be positive (or null for the residuals' own), got {classifier_scale}")
        if not head_lr_multiplier >= 0:
            raise ValueError(f"head_lr_multiplier must be >= 0, got {head_lr_multiplier}")
        self.net = net
        self.udq_loss = UDQLoss(net.feature_dim, num_subspaces, 2 ** nbits, lambda_dis=lambda_dis)
        self.phase, self.search, self.database_proposals = phase, search, database_proposals
        self.num_subspaces, self.nbits = int(num_subspaces), int(nbits)
        self.rounds, self.epochs_per_round = int(rounds), int(epochs_per_round)
        self.classifier_init, self.classifier_scale = classifier_init, classifier_scale
        self.head_lr_multiplier, self.freeze_batchnorm = float(head_lr_multiplier), bool(freeze_batchnorm)
        self.refinement, self.refine_neighbours, self.refine_cells = refinement, refine_neighbours, refine_cells
        self.opq_iterations, self.pca_samples = int(opq_iterations), int(pca_samples)
        self.evaluate_baselines, self.faiss_threads = bool(evaluate_baselines), faiss_threads
        self.seed, self.reseed_each_round = int(seed), bool(reseed_each_round)
        self.progress, self.save_index = bool(progress), save_index
        self.final_refit, self.final_statistics = bool(final_refit), bool(final_statistics)
        #: the search codebook (encodes the database; Algorithm 1's C)
        self.codebook: Optional[OPQCodebook] = None
        #: the codebook of the pseudo-labels when it differs from :attr:`codebook` (refinement)
        self._label_codebook: Optional[OPQCodebook] = None
        self.bank: Optional[ProposalBank] = None
        self.fitted_round = -1
        self.round_stats: list[dict[str, float]] = []
        self.baseline_results: dict[str, dict] = {}
        #: round passes limited to this many batches per rank (``fast_dev_run``); ``None``: all
        self._pass_batches: Optional[int] = None
        #: the classifiers' scale ``s_m`` of the current round ``(M,)``
        self._scale: Optional[Tensor] = None
        self._freeze_for_phase()

    @property
    def label_codebook(self) -> Optional[OPQCodebook]:
        """The codebook whose rotation, codewords and codes the losses train against."""
        return self._label_codebook if self._label_codebook is not None else self.codebook

    def _freeze_for_phase(self) -> None:
        """``rpn``: only the RPN trains. ``udq``: the RPN and the unused class head stay fixed (the
        proposals must not move under their labels); box head, FC_S, the unfrozen backbone stages
        and the subspace classifiers train, with BatchNorm statistics fixed (``freeze_batchnorm``)."""
        if self.phase == "rpn":  # the whole backbone fixed, batch-norm statistics included
            self.net.backbone.freeze(len(self.net.backbone.stage_modules()))
        else:
            self.net.freeze_batchnorm = self.freeze_batchnorm
            self.net.train(self.net.training)
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

    def setup(self, stage: str) -> None:
        """The epochs follow from the rounds: ``trainer.max_epochs`` is set to ``(rounds + 1) x
        epochs_per_round`` when the run leaves it unset (Lightning's ``None``, which it turns into
        1000 epochs, or ``-1``); another value is refused. ``fast_dev_run`` runs every round: one
        epoch of ``fast_dev_run`` steps each."""
        if stage != "fit" or self.phase != "udq":
            return
        loop, total = self.trainer.fit_loop, self.total_epochs
        if self.trainer.fast_dev_run:
            loop.max_epochs = total
            loop.epoch_loop.max_steps = total * int(self.trainer.fast_dev_run)
            return
        unset = loop.max_epochs in (None, -1) or (loop.max_epochs == 1000 and self.trainer.max_steps == -1)
        if unset:
            loop.max_epochs = total
            rank_zero_info(f"UDQ: max_epochs = (rounds + 1) x epochs_per_round = {total}")
        elif loop.max_epochs != total:
            raise ValueError(f"UDQ trains (rounds + 1) x epochs_per_round = ({self.rounds} + 1) x "
                             f"{self.epochs_per_round} = {total} epochs, but trainer.max_epochs is "
                             f"{loop.max_epochs}: leave it unset (or set it to {total}), or change rounds / "
                             f"epochs_per_round")

    def on_fit_start(self) -> None:
        if self.phase == "rpn":
            return super().on_fit_start()
        if not self.net.training:
            raise RuntimeError("UDQNet is in eval mode at the start of training; call .train() first")
        if not hasattr(self.trainer.datamodule, "round_dataloader"):
            raise TypeError(f"UDQ trains on unlabelled database images: use "
                            f"instsearch.datamodules.unlabelled.DatabaseImagesDataModule, not "
                            f"{type(self.trainer.datamodule).__name__}")

    def configure_optimizers(self):
        """The base schedule (SGD, warm-up, step decay) over two parameter groups: ``backbone``
        (unfrozen stages and box head, ``optim.lr``) and ``head`` (FC_S and the subspace
        classifiers, ``optim.lr x head_lr_multiplier``)."""
        base = super().configure_optimizers()
        if self.phase != "udq":
            return base
        head_ids = {id(p) for p in [*self.net.fc_s.parameters(), *self.udq_loss.parameters()]}
        trainable = [p for p in self.parameters() if p.requires_grad]
        o = self.optim
        groups = [{"name": "backbone", "params": [p for p in trainable if id(p) not in head_ids], "lr": o.lr},
                  {"name": "head", "params": [p for p in trainable if id(p) in head_ids],
                   "lr": o.lr * self.head_lr_multiplier}]
        optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=o.lr, momentum=o.momentum,
                                    weight_decay=o.weight_decay)
        factor = base["lr_scheduler"]["scheduler"].lr_lambdas[0]  # the base's warm-up and decay
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_epoch_start(self) -> None:
        if self.phase != "udq":
            return
        r = self.round_of_epoch(self.current_epoch)
        if r > self.fitted_round:
            self.start_round(r)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """The last batch of the last epoch ends the last round: its end statistics and, with
        ``final_refit``, Algorithm 1's line 8 -- here rather than at epoch end, which callbacks
        (evaluation, checkpoints) see first."""
        if (self.phase == "udq" and self.current_epoch == self.total_epochs - 1
                and batch_idx == self.trainer.num_training_batches - 1):
            self.finish_training()

    def finish_training(self) -> None:
        """End statistics of the last round (``final_statistics``) and the final refit (``final_refit``)."""
        if not (self.final_statistics or self.final_refit) or self.fitted_round < 0:
            return
        features = self._round_features()
        ended = None
        if self.trainer.is_global_zero:
            ended = self._end_statistics(features)
        ended = broadcast_from_rank0(ended)
        self.round_stats[-1].update(ended)
        self._publish(ended, f"UDQ round {self.fitted_round} end")
        if not self.final_refit:
            return
        fitted = None
        if self.trainer.is_global_zero:
            stats = {"round": float(self.rounds + 1), "final_refit": 1.0,
                     "previous_quantization_error": self.codebook.quantization_error(features.numpy())}
            fitted = self._fit(features.numpy(), self.seed + self.rounds + 1, stats, refine=False)
        self._adopt(fitted)
        self._finish_start(features, self.rounds + 1, "UDQ final codebooks")

    # ------------------------------------------------------------------ a round boundary
    def start_round(self, r: int) -> None:
        """Steps 1-4 of a round (module docstring): features, refinement, OPQ, labels, classifiers;
        first the end statistics of the round before, on the same features."""
        features = self._round_features()
        ended, fitted = None, None
        if self.trainer.is_global_zero:
            if self.fitted_round >= 0:
                ended = self._end_statistics(features)
            stats = {"round": float(r), "proposals": float(len(self.bank)),
                     "feature_norm": float(features.norm(dim=1).mean()) if len(features) else 0.0}
            fitted = self._fit(features.numpy(), self.seed + r if self.reseed_each_round else self.seed, stats)
        ended = broadcast_from_rank0(ended)
        if ended is not None:
            self.round_stats[-1].update(ended)
            self._publish(ended, f"UDQ round {self.fitted_round} end")
        self._adopt(fitted)
        self._finish_start(features, r, f"UDQ round {r}")
        if r == 0 and self.evaluate_baselines:
            if self._pass_batches is not None:
                rank_zero_info("UDQ: fast_dev_run, baselines skipped")
            else:
                self._evaluate_baselines(self.codebook)

    def _finish_start(self, features: Tensor, r: int, title: str) -> None:
        """Classifiers restarted (and their momentum), the start statistics on rank 0, published."""
        self._init_classifiers()
        self._reset_optimizer_state(self.udq_loss.parameters())
        self.fitted_round = r
        stats = self.round_stats[-1]
        if self.trainer.is_global_zero:
            stats.update(self._label_statistics(features, "start"))
            stats.update(self._gradient_statistics(features))
        self.round_stats[-1] = stats = broadcast_from_rank0(stats)
        self._publish(stats, title, skip=("L_sep_end", "L_dis_end", "label_accuracy_end"))

    def _init_classifiers(self) -> None:
        classifiers = self.udq_loss.classifiers
        if self.classifier_init == "uniform":
            classifiers.reset_parameters()
        else:
            classifiers.init_from_codebooks(self.label_codebook.codebooks, self._scale)

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

    def _encode(self, codebook: OPQCodebook, x: np.ndarray) -> Tensor:
        with faiss_threads(self.faiss_threads):  # the rotation's matrix product rounds per thread count
            return codebook.encode(x)

    def _fit(self, features: np.ndarray, seed: int, stats: dict[str, float], refine: bool = True) -> dict:
        """Rank 0: OPQ on the (refined) features -- the labels' codebook and codes -- and, when the
        labels come from refined targets, OPQ on the features themselves for the search; the
        quantisation errors and the classifiers' scale in ``stats``. What :meth:`_adopt` hands
        every rank."""
        with faiss_threads(self.faiss_threads):
            targets = self._refine(features, seed) if refine else features
        label_codebook = self._fit_opq(targets, seed)
        labels = self._encode(label_codebook, targets)
        if targets is features:
            codebook, codes = label_codebook, None
            stats["quantization_error"] = codebook.quantization_error(features, labels)
        else:
            codebook = self._fit_opq(features, seed)
            codes = self._encode(codebook, features)
            stats["quantization_error"] = codebook.quantization_error(features, codes)
            stats["label_quantization_error"] = label_codebook.quantization_error(targets, labels)
        if self.classifier_scale is not None:
            scale = torch.full((self.num_subspaces,), float(self.classifier_scale))
        else:
            scale = residual_scale(torch.from_numpy(label_codebook.rotate(features)), labels,
                                   label_codebook.codebooks)
        stats["classifier_scale"] = float(scale.mean())
        dtype = label_dtype(self.nbits)
        return {"codebook": codebook.to_state(),
                "label_codebook": None if codes is None else label_codebook.to_state(),
                "labels": labels.to(dtype), "codes": None if codes is None else codes.to(dtype),
                "scale": scale, "stats": stats}

    def _adopt(self, fitted: Optional[dict]) -> None:
        """Rank 0's fit (:meth:`_fit`) becomes every rank's codebooks, labels and latest statistics."""
        fitted = broadcast_from_rank0(fitted)
        self.codebook = OPQCodebook.from_state(fitted["codebook"])
        self._label_codebook = (None if fitted["label_codebook"] is None
                                else OPQCodebook.from_state(fitted["label_codebook"]))
        self.bank.labels, self.bank.codes = fitted["labels"], fitted["codes"]
        self._scale = fitted["scale"]
        self.round_stats.append(fitted["stats"])

    @torch.no_grad()
    def _label_statistics(self, features: Tensor, when: str) -> dict[str, float]:
        """``L_sep``, ``L_dis`` (the training step's reductions) and the label accuracy of the
        current classifiers over the whole bank, named ``*_{when}``."""
        codebook, labels, loss = self.label_codebook, self.bank.labels, self.udq_loss
        weight = loss.classifiers.weight
        codebooks = codebook.codebooks.to(weight)
        sep = dis = hits = 0.0
        for a in range(0, len(features), _CHUNK):
            f = codebook.rotate(features[a:a + _CHUNK].to(weight))
            h = labels[a:a + _CHUNK].to(weight.device).long()
            logits = loss.classifiers(f)
            sep += float(separability_from_logits(logits, h, "sum", loss.subspace_reduction))
            dis += float(discriminability_loss(f, h, codebooks, "sum", loss.subspace_reduction))
            hits += float((logits.argmax(dim=2) == h).float().mean(dim=1).sum())
        n = max(len(features), 1)
        return {f"L_sep_{when}": sep / n, f"L_dis_{when}": dis / n, f"label_accuracy_{when}": hits / n}

    def _end_statistics(self, features: Tensor) -> dict[str, float]:
        """Rank 0, at the end of the round that :attr:`fitted_round` started, on its end features:
        the label statistics and the share of codes the round changed, both codes under that
        round's search codebook (indices of different fits are not comparable)."""
        ended = self._label_statistics(features, "end")
        now = self._encode(self.codebook, features.numpy())
        before = self.bank.search_codes.long()
        ended["codes_changed"] = float((now != before).any(dim=1).float().mean()) if len(now) else 0.0
        ended["subcodes_changed"] = float((now != before).float().mean()) if len(now) else 0.0
        return ended

    def _gradient_statistics(self, features: Tensor, samples: int = 4096) -> dict[str, float]:
        """RMS over (up to ``samples``) proposals of ``‖∂L_sep/∂f‖`` and ``‖∂(λ L_dis)/∂f‖`` with the
        fresh classifiers, on the sphere's tangent plane when ``f`` is l2-normalised (the part that
        reaches FC_S): whether ``λ`` makes the two of the same order."""
        if not len(features):
            return {}
        loss = self.udq_loss
        weight = loss.classifiers.weight
        pick = torch.linspace(0, len(features) - 1, min(samples, len(features))).long()
        f = features[pick].to(weight).requires_grad_(True)
        h = self.bank.labels[pick].to(weight.device).long()
        codebook = self.label_codebook
        with torch.enable_grad():
            rotated = codebook.rotate(f)
            sep = separability_from_logits(loss.classifiers(rotated), h, "sum", loss.subspace_reduction)
            dis = loss.lambda_dis * discriminability_loss(rotated, h, codebook.codebooks.to(weight), "sum",
                                                          loss.subspace_reduction)
            grads = (torch.autograd.grad(sep, f, retain_graph=True)[0], torch.autograd.grad(dis, f)[0])
        out = {}
        for name, g in zip(("grad_sep", "grad_dis"), grads):
            if self.net.l2_normalize:
                g = g - (g * f).sum(dim=1, keepdim=True) * f.detach()
            out[name] = float(g.pow(2).sum(dim=1).mean().sqrt())
        return out

    def _publish(self, stats: dict[str, float], title: str, skip: tuple[str, ...] = ()) -> None:
        stats = {k: v for k, v in stats.items() if k not in skip}
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
        for images, metas in iterate_batches([dm.round_dataloader(rank, world)], progress=self.progress and rank == 0,
                                             desc=desc, max_batches=self._pass_batches):
            pairs = [(im.to(self.device), m) for im, m in zip(images, metas) if im is not None]
            if pairs:
                yield pairs

    @torch.no_grad()
    def _collect_proposals(self, dm, rank: int, world: int) -> None:
        """First pass: every image's proposals (kept, original pixels) and, for a seeded draw of
        images, the off-the-shelf features the PCA initialisation of FC_S is fitted on. Under
        ``fast_dev_run`` the pass stops after ``fast_dev_run`` batches holding ``4 K`` proposals."""
        bench = dm.load_benchmark()
        position = {image_id: i for i, image_id in enumerate(bench.database)}
        order = np.random.default_rng(self.seed).permutation(len(bench.database))
        take = max(1, int(np.ceil(self.pca_samples / self.net.proposals_per_image)))
        for_pca = {bench.database[i] for i in order[:take]}
        dev_batches = int(self.trainer.fast_dev_run) if self._trainer is not None and self.trainer.fast_dev_run else 0
        positions, counts, boxes, scores, samples, batches = [], [], [], [], [], 0
        for pairs in self._round_batches(dm, rank, world, "UDQ proposals"):
            batches += 1
            out = self.net.proposals_with_representations([im for im, _ in pairs])
            for (b, s, reps), (im, meta) in zip(out, pairs):
                positions.append(position[meta.image_id])
                counts.append(len(b))
                boxes.append(to_original_frame(b, meta, im).float())
                scores.append(s.float())
                if meta.image_id in for_pca or dev_batches:
                    samples.append(reps.float())
            if dev_batches and batches >= dev_batches and sum(counts) >= 4 * 2 ** self.nbits:
                self._pass_batches = batches
                break
        device = self.device
        cat = lambda parts, shape: torch.cat(parts) if parts else torch.zeros(shape, device=device)  # noqa: E731
        gathered = [all_gather_rows(t, device) for t in (
            torch.tensor(positions, dtype=torch.int64, device=device), torch.tensor(counts, dtype=torch.int64,
                                                                                     device=device),
            cat(boxes, (0, 4)), cat(scores, (0,)), cat(samples, (0, self.net.representation_dim)))]
        merged = {}
        for pos, cnt, bx, sc in zip(*gathered[:4]):
            for p, b, s in zip(pos.tolist(), bx.split(cnt.tolist()), sc.split(cnt.tolist())):
                merged[p] = (b, s)
        ordered = sorted(merged)
        self.bank = ProposalBank.from_images([bench.database[p] for p in ordered], [merged[p][0] for p in ordered],
                                             [merged[p][1] for p in ordered])
        projection = (pca_projection(torch.cat(gathered[4]), self.net.feature_dim, return_mean=True)
                      if self.trainer.is_global_zero else None)
        self.net.set_projection(*broadcast_from_rank0(projection))

    def _stored_boxes(self, pairs) -> list[Tensor]:
        """Each image's stored proposals in the pixels of the served ``(image, meta)``."""
        return [to_served_frame(self.bank.boxes_of(m.image_id), m, im).to(im)
                for im, m in pairs]

    @torch.no_grad()
    def _stored_features(self, pairs) -> list[Tensor]:
        """Each image's ``f_t`` of its stored proposals (float32, CPU), one network pass."""
        boxes = self._stored_boxes(pairs)
        features = self.net.box_features([im for im, _ in pairs], boxes).float().cpu()
        return list(features.split([len(b) for b in boxes]))

    @torch.no_grad()
    def _extract_features(self, dm, rank: int, world: int) -> Tensor:
        """Every stored proposal's ``f_t`` ``(G, d)``, in bank order (float32, CPU): each rank its
        shard, gathered as tensors and put in place by the bank's offsets."""
        rows, feats = [], []
        for pairs in self._round_batches(dm, rank, world, "UDQ features"):
            rows += [self.bank.row(m.image_id) for _, m in pairs]
            feats += self._stored_features(pairs)
        d = self.net.feature_dim
        parts_rows = all_gather_rows(torch.tensor(rows, dtype=torch.int64, device=self.device), self.device)
        parts_feats = all_gather_rows(torch.cat(feats).to(self.device) if feats else
                                       torch.zeros(0, d, device=self.device), self.device)
        offsets = self.bank.offsets
        out = torch.zeros(len(self.bank), d)
        covered = torch.zeros(len(self.bank.image_ids), dtype=torch.bool)
        for image_rows, f in zip(parts_rows, parts_feats):
            starts = offsets[image_rows]
            counts = offsets[image_rows + 1] - starts
            if int(counts.sum()) != len(f):
                raise RuntimeError(f"UDQ round pass: {len(f)} features for {int(counts.sum())} stored proposals")
            first = torch.cumsum(counts, 0) - counts  # each image's first row within f
            out[torch.repeat_interleave(starts - first, counts) + torch.arange(len(f))] = f
            covered[image_rows] = True
        if not bool(covered.all()):
            missing = [self.bank.image_ids[i] for i in torch.nonzero(~covered).flatten()[:3].tolist()]
            raise RuntimeError(f"UDQ round pass: {int((~covered).sum())} database image(s) gave no features "
                               f"(e.g. {missing}); the proposals were stored from a different image set")
        return out

    def _evaluate_baselines(self, codebook: OPQCodebook) -> None:
        """Off-the-shelf and Off-the-shelf-OPQ on the benchmark, from one extraction."""
        from instsearch.eval.callback import benchmark_of
        from instsearch.eval.evaluator import extract_and_score

        benchmark = benchmark_of(self.trainer)
        if benchmark is None or not benchmark.queries:
            rank_zero_info("UDQ: the benchmark has no queries (a database-only collection), baselines skipped")
            return
        evaluator = self.make_evaluator(benchmark, quantized=False)
        loaders = self.trainer.datamodule.benchmark_dataloaders(rank=self.trainer.global_rank,
                                                                world_size=self.trainer.world_size)
        exact = extract_and_score(self, loaders, evaluator, step=self.search_step, progress=self.progress,
                         desc="UDQ baselines")
        if exact is None:  # not rank 0
            return
        evaluator.make_searcher = lambda dim: FaissSearcher.adc(codebook.to_faiss_index())
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
    @torch.no_grad()
    def _label_unseen(self, pairs) -> tuple[list[Tensor], list[Tensor]]:
        """Proposals and labels of images outside a partial bank (``fast_dev_run``'s round passes):
        detected now, labelled by the round's label codebook."""
        was_training = self.net.training
        self.net.eval()
        try:
            images = [im for im, _ in pairs]
            boxes = [b for b, _ in self.net.propose(images)]
            features = self.net.box_features(images, boxes).float().cpu()
        finally:
            self.net.train(was_training)
        codes = self._encode(self.label_codebook, features.numpy()).split([len(b) for b in boxes])
        return boxes, list(codes)

    def _training_targets(self, pairs) -> tuple[list[Tensor], list[Tensor]]:
        """Each image's boxes (pixels of the served image) and pseudo-labels."""
        stored = [k for k, (_, m) in enumerate(pairs) if m.image_id in self.bank or self._pass_batches is None]
        boxes = dict(zip(stored, self._stored_boxes([pairs[k] for k in stored])))
        codes = {k: self.bank.labels_of(pairs[k][1].image_id) for k in stored}
        unseen = [k for k in range(len(pairs)) if k not in boxes]
        if unseen:
            for k, b, c in zip(unseen, *self._label_unseen([pairs[k] for k in unseen])):
                boxes[k], codes[k] = b, c
        return [boxes[k] for k in range(len(pairs))], [codes[k] for k in range(len(pairs))]

    def training_step(self, batch, batch_idx: int):
        if self.phase == "rpn":
            return super().training_step(batch, batch_idx)
        images, metas = batch
        pairs = [(im, m) for im, m in zip(images, metas) if im is not None]
        boxes, codes = self._training_targets(pairs) if pairs else ([], [])
        keep = [k for k, b in enumerate(boxes) if len(b)]
        if not keep:
            # an all-unreadable batch: a zero loss that still touches the graph (DDP needs every rank to step)
            return sum(p.sum() * 0.0 for p in self.parameters() if p.requires_grad)
        codes = torch.cat([codes[k] for k in keep]).to(self.device)
        features = self.net.box_features([pairs[k][0] for k in keep], [boxes[k] for k in keep])
        codebook = self.label_codebook
        codebooks = codebook.codebooks.to(features)
        rotated = codebook.rotate(features)
        out = self.udq_loss(rotated, codes, codebooks)
        n = len(codes)
        self.log("train/loss", out.total.detach(), prog_bar=True, batch_size=n)
        self.log_dict({"udq/L_sep": out.separability.detach(), "udq/label_accuracy": out.label_accuracy},
                      on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("udq/L_dis", out.discriminability.detach(), on_step=False, on_epoch=True, batch_size=n)
        with torch.no_grad():
            per_proposal = discriminability_loss(rotated, codes, codebooks, "none", self.udq_loss.subspace_reduction)
        return {"loss": out.total, "L_dis_per_proposal": per_proposal}

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

    def make_searcher(self, dim: int, quantized: Optional[bool] = None) -> Searcher:
        """UDQ searches by inverse L2 distance (Eq. 5): asymmetric distances to the current
        codebooks' reconstructions when ``search="adc"`` (or ``quantized``), else exact distances
        (Eq. 2). The codebooks are the model's, not fitted on the database."""
        quantized = self.search == "adc" if quantized is None else quantized
        if not quantized:
            return FaissSearcher.exact_l2(dim)
        self._require_codebook()
        return FaissSearcher.adc(self.codebook.to_faiss_index())

    def _require_codebook(self) -> None:
        if self.codebook is None:
            raise RuntimeError("UDQ's ADC search needs trained codebooks: pass --ckpt_path of a UDQ training run "
                               "(its checkpoint holds them) or set model.search=exact")

    def make_evaluator(self, benchmark, quantized: Optional[bool] = None) -> RetrievalEvaluator:
        """The evaluator of :meth:`make_searcher`'s search. UDQ ranks in its own feature space:
        whitening and category pruning are refused."""
        if self.retrieval.whitening or self.retrieval.prune_by_label:
            raise ValueError("UDQ searches its own feature space (Eq. 2 / ADC): whitening and category pruning do "
                             "not apply (set retrieval.whitening=false, retrieval.prune_by_label=false)")
        quantized = self.search == "adc" if quantized is None else quantized
        if quantized:
            self._require_codebook()  # refused before any extraction
        return RetrievalEvaluator(benchmark, self.retrieval, method=self.method_name, device=self.device,
                                  make_searcher=lambda dim: self.make_searcher(dim, quantized))

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
            "label_codebook": None if self._label_codebook is None else self._label_codebook.to_state(),
            "classifier_scale": self._scale,
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
        label_state = state.get("label_codebook")
        self._label_codebook = None if label_state is None else OPQCodebook.from_state(label_state)
        if state.get("classifier_scale") is not None:
            self._scale = state["classifier_scale"]
        self.bank = None if state["bank"] is None else ProposalBank.from_state(state["bank"])
        self.round_stats = list(state.get("round_stats", []))
        self.baseline_results = dict(state.get("baseline_results", {}))

