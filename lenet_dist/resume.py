"""Which checkpoint `--resume` means, decided once for the whole job; and setting aside the later checkpoints
that a resume from an older one abandons."""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object

from lenet_dist.checkpoint import (
    CHECKPOINTS_DIR,
    PROGRESS_FILE,
    RUN_CONFIG_FILE,
    STEP_DIR,
    Choice,
    complete_checkpoints,
)
from lenet_dist.errors import UsageError
from lenet_dist.files import fsync_folder


def new_run_id() -> str:
    """A run's id: the start time first, so that a later run's id sorts after an earlier one's."""
    return f"{time.time_ns():016x}-{secrets.token_hex(4)}"


def run_id_in(path: Path) -> str:
    """The run id a run dir's config.json or a checkpoint's progress.json holds, or "" where there is none."""
    try:
        return str(json.loads(path.read_text()).get("run_id") or "")
    except (OSError, ValueError, AttributeError):
        return ""


def checkpoint_to_resume(resume: str | None, run_dir: Path) -> Choice | None:
    """The checkpoint --resume names (a folder, "latest", or "auto": the newest if any), the same on every rank.

    The newest that any rank's disk holds wins, read by the lowest such rank. latest and auto count only the
    newest run id's checkpoints, so an earlier job's left on another node's disk never win."""
    if resume is None:
        return None
    if resume in ("latest", "auto"):
        mine = [(str(path), run_id_in(path / PROGRESS_FILE)) for path in complete_checkpoints(run_dir)]
        own_run = run_id_in(run_dir / RUN_CONFIG_FILE)
    else:
        mine = [(resume, "")] if (Path(resume) / PROGRESS_FILE).is_file() else []
        own_run = ""
    seen = gather_object([(mine, own_run, socket.gethostname())])
    current = max(run for _, run, _ in seen)
    held = [(int(STEP_DIR.match(Path(path).name).group(1)) if STEP_DIR.match(Path(path).name) else 0, -rank, path)
            for rank, (paths, _, _) in enumerate(seen) for path, run in paths if not current or run == current]
    if held:
        _, negative_rank, path = max(held)
        return Choice(Path(path), -negative_rank)
    if resume == "auto":
        return None
    if resume == "latest":
        raise UsageError(f"--resume: no checkpoint in {run_dir / CHECKPOINTS_DIR} (looked on {_hosts(seen)}; a "
                         "job restarted on other nodes finds its checkpoints only in an --output-dir every node "
                         "sees); pass --resume PATH, --resume auto to start afresh, or drop --resume")
    if not Path(resume).exists() or len(seen) > 1:
        raise UsageError(f"--resume {resume}: no checkpoint there on {_hosts(seen)}; pass a checkpoint folder "
                         f"(…/{CHECKPOINTS_DIR}/step-N) that one of them holds")
    raise UsageError(f"--resume {resume}: not a checkpoint folder (no {PROGRESS_FILE})")


def _hosts(seen: list[tuple[Any, str, str]]) -> str:
    hosts = sorted({host for *_, host in seen})
    return f"node {hosts[0]}" if len(hosts) == 1 else "any node (" + ", ".join(hosts) + ")"


def set_aside_later_checkpoints(run_dir: Path, step: int) -> Path | None:
    """Move the checkpoints after `step` (the abandoned continuation) to checkpoints/abandoned-after-step-N/,
    where neither --resume auto nor pruning looks; return that folder, or None when there were none."""
    later = [path for path in complete_checkpoints(run_dir) if int(STEP_DIR.match(path.name).group(1)) > step]
    if not later:
        return None
    aside = run_dir / CHECKPOINTS_DIR / f"abandoned-after-step-{step:08d}"
    aside.mkdir(exist_ok=True)
    for path in later:
        shutil.rmtree(aside / path.name, ignore_errors=True)
        path.rename(aside / path.name)
    fsync_folder(run_dir / CHECKPOINTS_DIR, files=False)
    return aside
