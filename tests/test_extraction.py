"""The model side of evaluation: frames, query boxes, labels and bad items (no network needed)."""
from __future__ import annotations

import pytest
import torch

from instsearch.eval.evaluator import RetrievalConfig, RetrievalEvaluator
from instsearch.eval.extraction import extract_batch
from instsearch.formats import Benchmark
from instsearch.structures import ImageMeta, RegionSearchModel, Regions


class BoxEcho(torch.nn.Module):
    """Returns one fixed box in served pixels, and remembers the query boxes it was given."""

    feature_dim = 2
    predicts_labels = False

    def __init__(self):
        super().__init__()
        self.seen_boxes: list[torch.Tensor] = []

    def detect_regions(self, images):
        return [Regions(boxes=torch.tensor([[10.0, 20.0, 30.0, 40.0]]), scores=torch.ones(1),
                        features=torch.tensor([[1.0, 0.0]]), masks=torch.ones(1, *im.shape[-2:]))
                for im in images]

    def describe_boxes(self, images, boxes):
        self.seen_boxes += [b.clone() for b in boxes]
        return [torch.tensor([[0.0, 1.0]]) for _ in boxes]

    def classify_boxes(self, images, boxes):
        raise AssertionError("not called")


def test_the_protocol_declares_what_evaluation_needs():
    assert isinstance(BoxEcho(), RegionSearchModel)

    class NoDim(torch.nn.Module):
        predicts_labels = False

        def detect_regions(self, images): ...
        def describe_boxes(self, images, boxes): ...
        def classify_boxes(self, images, boxes): ...

    assert not isinstance(NoDim(), RegionSearchModel)


def test_regions_rescaled_by_hand():
    r = Regions(boxes=torch.tensor([[10.0, 20.0, 30.0, 40.0]]), scores=torch.ones(1),
                masks=torch.zeros(1, 50, 100), image_size=(50, 100))
    r.masks[0, :25, :50] = 1.0
    big = r.rescaled((100, 400))  # height x2, width x4
    assert big.boxes.tolist() == [[40.0, 40.0, 120.0, 80.0]]
    assert big.image_size == (100, 400) and big.masks.shape == (1, 100, 400)
    assert big.masks[0, :48, :196].min() == 1.0 and big.masks[0, 52:, 204:].max() == 0.0
    assert r.rescaled((50, 100)) is r
    with pytest.raises(ValueError, match="image_size"):
        Regions(boxes=torch.zeros(1, 4), scores=torch.ones(1)).rescaled((1, 1))


def test_database_boxes_come_back_in_original_pixels_and_query_boxes_go_to_the_served_frame():
    net = BoxEcho()
    served = torch.zeros(3, 50, 100)  # the original is 100 x 200: the loader halved it
    db = ImageMeta("a", orig_size=(100, 200))
    q = ImageMeta("a", orig_size=(100, 200), query_id="q1", query_box=(20.0, 40.0, 60.0, 80.0))
    bad = ImageMeta("b", orig_size=(10, 10), extra={"error": "truncated", "path": "b.jpg"})
    out = extract_batch(net, [served, served, None], [db, q, bad], keep_masks=True)
    (meta, regions), = out.database
    assert meta is db and regions.boxes.tolist() == [[20.0, 40.0, 60.0, 80.0]]
    assert regions.image_size == (100, 200) and regions.masks.shape == (1, 100, 200)
    assert net.seen_boxes[0].tolist() == [[10.0, 20.0, 30.0, 40.0]]
    assert out.queries[0].meta is q and out.queries[0].feature.tolist() == [0.0, 1.0] and out.queries[0].label is None
    assert out.bad == [bad]


def test_category_pruning_needs_a_network_that_predicts_labels():
    with pytest.raises(TypeError, match="predicts no categories"):
        extract_batch(BoxEcho(), [torch.zeros(3, 4, 4)], [ImageMeta("a", (4, 4))], with_labels=True)


def test_evaluator_caps_regions_and_lists_each_bad_image_once(tmp_path):
    bench = Benchmark.from_dict({
        "format": "instsearch-benchmark/1", "name": "t", "image_root": ".",
        "images": [{"id": "a", "file": "a.jpg", "width": 200, "height": 100},
                   {"id": "b", "file": "b.jpg", "width": 10, "height": 10},
                   {"id": "c", "file": "c.jpg", "width": 200, "height": 100}],
        "database": ["a", "b"], "queries": [{"id": "q1", "image": "c", "box": [20, 40, 60, 80]}],
        "ground_truth": {"q1": {"positives": [{"image": "a", "boxes": [[20, 40, 60, 80]]}], "junk": []}}},
        root=tmp_path)
    ev = RetrievalEvaluator(bench, RetrievalConfig(regions_per_image=1))
    regions = Regions(boxes=torch.tensor([[0.0, 0, 5, 5], [20, 40, 60, 80]]), scores=torch.tensor([0.1, 0.9]),
                      features=torch.tensor([[0.0, 1.0], [1.0, 0.0]]), image_size=(100, 200))
    bad = ImageMeta("b", (10, 10), extra={"error": "truncated", "path": "b.jpg"})
    from instsearch.eval.extraction import QueryFeature, SearchBatch

    ev.process(SearchBatch(database=[(ImageMeta("a", (100, 200)), regions)],
                           queries=[QueryFeature(ImageMeta("c", (100, 200), "q1", (20, 40, 60, 80)),
                                                 torch.tensor([1.0, 0.0]))], bad=[bad]))
    ev.process(SearchBatch(bad=[bad]))  # a padded sampler serves it twice
    result = ev.compute()
    assert ev.database["a"].boxes.tolist() == [[20.0, 40.0, 60.0, 80.0]]
    assert result.metrics["regions_per_image"] == 1.0 and result.metrics["bad_images"] == 1
    assert result.run.rankings["q1"][0].box == (20.0, 40.0, 60.0, 80.0)
    assert result.metrics["mAP@all"] == 1.0 and result.metrics["mIoU"] == 1.0


