"""Experiment trackers through accelerate: any it supports, each checked before the run starts.

Trackers that write files put them under <output-dir>/trackers/ (TensorBoard in trackers/lenet-dist/,
wandb in trackers/wandb/ with WANDB_MODE=offline, Aim, DVCLive); the ones that talk to a server
(MLflow, Comet, ClearML, SwanLab, Trackio) use their own settings, e.g. MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import configparser
import netrc
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from accelerate import Accelerator

from lenet_dist.config import TrainConfig
from lenet_dist.errors import UserError

PROJECT = "lenet-dist"
TRACKERS_DIR = "trackers"
PIP_PACKAGES = {"comet_ml": "comet-ml"}  # the rest install under their tracker's name


def require_installed(trackers: list[str]) -> None:
    """Fail in one line before the run starts, not in a traceback: a tracker not installed (naming its pip package),
    or wandb without a login or offline mode."""
    from accelerate.utils import imports

    for name in trackers:
        if name != "all" and not getattr(imports, f"is_{name}_available")():
            package = PIP_PACKAGES.get(name, name)
            raise UserError(f"--log-with {name}: the tracker is not installed; pip install {package}")
    if ("wandb" in trackers or ("all" in trackers and imports.is_wandb_available())) and not _wandb_can_log():
        raise UserError("--log-with wandb: not logged in to wandb; run `wandb login` (or set WANDB_API_KEY), or log "
                        "offline with WANDB_MODE=offline")


def _wandb_can_log() -> bool:
    """Offline or disabled (WANDB_MODE or its settings file), or credentials where wandb looks; asks no network."""
    settings = configparser.ConfigParser()
    settings.read(Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb") / "settings")
    mode = os.environ.get("WANDB_MODE") or settings.get("default", "mode", fallback="")
    if mode.lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY") or \
            os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def logging_dir(output_dir: Path) -> Path:
    return output_dir / TRACKERS_DIR


def start_trackers(accelerator: Accelerator, config: TrainConfig, output_dir: Path) -> None:
    if not config.log_with:
        return
    folder = str(logging_dir(output_dir))
    accelerator.init_trackers(
        PROJECT,
        config=hyperparameters(config),
        init_kwargs={"wandb": {"dir": folder, "name": output_dir.name}, "dvclive": {"dir": folder},
                     "mlflow": {"run_name": output_dir.name}},
    )


def hyperparameters(config: TrainConfig) -> dict[str, Any]:
    """Trackers take numbers, strings and booleans (TensorBoard's hparams nothing else)."""
    return {key: value for key, value in asdict(config).items() if isinstance(value, (int, float, str, bool))}

