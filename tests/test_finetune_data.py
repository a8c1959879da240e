"""The deep region CNN paper's fine-tuning data (INSTRE-S per-class draws, Oxford's 55 query
images) on tiny copies of the distributed layouts, and the benchmark served with or without them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from layout_files import jpeg, text
from instsearch.datamodules.converters import convert
from instsearch.datamodules.finetune import InstreFinetuneDataModule, OxfordFinetuneDataModule
from instsearch.formats import Benchmark, FormatError

# ============================================================================ INSTRE
# Natural order puts "2_cup" before "10_book" (plain string order would not); INSTRE-M is never used.
INSTRE = {"INSTRE-S1": {"2_cup": 9, "10_book": 9}, "INSTRE-S2": {"01_toy": 9}, "INSTRE-M": {"01_pair": 6}}
LABELS = {"INSTRE-S1/2_cup": 1, "INSTRE-S1/10_book": 2, "INSTRE-S2/01_toy": 3}


def make_instre(root: Path) -> Path:
    """Image i of a class has the object 'i 2 10 12' (x y w h); image 009 of 2_cup has two objects."""
    for subset, classes in INSTRE.items():
        for cls, n in classes.items():
            for i in range(1, n + 1):
                jpeg(root / subset / cls / f"{i:03d}.jpg")
                text(root / subset / cls / f"{i:03d}.txt", f"{i} 2 10 12\n")
    text(root / "INSTRE-S1/2_cup/009.txt", "9 2 10 12\n35 20 10 20\n")  # the second sticks out of 40x30
    return root


def instre_module(root: Path, **kwargs) -> InstreFinetuneDataModule:
    options = {"images_per_class": 4, "val_images_per_class": 2, "num_workers": 0, "batch_size": 2}
    return InstreFinetuneDataModule(root, **{**options, **kwargs})


def ids_by_class(images) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for im in images:
        out.setdefault(im.image_id.rsplit("/", 1)[0], []).append(im.image_id)
    return out


def test_instre_draws_per_class_deterministically(tmp_path):
    root = make_instre(tmp_path / "INSTRE")
    first = instre_module(root, seed=0).selection
    train, val = ids_by_class(first.train), ids_by_class(first.val)
    assert sorted(train) == sorted(val) == sorted(LABELS)  # every INSTRE-S class, no INSTRE-M
    for cls in LABELS:
        assert len(train[cls]) == 4 and len(val[cls]) == 2
        assert not set(train[cls]) & set(val[cls])  # disjoint
    again = instre_module(root, seed=0).selection
    assert again == first
    other = instre_module(root, seed=1).selection
    assert [im.image_id for im in other.train] != [im.image_id for im in first.train]
    # A class draws the same images whichever other classes are selected with it.
    s2_only = instre_module(root, seed=0, subsets=["INSTRE-S2"]).selection
    assert [im.image_id for im in s2_only.train] == train["INSTRE-S2/01_toy"]


def test_instre_labels_follow_the_sorted_class_order(tmp_path):
    dm = instre_module(make_instre(tmp_path / "INSTRE"))
    assert dm.num_classes == 4
    assert dm.category_names == ["__background__", "INSTRE-S1/2_cup", "INSTRE-S1/10_book", "INSTRE-S2/01_toy"]
    for im in dm.selection.train + dm.selection.val:
        assert {obj.label for obj in im.objects} == {LABELS[im.image_id.rsplit("/", 1)[0]]}
    assert instre_module(tmp_path / "INSTRE", subsets=["INSTRE-S2"]).num_classes == 2


def test_instre_boxes_are_converted_from_xywh_and_clipped(tmp_path):
    root = make_instre(tmp_path / "INSTRE")
    dm = instre_module(root, images_per_class=9, val_images_per_class=0)  # every image, to know which is where
    ds = dm.build_dataset("train")
    assert dm.build_dataset("val") is None
    assert len(ds) == 27
    index = {ds.image_key(k): k for k in range(len(ds))}
    target = ds.load_target(index["INSTRE-S1/10_book/003"], 30, 40)
    assert target["boxes"].tolist() == [[3.0, 2.0, 13.0, 14.0]]  # 'x y w h' = '3 2 10 12'
    assert target["labels"].tolist() == [2]
    assert target["area"].tolist() == [120.0]
    assert target["iscrowd"].tolist() == [0]
    two = ds.load_target(index["INSTRE-S1/2_cup/009"], 30, 40)
    # '35 20 10 20' = [35, 20, 45, 40], clipped to the 40x30 image
    assert two["boxes"].tolist() == [[9.0, 2.0, 19.0, 14.0], [35.0, 20.0, 40.0, 30.0]]
    assert two["labels"].tolist() == [1, 1]


def test_instre_train_dataloader_batch(tmp_path):
    dm = instre_module(make_instre(tmp_path / "INSTRE"), train_short_sides=[60], max_size=80)
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == len(targets) == 2
    for image, target in zip(images, targets):
        assert image.dtype == torch.float32 and tuple(image.shape) == (3, 60, 80)  # 40x30 scaled x2
        assert set(target) >= {"boxes", "labels", "iscrowd", "area", "image_id", "instance_ids", "orig_size"}
        assert target["orig_size"].tolist() == [30, 40]
        assert target["boxes"].shape[1] == 4 and target["labels"].min() >= 1
    val_images, _ = next(iter(dm.val_dataloader()))
    assert tuple(val_images[0].shape) == (3, 60, 80)  # one scale, the long side capped by max_size
    paper_scale = instre_module(tmp_path / "INSTRE", hflip=0.0)
    train_images, _ = next(iter(paper_scale.train_dataloader()))
    assert tuple(train_images[0].shape) == (3, 600, 800)  # short side 600, long side <= 1000


def test_instre_refusals_name_the_class_and_file(tmp_path):
    root = make_instre(tmp_path / "INSTRE")
    with pytest.raises(ValueError, match="two objects"):
        instre_module(root, subsets=["INSTRE-M"])
    with pytest.raises(FormatError, match=r"2_cup: too few images.*4 \+ 6 images wanted, only 9"):
        _ = instre_module(root, subsets=["INSTRE-S1"], val_images_per_class=6).selection
    for i in range(1, 10):
        os.remove(root / f"INSTRE-S1/10_book/{i:03d}.txt")
    with pytest.raises(FileNotFoundError, match=r"annotation of 00\d\.jpg(.|\n)*10_book/00\d\.txt"):
        _ = instre_module(root, subsets=["INSTRE-S1"]).selection
    assert instre_module(root, subsets=["INSTRE-S2"]).num_classes == 2  # an unselected subset is not read


def test_instre_benchmark_with_and_without_the_finetune_images(tmp_path):
    root = make_instre(tmp_path / "INSTRE")
    path = convert("instre", root, tmp_path / "instre.json").path
    standard = Benchmark.load(path)
    kept = instre_module(root, benchmark=path).load_benchmark()
    assert kept.database == standard.database  # the paper's reading: nothing leaves

    dm = instre_module(root, benchmark=path, exclude_finetune_images=True)
    served = dm.load_benchmark()
    trained = {im.image_id for im in dm.selection.train}
    validated = {im.image_id for im in dm.selection.val}
    assert served.database == [i for i in standard.database if i not in trained]
    assert len(served.database) < len(standard.database)
    assert validated & set(standard.database) <= set(served.database)  # validation images stay
    assert [q.id for q in served.queries] == [q.id for q in standard.queries]
    for qid, g in served.ground_truth.items():
        assert set(g.positives) == set(standard.ground_truth[qid].positives) - trained
    assert served.name == "instre-minus-finetune"
    assert dm.load_benchmark() is served  # cached
    assert len(dm.benchmark_dataloaders()[0].dataset) == len(served.database) + len(served.queries)


# ============================================================================ Oxford / Paris
# landmark -> query number -> (image number, box as written, box as clipped to 40x30)
OXFORD_QUERIES = {"bodleian": {1: (2, "-5 1 39 50", [0.0, 1.0, 39.0, 30.0])},
                  "all_souls": {1: (1, "2.5 3 20.5 25", [2.5, 3.0, 20.5, 25.0]),
                                2: (2, "1 1 11 11", [1.0, 1.0, 11.0, 11.0])},
                  "ashmolean": {1: (1, "4 5 24 25", [4.0, 5.0, 24.0, 25.0])}}
OXFORD_LABELS = {"all_souls": 1, "ashmolean": 2, "bodleian": 3}


def make_oxford(root: Path, paris: bool = False) -> Path:
    """Three landmarks with three images each; every query's good list is its landmark's images."""
    prefix = "" if paris else "oxc1_"
    for landmark, queries in OXFORD_QUERIES.items():
        stems = [f"{landmark}_{i:06d}" for i in range(1, 4)]
        for stem in stems:
            jpeg(root / "jpg" / (landmark if paris else "") / f"{stem}.jpg")
        for n, (image, box, _) in queries.items():
            qid = f"{landmark}_{n}"
            text(root / "gt_files" / f"{qid}_query.txt", f"{prefix}{landmark}_{image:06d} {box}\n")
            text(root / "gt_files" / f"{qid}_good.txt", "\n".join(stems) + "\n")
            text(root / "gt_files" / f"{qid}_ok.txt", "")
            text(root / "gt_files" / f"{qid}_junk.txt", "")
    return root


@pytest.mark.parametrize("paris", [False, True], ids=["oxford5k", "paris6k"])
def test_oxford_serves_exactly_the_query_images(tmp_path, paris):
    root = make_oxford(tmp_path / "ox", paris=paris)
    dm = OxfordFinetuneDataModule(root, num_workers=0)
    assert dm.num_classes == 4
    assert dm.category_names == ["__background__", "all_souls", "ashmolean", "bodleian"]
    ds = dm.build_dataset("train")
    assert dm.build_dataset("val") is None and dm.val_dataloader() == []
    served = {ds.image_key(k): ds.load_target(k, 30, 40) for k in range(len(ds))}
    expected = {f"{lm}_{image:06d}": ([clipped], [OXFORD_LABELS[lm]])
                for lm, queries in OXFORD_QUERIES.items() for image, _, clipped in queries.values()}
    assert {k: (t["boxes"].tolist(), t["labels"].tolist()) for k, t in served.items()} == expected
    if paris:
        assert ds.image_path(0).parent.name == ds.image_key(0).rsplit("_", 1)[0]  # jpg/<landmark>/<image>.jpg
    images, targets = next(iter(OxfordFinetuneDataModule(root, num_workers=0, batch_size=4).train_dataloader()))
    assert len(images) == 4 and all("boxes" in t and "labels" in t for t in targets)


def test_oxford_benchmark_without_the_query_images(tmp_path):
    root = make_oxford(tmp_path / "ox")
    path = convert("oxford5k", root, tmp_path / "ox.json").path
    assert OxfordFinetuneDataModule(root, benchmark=path).load_benchmark().database == Benchmark.load(path).database
    served = OxfordFinetuneDataModule(root, benchmark=path, exclude_finetune_images=True).load_benchmark()
    assert served.database == ["all_souls_000003", "ashmolean_000002", "ashmolean_000003", "bodleian_000001",
                               "bodleian_000003"]
    # every query stays a query, though its own image left the database
    assert [q.id for q in served.queries] == ["all_souls_1", "all_souls_2", "ashmolean_1", "bodleian_1"]
    assert served.query_by_id["all_souls_2"].image == "all_souls_000002"
    assert set(served.ground_truth["all_souls_1"].positives) == {"all_souls_000003"}
    assert set(served.ground_truth["bodleian_1"].positives) == {"bodleian_000001", "bodleian_000003"}
    assert served.extra["finetune_images_excluded"] == 4


def test_exclusion_refuses_another_datasets_benchmark_and_follows_a_new_path(tmp_path):
    ox_root = make_oxford(tmp_path / "ox")
    ox_path = convert("oxford5k", ox_root, tmp_path / "ox.json").path
    instre_path = convert("instre", make_instre(tmp_path / "INSTRE"), tmp_path / "instre.json").path
    dm = OxfordFinetuneDataModule(ox_root, benchmark=instre_path, exclude_finetune_images=True)
    with pytest.raises(ValueError, match="none of the 4 fine-tuning images"):
        dm.load_benchmark()
    dm.benchmark = str(ox_path)
    assert len(dm.load_benchmark().database) == 5


@pytest.mark.parametrize("module, make, remove, match", [
    (InstreFinetuneDataModule, None, None, r"INSTRE root.*data(.|\n)*INSTRE-S1/<class>/NNN\.jpg"),
    (InstreFinetuneDataModule, make_instre, "INSTRE-S2", r"INSTRE subset INSTRE-S2.*data/INSTRE-S2(.|\n)*layout"),
    (OxfordFinetuneDataModule, None, None, r"Oxford / Paris root(.|\n)*gt_files/<name>_<n>_query\.txt"),
    (OxfordFinetuneDataModule, make_oxford, "gt_files", r"ground-truth folder.*data/gt_files(.|\n)*layout"),
], ids=["instre-root", "instre-subset", "oxford-root", "oxford-gt_files"])
def test_a_missing_folder_is_named_with_the_expected_layout(tmp_path, module, make, remove, match):
    root = tmp_path / "data"
    if make is not None:
        shutil.rmtree(make(root) / remove)
    with pytest.raises(FileNotFoundError, match=match):
        module(root)


def test_oxford_without_query_files(tmp_path):
    root = make_oxford(tmp_path / "ox")
    for qfile in (root / "gt_files").glob("*_query.txt"):
        os.remove(qfile)
    with pytest.raises(FileNotFoundError, match=r"no '<name>_<n>_query\.txt' files in .*ox/gt_files"):
        _ = OxfordFinetuneDataModule(root).num_classes


def test_an_unreadable_query_image_is_reported_and_skipped(tmp_path):
    root = make_oxford(tmp_path / "ox")
    os.remove(root / "jpg/ashmolean_000001.jpg")
    dm = OxfordFinetuneDataModule(root, num_workers=0)
    ds = dm.build_dataset("train")
    assert sorted(ds.image_key(k) for k in range(len(ds))) == ["all_souls_000001", "all_souls_000002",
                                                               "bodleian_000002"]
    assert [e["image"] for e in dm.bad_image_report().entries] == ["ashmolean_000001"]


def test_fit_smoke(tmp_path):
    import pytorch_lightning as pl

    from instsearch.lightning_modules.detector import DetectorModule
    from instsearch.networks.deep_region_cnn import DeepRegionCNN

    dm = instre_module(make_instre(tmp_path / "INSTRE"), train_short_sides=[60], max_size=80, test_short_side=60,
                       val_images_per_class=0)
    model = DetectorModule(DeepRegionCNN("small", num_classes=dm.num_classes, min_size=60, max_size=80))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, limit_val_batches=0, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
