"""Every shipped config parses against the classes it names (a renamed or removed option fails),
and the pieces it includes (configs/data/, configs/model/, configs/net/) compose as the CLI reads them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from instsearch.lightning_cli import InstsearchCLI, lightning_cli
from instsearch.config_files import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


class ParseOnly(InstsearchCLI):
    """Parses and type-checks the whole config without building the (large) models."""

    def instantiate_classes(self) -> None:
        pass


def parse(*args: str):
    return lightning_cli(list(args), run=False, cli_class=ParseOnly).config


def missing_or_different(parsed: Any, loaded: Any, key: str = "") -> list[str]:
    """The keys of ``loaded`` whose value ``parsed`` (the CLI's config, as a dict) lacks or
    differs in; ``parsed`` may hold more (the defaults of every class)."""
    if isinstance(loaded, dict):
        if not isinstance(parsed, dict):
            return [key]
        return [k for name, value in loaded.items()
                for k in missing_or_different(parsed.get(name, KeyError), value, f"{key}.{name}")]
    if isinstance(loaded, list):
        if not isinstance(parsed, list) or len(parsed) != len(loaded):
            return [key]
        return [k for i, (p, v) in enumerate(zip(parsed, loaded)) for k in missing_or_different(p, v, f"{key}[{i}]")]
    same = parsed == loaded or (parsed is not KeyError and str(parsed) == str(loaded))  # "3:00:00" -> timedelta
    return [] if same else [f"{key}: {parsed!r} != {loaded!r}"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses(config):
    """Through the real CLI; and :func:`load_config` reads every value the CLI reads from the
    config and the pieces it includes."""
    parsed = parse("--config", str(config))
    assert parsed["model"]["class_path"].startswith("instsearch.lightning_modules.")
    assert parsed["data"]["class_path"].startswith("instsearch.datamodules.")
    assert not missing_or_different(parsed.as_dict(), load_config(config))


def test_a_removed_option_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    source = load_config(next(c for c in CONFIGS if "retrieval" in load_config(c)))
    source["retrieval"]["max_side"] = 1000
    bad.write_text(yaml.safe_dump(source))
    with pytest.raises(SystemExit):
        parse("--config", str(bad))
    assert "max_side" in capsys.readouterr().err


# ---------------------------------------------------------------- included pieces
DASR = {"class_path": "instsearch.networks.dasr.DASR", "init_args": {"backbone": "small", "long_side": 96, "tau": 0.3}}


def write(path: Path, content: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


@pytest.fixture
def composed(tmp_path, monkeypatch) -> Path:
    """A config naming its pieces by path: ``model:`` a piece that itself names its network
    (``net: ../net/dasr.yaml``, next to the piece), ``data:`` a piece, the trainer in place; read
    from another working directory."""
    configs = tmp_path / "configs"
    write(configs / "net" / "dasr.yaml", DASR)
    write(configs / "model" / "free.yaml", {
        "class_path": "instsearch.lightning_modules.training_free.TrainingFreeModule",
        "init_args": {"net": "../net/dasr.yaml", "retrieval": {"normalization": "min"}}})
    write(configs / "data" / "bench.yaml", {"class_path": "instsearch.datamodules.benchmark.BenchmarkDataModule",
                                             "init_args": {"benchmark": "/data/B/benchmark.json", "max_side": 640}})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return write(configs / "run.yaml", "seed_everything: 3\ntrainer:\n  logger: false\n  max_epochs: 2\n"
                                       "model: model/free.yaml\ndata: data/bench.yaml\n")


def test_an_included_pieces_values_reach_the_parsed_config(composed):
    parsed = parse("--config", str(composed))
    net = parsed["model"]["init_args"]["net"]
    assert net["class_path"] == DASR["class_path"] and (net["init_args"]["long_side"], net["init_args"]["tau"]) == (96, 0.3)
    assert parsed["model"]["init_args"]["retrieval"]["normalization"] == "min"
    assert (parsed["data"]["init_args"]["benchmark"], parsed["data"]["init_args"]["max_side"]) == ("/data/B/benchmark.json", 640)
    assert (parsed["seed_everything"], parsed["trainer"]["max_epochs"]) == (3, 2)
    loaded = load_config(composed)
    assert loaded["model"]["init_args"]["net"] == DASR and loaded["data"]["init_args"]["max_side"] == 640
    assert not missing_or_different(parsed.as_dict(), loaded)


def test_the_command_line_wins_over_an_included_piece(composed):
    parsed = parse("--config", str(composed), "--model.init_args.net.init_args.long_side=128",
                   "--data.init_args.max_side=500")
    assert parsed["model"]["init_args"]["net"]["init_args"]["long_side"] == 128
    assert parsed["model"]["init_args"]["net"]["init_args"]["tau"] == 0.3  # the rest of the piece stays
    assert (parsed["data"]["init_args"]["max_side"], parsed["data"]["init_args"]["benchmark"]) == (500, "/data/B/benchmark.json")


def test_a_key_of_the_including_config_replaces_the_included_one_whole(tmp_path):
    """``config: base.yaml`` in a file: base's top-level keys, each replaced whole by a later key
    of the including file -- a partial ``trainer:`` there does not merge with base's (jsonargparse
    merges only options given on the command line or in another ``--config``), which is why a piece
    holds only a value that configs share as it is."""
    write(tmp_path / "base" / "common.yaml", {"seed_everything": 7, "trainer": {"accelerator": "cpu", "max_epochs": 3},
                                              "model": "../model.yaml", "data": "../data.yaml"})
    write(tmp_path / "model.yaml", {"class_path": "instsearch.lightning_modules.training_free.TrainingFreeModule",
                                    "init_args": {"net": DASR}})
    write(tmp_path / "data.yaml", {"class_path": "instsearch.datamodules.benchmark.BenchmarkDataModule",
                                   "init_args": {"benchmark": "/data/B/benchmark.json"}})
    run = write(tmp_path / "run.yaml", "config: base/common.yaml\ntrainer:\n  logger: false\n  max_epochs: 5\n")
    parsed = parse("--config", str(run))
    assert parsed["seed_everything"] == 7 and parsed["model"]["init_args"]["net"]["init_args"]["tau"] == 0.3
    assert parsed["trainer"]["max_epochs"] == 5  # the including file's value wins
    assert parsed["trainer"]["accelerator"] == "auto"  # base's trainer replaced, not merged: the default
    loaded = load_config(run)
    assert loaded["trainer"] == {"logger": False, "max_epochs": 5} and loaded["seed_everything"] == 7
    assert loaded["model"]["init_args"]["net"] == DASR
    assert not missing_or_different(parsed.as_dict(), loaded)


def test_load_config_reads_a_plain_value_as_it_is(tmp_path):
    """Only a string naming an existing .yaml/.yml file is an include."""
    write(tmp_path / "piece.yaml", {"a": 1})
    config = write(tmp_path / "c.yaml", {"x": "piece.yaml", "y": "missing.yaml", "z": "piece.json", "w": ["piece.yaml"]})
    write(tmp_path / "piece.json", "{}")
    assert load_config(config) == {"x": {"a": 1}, "y": "missing.yaml", "z": "piece.json", "w": [{"a": 1}]}


def test_lightning_cli_is_called_without_the_args_and_argv_ambiguity(monkeypatch):
    import warnings

    monkeypatch.setattr("sys.argv", ["instsearch", "fit", "--config", "other.yaml"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lightning_cli(["--config", str(CONFIGS[0])], run=False, cli_class=ParseOnly)
    assert not [w for w in caught if "args parameter" in str(w.message)]
    import sys

    assert sys.argv == ["instsearch", "fit", "--config", "other.yaml"]  # restored


def test_framework_advertisements_are_silenced_and_real_messages_kept(caplog):
    import logging

    from pytorch_lightning.utilities import rank_zero_info

    from instsearch.console import quiet_framework_noise

    quiet_framework_noise()
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing litlogger")
        rank_zero_info("GPU available: False, used: False")
    messages = [r.getMessage() for r in caplog.records]
    assert "GPU available: False, used: False" in messages
    assert not [m for m in messages if "Tip" in m]


def test_every_deep_region_cnn_config_states_what_it_searches():
    from instsearch.demo import build_args

    searched = {}
    for config in CONFIGS:
        if config.stem.startswith("deep_region_cnn"):
            net = load_config(config)["model"]["init_args"]["net"]["init_args"]
            searched[config.stem] = (net["fusion"], net["region_feature"], net["top_k"])
    assert searched.pop("deep_region_cnn_synthetic") == ("none", "roi", 10)  # the demo's per-region search
    assert searched and set(searched.values()) == {("concat", "crop_fc7", 2)}  # the paper's: top-2 crop FC7 concatenated
    assert "--model.net.fusion=none" in build_args(Path("out"), Path("data"), "cpu", 1, 0, 7, 0)


def test_command_line_model_keys_are_found_in_both_spellings():
    from instsearch.lightning_cli import command_line_keys

    argv = ["test", "--config", "c.yaml", "--model.init_args.search=exact", "--model.retrieval.normalization", "min",
            "--data.benchmark", "b.json", "--ckpt_path", "x.ckpt"]
    assert command_line_keys(argv, "model") == ["model.init_args.search", "model.retrieval.normalization"]
