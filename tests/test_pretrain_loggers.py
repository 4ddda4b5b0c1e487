"""The loggers users already use, each with the real package: TensorBoard (the default), MLflow
into a local SQLite store inside the run (MLflow 3 refuses new ./mlruns file stores), Weights &
Biases in offline mode. A tiny real fit logs to each;
the logged loss is read back from what the package itself wrote."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from pretrain_helpers import DECODER, TINY, base_config, losses, pneumonia_shards

from medfm.pretrain.config import TrainConfig, load_config
from medfm.pretrain.train import run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
VIT = {"name": "vit2d", "img_size": 28, "patch_size": 4, **TINY}
STEPS, EVERY = 8, 4
BLOCK, FULL, LAST = 32768, 1, 4  # LevelDB log framing of .wandb files


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    data = os.environ.get("MEDFM_SAMPLE_DATA")
    if not data:
        pytest.skip("MEDFM_SAMPLE_DATA is not set")
    return pneumonia_shards(Path(data), tmp_path_factory.mktemp("pm") / "shards", n=64)


def fit(tmp_path: Path, shards: Path, *loggers: str) -> Path:
    tree = base_config(tmp_path, shards, VIT, [{"name": "mae", **DECODER}], max_steps=STEPS,
                       log_every=EVERY, loggers=["csv", *loggers])  # fmt: skip
    run(load_config(None, base=tree))
    return Path(tree["out_dir"])


def test_tensorboard_is_a_default_logger():
    assert "tensorboard" in TrainConfig().loggers


def test_tensorboard_event_file_holds_the_loss(tmp_path, shards):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = fit(tmp_path, shards, "tensorboard")
    events = EventAccumulator(str(out / "tensorboard" / "version_0"))
    events.Reload()
    logged = [e.value for e in events.Scalars("train/loss")]
    assert logged == pytest.approx(losses(out), rel=1e-6)
    assert "perf/data_wait_fraction" in events.Tags()["scalars"]


def test_mlflow_local_store_in_the_run_holds_the_loss(tmp_path, shards, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the run's own store
    out = fit(tmp_path, shards, "mlflow")
    store = out / "mlflow.db"
    assert store.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}")
    experiment = client.get_experiment_by_name("test")
    (found,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in history] == [EVERY - 1, 2 * EVERY - 1]
    assert [m.value for m in history] == pytest.approx(losses(out), rel=1e-6)


def wandb_history(path: Path) -> list[dict[str, str]]:
    """The history rows of a `.wandb` run file: wandb's own protobuf records, framed as a
    LevelDB log (a 7-byte ':W&B' header, then 32 KiB blocks of crc, length, type, data)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, part, rows = path.read_bytes(), 7, b"", []
    assert raw[:4] == b":W&B", path
    while pos + 7 <= len(raw):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the zero padding at a block's end
            pos += left
            continue
        part, pos = part + raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json
                             for i in record.history.item})  # fmt: skip
    return rows


def test_wandb_offline_run_folder_holds_the_loss(tmp_path, shards, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is medfm's default
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = fit(tmp_path, shards, "wandb")
    (run_dir,) = (out / "wandb").glob("offline-run-*")  # offline: nothing left the machine
    (records,) = run_dir.glob("run-*.wandb")
    rows = wandb_history(records)
    logged = [float(r["train/loss"]) for r in rows if "train/loss" in r]
    assert logged == pytest.approx(losses(out), rel=1e-6)
    assert any("perf/data_wait_fraction" in r for r in rows)
