"""DetectorModule: a short fit on the synthetic set, mask / box AP logging, the configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from instsearch.lightning_modules.base import COCO_IOU_THRESHOLDS, ap_at_threshold
from instsearch.lightning_modules.detector import DetectorModule
from instsearch.networks.fcis import FCIS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _tiny_fcis(num_classes: int) -> FCIS:
    torch.manual_seed(0)
    return FCIS(num_classes=num_classes, backbone="resnet26", deformable=True, min_size=96, max_size=160,
                anchor_sizes=(16, 32, 64), rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=50,
                rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=50, roi_batch_size_per_image=16,
                head_channels=64, group_size=3, mask_size=9, detections_per_img=20)


def test_fit_logs_losses_and_mask_ap(tmp_path, synthetic_root, num_classes):
    from instsearch.datamodules.synthetic import SyntheticDataModule

    pl.seed_everything(0)
    model = DetectorModule(_tiny_fcis(num_classes))
    before = {k: v.clone() for k, v in model.net.head.state_dict().items()}
    dm = SyntheticDataModule(root=synthetic_root, batch_size=2, num_workers=0)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
                         accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    for key in ("train/loss_mask", "train/loss_classifier", "train/loss_box_reg", "train/loss_objectness"):
        assert torch.isfinite(metrics[key]), key
    # the logged AP@0.5 and AP@[.5:.95] equal torchmetrics' own, recomputed on the same predictions
    from torchmetrics.detection import MeanAveragePrecision

    images, targets = next(iter(dm.val_dataloader()))
    model.net.eval()
    with torch.no_grad():
        detections = model.net(list(images))
    reference = MeanAveragePrecision(iou_type=["bbox", "segm"], backend="pycocotools")
    reference.update([{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"],
                       "masks": d["masks"].squeeze(1) > 0.5} for d in detections],
                     [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"].bool(),
                       **({"iscrowd": t["iscrowd"]} if "iscrowd" in t else {})} for t in targets])
    expected = reference.compute()
    for tag, key in (("box", "bbox"), ("mask", "segm")):
        assert float(metrics[f"val/{tag}_AP@0.5"]) == pytest.approx(float(expected[f"{key}_map_50"]), abs=1e-6)
        assert float(metrics[f"val/{tag}_AP"]) == pytest.approx(float(expected[f"{key}_map"]), abs=1e-6)
        assert f"val/{tag}_AP@0.7" in metrics
    assert any(not torch.equal(before[k], v) for k, v in model.net.head.state_dict().items())


def test_fit_refuses_a_class_count_mismatch(tmp_path, synthetic_root, num_classes):
    from instsearch.datamodules.synthetic import SyntheticDataModule

    model = DetectorModule(_tiny_fcis(num_classes + 1))
    dm = SyntheticDataModule(root=synthetic_root, batch_size=2, num_workers=0)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=f"num_classes={num_classes}"):
        trainer.fit(model, datamodule=dm)


def test_ap_at_threshold_matches_torchmetrics():
    """AP@t read from COCOeval's precision array equals torchmetrics' own AP@0.5 / AP@0.75."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type="bbox", iou_thresholds=COCO_IOU_THRESHOLDS, extended_summary=True,
                                  backend="pycocotools")
    gt = [{"boxes": torch.tensor([[10.0, 10, 50, 50], [60, 60, 100, 90]]), "labels": torch.tensor([1, 2])},
          {"boxes": torch.tensor([[0.0, 0, 30, 40]]), "labels": torch.tensor([1])}]
    preds = [{"boxes": torch.tensor([[12.0, 10, 50, 52], [60, 62, 95, 90], [0, 0, 20, 20]]),
              "scores": torch.tensor([0.9, 0.8, 0.7]), "labels": torch.tensor([1, 2, 1])},
             {"boxes": torch.tensor([[5.0, 0, 30, 40]]), "scores": torch.tensor([0.6]), "labels": torch.tensor([1])}]
    metric.update(preds, gt)
    result = metric.compute()
    torch.testing.assert_close(ap_at_threshold(result["precision"], COCO_IOU_THRESHOLDS, 0.5), result["map_50"].float())
    torch.testing.assert_close(ap_at_threshold(result["precision"], COCO_IOU_THRESHOLDS, 0.75), result["map_75"].float())
    with pytest.raises(ValueError, match="0.33"):
        ap_at_threshold(result["precision"], COCO_IOU_THRESHOLDS, 0.33)


@pytest.mark.parametrize("variant,arch,deformable", [
    ("fcis", "resnet101", False), ("fcis_d", "resnet101", True),
    ("fcis_x", "resnext101_32x4d", False), ("fcis_xd", "resnext101_32x4d", True),
])
def test_synthetic_configs_parse(variant, arch, deformable, tmp_path):
    """Each config builds its module through the CLI (backbone shrunk to keep the test fast)."""
    from instsearch.config_files import load_config

    from instsearch.lightning_cli import lightning_cli

    path = CONFIGS / f"{variant}_synthetic.yaml"
    cfg = load_config(path)
    net_args = cfg["model"]["init_args"]["net"]["init_args"]
    assert (net_args["backbone"], net_args["deformable"]) == (arch, deformable)
    cli = lightning_cli(["--config", str(path), "--model.init_args.net.init_args.backbone=resnet26",
                         "--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.devices=1",
                         f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.root={tmp_path}"], run=False)
    assert isinstance(cli.model, DetectorModule) and isinstance(cli.model.net, FCIS)
    net = cli.model.net
    assert net.num_classes == 7 and net.roi_sampling == "ohem" and net.feature_dim == 1536
    assert any(type(m).__name__ == "DeformableConv2d" for m in net.backbone.modules()) == deformable
    assert cli.model.retrieval.prune_by_label


def test_detector_module_scores_masks_only_for_a_network_that_segments():
    from torch import nn

    from instsearch.lightning_modules.detector import DetectorModule
    from instsearch.networks.fcis import FCIS
    from instsearch.networks.fcis.mask_rcnn import MaskRCNNSearch

    class Boxes(nn.Module):
        pass

    class Segments(nn.Module):
        predicts_masks = True

    assert FCIS.predicts_masks and MaskRCNNSearch.predicts_masks  # both segment: mask AP is scored
    assert DetectorModule(Boxes()).box_iou_types == ("bbox",)
    assert DetectorModule(Segments()).box_iou_types == ("bbox", "segm")
    assert DetectorModule(Segments(), box_iou_types=["bbox"]).box_iou_types == ("bbox",)
    with pytest.raises(ValueError, match="keypoints"):
        DetectorModule(Boxes(), box_iou_types=["keypoints"])
