"""What a run logs to its trackers (--log-with): TensorBoard's scalars and wandb's offline records, read back as
those tools would, and a tracker that is not installed named in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import FIGURES, assert_png, read_metrics

LOGGED_STEPS = sorted(set(range(10, 129, 10)) | {64, 128})  # every --log-every steps and each epoch's end


@pytest.mark.slow
def test_tensorboard_scalars_read_back(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, _ = logged_run
    events = EventAccumulator(str(output / "trackers" / "lenet-dist"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "test/accuracy", "train/images_per_second"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == LOGGED_STEPS
    accuracy = [event.value for event in events.Scalars("test/accuracy")]
    assert accuracy == pytest.approx([e["test_accuracy"] for e in read_metrics(output)["evaluations"]])
    for figure in FIGURES:
        assert_png(output / figure)


def wandb_records(path: Path):
    """The records of an offline wandb run file: LevelDB's log format (32 KiB blocks of checksum, length,
    kind, payload) after a 7-byte W&B header, each record a protobuf wandb writes."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, block, pieces = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        pieces += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


@pytest.mark.slow
def test_wandb_offline_run_reads_back(logged_run):
    output, _ = logged_run
    (run_file,) = (output / "trackers" / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    def name(item) -> str:  # "train/loss" is stored as the nested key ["train", "loss"]
        return item.key or "/".join(item.nested_key)

    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({name(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            config.update({name(item): json.loads(item.value_json) for item in record.config.update})
    assert [row["_step"] for row in history if "train/loss" in row] == LOGGED_STEPS
    accuracy = [row["test/accuracy"] for row in history if "test/accuracy" in row]
    assert accuracy == pytest.approx([e["test_accuracy"] for e in read_metrics(output)["evaluations"]])
    assert config["lr"] == 0.006 and config["batch_size"] == 256  # what the run was given


def test_a_tracker_that_is_not_installed_names_its_package(monkeypatch):
    from lenet_dist.errors import UserError
    from lenet_dist.trackers import require_installed

    monkeypatch.setenv("WANDB_MODE", "offline")  # installed, and able to log (offline)
    require_installed(["tensorboard", "wandb", "all"])
    with pytest.raises(UserError, match="--log-with comet_ml: the tracker is not installed; pip install comet-ml"):
        require_installed(["tensorboard", "comet_ml"])
