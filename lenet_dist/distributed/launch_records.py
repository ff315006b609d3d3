"""The ranks' half of `lenet-dist launch`'s stop protocol: each rank records in the folder the launcher names
($LENET_LAUNCH_RECORDS) how it ended, so that the launcher's one line says it (distributed/launcher.py reads
them). Outside `lenet-dist launch` nothing is written."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lenet_dist.errors import UserError

LAUNCH_RECORDS_ENV = "LENET_LAUNCH_RECORDS"


@contextmanager
def launch_record() -> Iterator[None]:
    """Under `lenet-dist launch`, record this rank as "running", or "explained" when it ends with its own
    one-line error (the launcher then adds nothing). A rank that finishes, crashes or is killed stays "running"."""
    folder = os.environ.get(LAUNCH_RECORDS_ENV)
    if folder:
        _write_record(Path(folder), {"pid": os.getpid(), "outcome": "running"})
    try:
        yield
    except UserError as error:
        if folder:
            _write_record(Path(folder), {"pid": os.getpid(), "outcome": "explained", "status": error.exit_status})
        raise


def record_stop(signal_number: int, step: int, checkpoint: Path) -> None:
    folder = os.environ.get(LAUNCH_RECORDS_ENV)
    if folder:
        _write_record(Path(folder), {"pid": os.getpid(), "outcome": "stopped", "signal": signal_number, "step": step,
                                     "checkpoint": str(checkpoint)})


def _write_record(folder: Path, record: dict) -> None:
    path = folder / f"rank{os.environ.get('RANK', '0')}.json"
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    partial.replace(path)
