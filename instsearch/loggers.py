"""Loggers: CSV always, wandb online when credentials exist and offline otherwise."""
from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Optional

from pytorch_lightning.loggers import WandbLogger as _WandbLogger


def wandb_credentials_available() -> bool:
    """An API key in the environment or in ~/.netrc (what ``wandb login`` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc"))).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_WandbLogger):
    """Lightning's WandbLogger that goes offline by itself when there is no API key.

    An offline run keeps everything (metrics, images, config) in ``save_dir/wandb/offline-run-*``;
    ``wandb sync`` uploads it later.
    """

    def __init__(self, project: str = "instsearch", save_dir: str = "runs", offline: Optional[bool] = None,
                 name: Optional[str] = None, log_model: bool = False, **kwargs: Any):
        if offline is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_credentials_available()
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, offline=offline, name=name, log_model=log_model, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            # Lightning always passes the key, and wandb warns that the setting is deprecated
            self._wandb_init.pop("anonymous", None)
