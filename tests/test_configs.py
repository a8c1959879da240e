"""Every shipped config parses against the classes it names (a renamed or removed option fails)."""
from __future__ import annotations

from pathlib import Path

import pytest

from instsearch.cli import InstsearchCLI, lightning_cli

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


class ParseOnly(InstsearchCLI):
    """Parses and type-checks the whole config without building the (large) models."""

    def instantiate_classes(self) -> None:
        pass


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses(config):
    parsed = lightning_cli(["--config", str(config)], run=False, cli_class=ParseOnly).config
    assert parsed["model"]["class_path"].startswith("instsearch.lightning_modules.")
    assert parsed["data"]["class_path"].startswith("instsearch.datamodules.")


def test_a_removed_option_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    source = next(c for c in CONFIGS if "retrieval:\n" in c.read_text())  # a block-style retrieval section
    bad.write_text(source.read_text().replace("retrieval:\n", "retrieval:\n  max_side: 1000\n", 1))
    with pytest.raises(SystemExit):
        lightning_cli(["--config", str(bad)], run=False, cli_class=ParseOnly)
    assert "max_side" in capsys.readouterr().err


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
    import yaml

    from instsearch.demo import build_args

    searched = {}
    for config in CONFIGS:
        if config.stem.startswith("deep_region_cnn"):
            net = yaml.safe_load(config.read_text())["model"]["init_args"]["net"]["init_args"]
            searched[config.stem] = (net["fusion"], net["region_feature"], net["top_k"])
    assert searched.pop("deep_region_cnn_synthetic") == ("none", "roi", 10)  # the demo's per-region search
    assert searched and set(searched.values()) == {("concat", "crop_fc7", 2)}  # the paper's: top-2 crop FC7 concatenated
    assert "--model.net.fusion=none" in build_args(Path("out"), Path("data"), "cpu", 1, 0, 7, 0)


def test_command_line_model_keys_are_found_in_both_spellings():
    from instsearch.cli import command_line_keys

    argv = ["test", "--config", "c.yaml", "--model.init_args.search=exact", "--model.retrieval.normalization", "min",
            "--data.benchmark", "b.json", "--ckpt_path", "x.ckpt"]
    assert command_line_keys(argv, "model") == ["model.init_args.search", "model.retrieval.normalization"]
