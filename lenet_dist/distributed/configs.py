"""The launch files that ship in the package (accelerate configs, SLURM batch scripts), and a user's
--config_file read the way accelerate will read it, so that a mistake in it is one line, not a traceback."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from lenet_dist.config import LaunchConfigFlags
from lenet_dist.errors import UsageError

CONFIG_NAMES = ("cpu-ddp", "single-gpu", "multi-gpu", "multi-node", "slurm-single-node", "slurm-multi-node")
NUMBERS = ("num_processes", "num_machines", "machine_rank", "main_process_port")  # accelerate compares them as ints


def config_path(name: str) -> Path:
    """The installed file of a packaged launch config: `cpu-ddp` → …/lenet_dist/launch_configs/cpu_ddp.yaml, and
    the SLURM batch scripts: `slurm-multi-node` → …/slurm_multi_node.sbatch."""
    spelled = name.removesuffix(".yaml").removesuffix(".sbatch").replace("_", "-")  # the file's name works too
    if spelled not in CONFIG_NAMES:
        raise UsageError(f"no launch config named {name!r}; choose from {', '.join(CONFIG_NAMES)}")
    suffix = ".sbatch" if spelled.startswith("slurm-") else ".yaml"
    return Path(str(resources.files("lenet_dist") / "launch_configs" / f"{spelled.replace('-', '_')}{suffix}"))


def print_config_path(config: LaunchConfigFlags) -> None:
    """The packaged file's path, or with --copy DIR the path of a copy to edit (a batch script's `#SBATCH` lines)."""
    packaged = config_path(config.name)
    if not config.copy:
        print(packaged)
        return
    folder = Path(config.copy)
    if not folder.is_dir():
        raise UsageError(f"--copy {folder}: no such folder; create it or name an existing one")
    copy = folder / packaged.name
    try:
        with copy.open("x") as written:  # never over a copy the user has edited
            written.write(packaged.read_text())
    except FileExistsError:
        raise UsageError(f"--copy {folder}: {copy} is already there (your edited copy?); move it away or pass "
                         "another folder") from None
    print(copy)


def check_config_file(path: str) -> None:
    """Read --config_file with accelerate's own reader and types; its first mistake as one UsageError."""
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    given = Path(path)
    if not given.is_file():
        spelled = given.name.removesuffix(".yaml").replace("_", "-")
        hint = (f"the packaged {spelled} config is {config_path(spelled)}" if spelled in CONFIG_NAMES else
                f"`lenet-dist launch-config NAME` prints a packaged config's path ({', '.join(CONFIG_NAMES)})")
        raise UsageError(f"--config_file {path}: no such file; {hint}")
    at_fault = f"--config_file {path}"
    if given.read_bytes().startswith(b"#!"):
        raise UsageError(f"{at_fault}: a script, not an accelerate config (a SLURM batch script goes to sbatch: "
                         f"sbatch {path})")
    try:
        read = yaml.safe_load(given.read_text())
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        spot = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UsageError(f"{at_fault}: not valid YAML{spot} ({getattr(error, 'problem', None) or error})") from None
    if not isinstance(read, dict):
        raise UsageError(f"{at_fault}: not an accelerate config (expected `key: value` lines)")
    known = {name for name in ClusterConfig.__dataclass_fields__}
    for key in read:
        if key not in known:
            meant = difflib.get_close_matches(str(key), known, n=1)
            raise UsageError(f"{at_fault}: unknown key {key!r}" + (f"; did you mean {meant[0]!r}?" if meant else ""))
    for key in NUMBERS:
        if read.get(key) is not None and (not isinstance(read[key], int) or isinstance(read[key], bool)):
            raise UsageError(f"{at_fault}: {key} must be a whole number, got {read[key]!r}")
    kinds = [kind.value for kind in DistributedType]
    if "distributed_type" in read and read["distributed_type"] not in kinds:
        meant = difflib.get_close_matches(str(read["distributed_type"]), kinds, n=1)
        raise UsageError(f"{at_fault}: distributed_type {read['distributed_type']!r} is not one of accelerate's"
                         + (f"; did you mean {meant[0]}?" if meant else f" ({', '.join(kinds)})"))
    try:
        load_config_from_file(path)
    except (ValueError, TypeError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"{at_fault}: {reason}") from None