def test_recall_without_ground_truth_boxes_is_undefined_not_zero(tmp_path):
    import json
    import math

    from instsearch.eval.score_run import format_metrics_table
    from instsearch.eval.extraction import QueryFeature, SearchBatch
    from instsearch.eval.metrics import json_ready, loggable

    bench = Benchmark.from_dict({
        "format": "instsearch-benchmark/1", "name": "t", "image_root": ".",
        "images": [{"id": "a", "file": "a.jpg", "width": 200, "height": 100},
                   {"id": "c", "file": "c.jpg", "width": 200, "height": 100}],
        "database": ["a"], "queries": [{"id": "q1", "image": "c", "box": [20, 40, 60, 80]}],
        "ground_truth": {"q1": {"positives": [{"image": "a"}], "junk": []}}}, root=tmp_path)
    ev = RetrievalEvaluator(bench)
    regions = Regions(boxes=torch.tensor([[20.0, 40, 60, 80]]), scores=torch.ones(1),
                      features=torch.tensor([[1.0, 0.0]]), image_size=(100, 200))
    ev.process(SearchBatch(database=[(ImageMeta("a", (100, 200)), regions)],
                           queries=[QueryFeature(ImageMeta("c", (100, 200), "q1", (20, 40, 60, 80)),
                                                 torch.tensor([1.0, 0.0]))]))
    result = ev.compute()
    m = result.metrics
    assert m["mAP@all"] == 1.0
    assert math.isnan(m["recall@IoU0.5"]) and math.isnan(m["recall@IoU0.7"]) and math.isnan(m["mIoU"])
    written = json.loads(json.dumps(json_ready(m)))
    assert written["recall@IoU0.5"] is None and written["mIoU"] is None and written["mAP@all"] == 1.0
    assert json.loads(json.dumps(json_ready(result.recall_curve)))["recall"] == [None] * 9
    logged = loggable(m)
    assert "mAP@all" in logged and not {"recall@IoU0.5", "recall@IoU0.7", "mIoU"} & set(logged)
    table = format_metrics_table({"test": m})
    header, row = table.splitlines()[0].split(), table.splitlines()[2].split()
    assert row[header.index("recall@IoU0.5")] == "n/a"


def test_box_frames_map_between_original_and_served_pixels_by_hand():
    """An original 200 x 100 (h x w) image served at 50 x 40: x scales by 0.4, y by 0.25."""
    from instsearch.eval.extraction import to_original_frame, to_served_frame

    meta = ImageMeta("a", (200, 100))
    served = torch.zeros(3, 50, 40)
    box = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    torch.testing.assert_close(to_served_frame(box, meta, served), torch.tensor([[4.0, 5.0, 12.0, 10.0]]))
    torch.testing.assert_close(to_original_frame(torch.tensor([[4.0, 5.0, 12.0, 10.0]]), meta, served), box)


def test_a_collection_keeps_the_best_regions_and_collapses_repeated_images():
    """A padded sampler serves an image twice: it is kept once; regions_per_image keeps the
    highest-scoring ones; the store concatenates in the order asked."""
    from instsearch.eval.extraction import RegionCollection, SearchBatch

    def regions(scores):
        n = len(scores)
        return Regions(boxes=torch.arange(4.0).repeat(n, 1), scores=torch.tensor(scores),
                       features=torch.tensor(scores)[:, None].repeat(1, 2))

    collection = RegionCollection(regions_per_image=2)
    a, b = ImageMeta("a", (10, 10)), ImageMeta("b", (10, 10))
    collection.add(SearchBatch(database=[(a, regions([0.1, 0.9, 0.5])), (b, regions([0.3]))]))
    collection.add(SearchBatch(database=[(a, regions([0.1, 0.9, 0.5]))]))
    assert sorted(collection.database) == ["a", "b"]
    store = collection.store(["b", "a"])
    assert store.image_ids == ["b", "a"]
    assert store.scores.tolist() == pytest.approx([0.3, 0.9, 0.5])
    assert store.image_index.tolist() == [0, 1, 1]
