"""The LightningCLI behind ``instsearch fit|validate|test|predict`` (and ``extract``, ``whitening``,
the demo): the retrieval evaluation callback always attached, ``--model.*`` options on the command
line winning over a checkpoint's hyper-parameters."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional

from pytorch_lightning.cli import LightningCLI


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
