"""The accelerate launch configs shipped inside the package, so an installed lenet-dist can name them.

    accelerate launch --config_file "$(lenet-dist launch-config cpu-ddp)" -m lenet_dist.train
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from lenet_dist.config import LaunchConfigConfig
from lenet_dist.errors import UsageError

CONFIG_NAMES = ("cpu-ddp", "single-gpu", "multi-gpu", "multi-node")


def config_path(name: str) -> Path:
    """The installed file of a packaged launch config: `cpu-ddp` → …/lenet_dist/launch_configs/cpu_ddp.yaml."""
    if name not in CONFIG_NAMES:
        raise UsageError(f"no launch config named {name!r}; choose from {', '.join(CONFIG_NAMES)}")
    return Path(str(resources.files("lenet_dist") / "launch_configs" / f"{name.replace('-', '_')}.yaml"))


def print_config_path(config: LaunchConfigConfig) -> None:
    print(config_path(config.name))
