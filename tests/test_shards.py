"""Region shards on disk: parts written atomically, read back row for row, refused when foreign."""
from __future__ import annotations

import json

import numpy as np
import pytest

from instsearch.eval.shards import RegionShards, ShardImage, ShardQuery, ShardWriter, part_name


def _image(image_id: str, n: int, dim: int, rng: np.random.Generator, labels: bool = False) -> ShardImage:
    return ShardImage(image_id, boxes=rng.uniform(0, 50, (n, 4)).astype(np.float32),
                      scores=rng.uniform(0, 1, n).astype(np.float32),
                      features=rng.standard_normal((n, dim)).astype(np.float32),
                      labels=rng.integers(0, 5, n) if labels else None)


def _manifest(**extra):
    return {"model": "Net", "config_sha256": "c", "checkpoint_sha256": None, "benchmark_sha256": "b",
            "part_size": 3, **extra}


def test_parts_read_back_in_order(tmp_path):
    rng = np.random.default_rng(0)
    writer = ShardWriter(tmp_path, _manifest(num_parts=2), dtype="float32")
    writer.write_manifest()
    part1 = [_image("c", 2, 8, rng), _image("d", 0, 8, rng)]
    part0 = [_image("a", 3, 8, rng), _image("b", 1, 8, rng)]
    query = ShardQuery("q1", "a", rng.standard_normal(8).astype(np.float32), label=None)
    writer.write_part(1, part1, [query])  # parts finish in any order
    assert writer.complete_parts() == {1}
    writer.write_part(0, part0, bad=[{"image": "x", "reason": "truncated"}])
    shards = RegionShards(tmp_path)
    assert shards.parts == [0, 1]
    assert shards.image_ids == ["a", "b", "c", "d"]
    assert shards.image_starts.tolist() == [0, 3, 4, 6, 6]
    assert shards.offsets.tolist() == [0, 4, 6]
    expected = np.concatenate([im.features for im in part0 + part1])
    np.testing.assert_array_equal(shards.rows(np.array([5, 0, 3])), expected[[5, 0, 3]])
    np.testing.assert_array_equal(shards.boxes(1), part1[0].boxes)
    meta = shards.meta(0)
    assert meta["image_id"].tolist() == ["a", "a", "a", "b"] and meta["slot"].tolist() == [0, 1, 2, 0]
    ids, features, labels = shards.queries()
    assert ids == ["q1"] and labels == [None]
    np.testing.assert_array_equal(features[0], query.feature)
    assert shards.bad_images == [{"image": "x", "reason": "truncated"}]
    sample = shards.sample(4, seed=1)
    assert all(any(np.array_equal(s, e) for e in expected) for s in sample)


def test_float16_rows_and_labels(tmp_path):
    rng = np.random.default_rng(1)
    writer = ShardWriter(tmp_path, _manifest(num_parts=1))
    writer.write_manifest()
    image = _image("a", 4, 6, rng, labels=True)
    writer.write_part(0, [image])
    shards = RegionShards(tmp_path)
    assert shards.features(0).dtype == np.float16 and shards.has_labels
    np.testing.assert_array_equal(shards.rows(np.arange(4)), image.features.astype(np.float16).astype(np.float32))
    assert shards.meta(0, ["label"])["label"].tolist() == image.labels.tolist()


def test_incomplete_and_foreign_folders_are_refused(tmp_path):
    writer = ShardWriter(tmp_path, _manifest(num_parts=2))
    writer.write_manifest()
    writer.write_part(0, [_image("a", 1, 4, np.random.default_rng(0))])
    with pytest.raises(ValueError, match=f"1 of 2 parts are not complete.*{part_name(1)}"):
        RegionShards(tmp_path)
    assert RegionShards(tmp_path, require_complete=False).parts == [0]
    with pytest.raises(ValueError, match="another extraction.*config_sha256"):
        ShardWriter(tmp_path, _manifest(num_parts=2, config_sha256="other"))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        RegionShards(tmp_path / "nothing")


def test_no_temporary_file_is_left_and_part_json_is_the_commit(tmp_path):
    writer = ShardWriter(tmp_path, _manifest(num_parts=1))
    writer.write_part(0, [_image("a", 2, 4, np.random.default_rng(0))])
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    record = json.loads((tmp_path / "parts" / "part-00000.json").read_text())
    assert record["regions"] == 2 and record["images"] == ["a"] and record["region_counts"] == [2]
