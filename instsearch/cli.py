"""The ``instsearch`` command: Lightning's fit/validate/test/predict plus the project's tools."""
from __future__ import annotations

import contextlib
import importlib
import sys
from typing import Callable, Iterator, Optional

from pytorch_lightning.cli import LightningCLI

TOOLS: dict[str, tuple[str, str]] = {
    "synth": ("instsearch.synthetic:main", "generate the synthetic instance-search benchmark"),
    "convert": ("instsearch.datamodules.converters:main", "convert a public benchmark (INSTRE, Oxford, Paris, Holidays, ...) to benchmark.json"),
    "extract": ("instsearch.extract_cli:main", "a benchmark's regions and query features into region shards on disk (restartable, DDP)"),
    "index": ("instsearch.index_cli:main", "build an ANN index over region shards (faiss key or memory budget; IVF lists merged on disk)"),
    "search": ("instsearch.search_cli:main", "search region shards through an index (ANN shortlist, exact best-region rescoring) -> run.json, metrics.json"),
    "evaluate": ("instsearch.eval.score_run:main", "score a run.json against a benchmark.json (mAP@k, mIoU)"),
    "whitening": ("instsearch.whitening_cli:main", "fit the PCA-whitening on another benchmark's database and save it (.npz)"),
    "demo": ("instsearch.demo:main", "synthetic benchmark -> untrained vs trained vs global GeM, end to end"),
    "vlad-vocabulary": ("instsearch.vlad_vocabulary:main", "fit DASR's VLAD* vocabulary (words, LCS, PCA) on another benchmark's database"),
    "dasr-figure": ("instsearch.dasr_figure:figure_main", "DASR's picture of one image: mean activation, peak maps, ellipses"),
    "claid-figure": ("instsearch.claid_figure:figure_main", "CLAID's picture of one image: the region hierarchy by depth, dummies, kept regions"),
}
LIGHTNING = {
    "fit": "train a model (LightningCLI; --config configs/*.yaml)",
    "validate": "run the validation loop and retrieval evaluation once",
    "test": "score a checkpoint on a benchmark: --ckpt_path X.ckpt [--data.benchmark B.json]; writes run.json, metrics.json",
    "predict": "extract regions and features of a benchmark's database",
}


class InstsearchCLI(LightningCLI):
    """LightningCLI with the retrieval evaluation callback always attached (``--retrieval.*``)."""

    def add_arguments_to_parser(self, parser) -> None:
        from instsearch.eval.callback import RetrievalEvaluation

        parser.add_lightning_class_args(RetrievalEvaluation, "retrieval")

    def _parse_ckpt_path(self) -> None:
        """Merge the checkpoint's hyper-parameters into the config, as LightningCLI does -- except
        the ``--model.*`` options given on the command line, which win: ``instsearch test
        --ckpt_path X.ckpt --model.init_args.retrieval.normalization min`` scores with ``min``
        (Lightning itself lets the checkpoint override them)."""
        # LightningCLI reads the checkpoint's hyper-parameters before any Trainer exists: a file cut
        # short fails here first, so say here which file it is (instsearch.checkpointing).
        from instsearch.checkpointing import UNREADABLE, unreadable_checkpoint

        subcommand = self.config.get("subcommand") if hasattr(self.config, "get") else None
        given = self.config.clone() if subcommand else None
        try:
            super()._parse_ckpt_path()
        except UNREADABLE as err:
            raise unreadable_checkpoint(self.config[self.config.subcommand].get("ckpt_path"), err) from err
        if given is None:
            return
        for key in command_line_keys(sys.argv[1:], "model"):
            for candidate in (f"{subcommand}.{key}", f"{subcommand}.model.init_args.{key[len('model.'):]}"):
                if candidate in given:
                    self.config[candidate] = given[candidate]
                    break


def command_line_keys(argv: list[str], group: str) -> list[str]:
    """The dotted option names under ``group`` given in ``argv`` (``--model.a.b=v`` or
    ``--model.a.b v`` -> ``model.a.b``)."""
    prefix = f"--{group}."
    return [token[2:].split("=", 1)[0] for token in argv if token.startswith(prefix)]


@contextlib.contextmanager
def _argv(args: list[str]) -> Iterator[None]:
    """LightningCLI reads ``sys.argv`` (passing ``args`` as well makes it warn about ambiguity):
    show it exactly the arguments of this call."""
    saved = sys.argv
    sys.argv = [saved[0] if saved else "instsearch", *args]
    try:
        yield
    finally:
        sys.argv = saved


def lightning_cli(args: Optional[list[str]] = None, run: bool = True, cli_class: type[InstsearchCLI] = InstsearchCLI,
                  **kwargs) -> InstsearchCLI:
    """The LightningCLI over ``args`` (default: ``sys.argv[1:]``)."""
    import pytorch_lightning as pl

    from instsearch.console import quiet_framework_noise

    quiet_framework_noise()

    defaults = {
        "logger": [
            {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "instsearch"}},
        ],
    }
    with _argv(list(sys.argv[1:] if args is None else args)):
        return cli_class(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True,
                             subclass_mode_data=True, trainer_defaults=defaults, save_config_kwargs={"overwrite": True},
                             run=run, auto_configure_optimizers=False, **kwargs)


def _usage() -> str:
    width = max(map(len, list(TOOLS) + list(LIGHTNING)))
    lines = ["usage: instsearch <command> [options]   (instsearch <command> --help for a command's options)", "",
             "training and evaluation (LightningCLI):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING.items()]
    lines += ["", "tools:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in TOOLS.items()]
    return "\n".join(lines)


def _load(target: str) -> Callable[[list[str]], int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in TOOLS:
        return int(_load(TOOLS[command][0])(rest) or 0)
    if command in LIGHTNING:
        lightning_cli([command, *rest])
        return 0
    print(f"instsearch: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
