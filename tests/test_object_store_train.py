"""Training outputs on a real S3 API (moto's standalone server on loopback, tests/s3_helpers.py):
`medfm pretrain` with an s3:// out_dir (checkpoints, config, loggers, plots, the export) and
its resume, the encoder export read back, the diffusion export, `medfm finetune` runs and
exports on s3://, and the bytes a 3D patch fetches from S3, counted at the s3fs layer (what
bench/storage.py measures). Nothing here mocks a filesystem call. Every test runs in a fresh working
folder and checks that no local folder named "s3:" appeared (what pathlib makes of a URL)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_helpers import DECODER, TINY, base_config, pneumonia_shards
from readers_helpers import write_ct_set
from s3_helpers import S3Reads, moto_s3
from safetensors.torch import load
from synth_helpers import write_pneumonia
from typer.testing import CliRunner

from medfm.cli import app
from medfm.config import ConfigError
from medfm.finetune import hub
from medfm.finetune.export import ADAPTER_FILES, ExportError, portable_uri
from medfm.io import TMP_MARKER, get_fs, get_tree, put_tree
from medfm.models import build_encoder
from medfm.models.diffusion.export import export_diffusion, load_diffusion
from medfm.models.diffusion.model import DiffusionConfig, DiffusionModel
from medfm.models.export import export_encoder, load_encoder
from medfm.pretrain.checkpoint import LAST
from medfm.pretrain.config import load_config
from medfm.pretrain.train import run as pretrain
from medfm.shards import PatchSampler, ShardSet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    with moto_s3() as server:
        yield server


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The test's working folder; a URL mistaken for a path would land here as "s3:"."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert not list(tmp_path.rglob("s3:")), "an s3:// URL was written as a local folder"


@pytest.fixture(scope="module")
def shards(tmp_path_factory, sample_data):
    return pneumonia_shards(sample_data, tmp_path_factory.mktemp("pm") / "pm", n=64)


def mae_config(shards: Path, out_dir: str, *overrides: str, **train):
    model = {"name": "vit2d", "img_size": 28, "patch_size": 4, **TINY}
    tree = base_config(Path("."), shards, model, [{"name": "mae", **DECODER}], **train)
    tree["out_dir"] = out_dir
    return load_config(None, list(overrides), base=tree)


def medfm(*args: str):
    return CliRunner().invoke(app, list(args))


def keys(url: str) -> list[str]:
    fs, root = get_fs(url)
    return sorted(p[len(root) + 1 :] for p in fs.find(root))


def export_tensors(url: str) -> dict[str, torch.Tensor]:
    fs, root = get_fs(url)
    return load(fs.cat_file(f"{root}/export/encoder.safetensors"))


@pytest.mark.slow
def test_pretrain_to_s3_writes_every_output_and_resumes_like_local(s3, shards, workdir):
    """A 4-step MAE fit with out_dir on S3 writes checkpoints, config.json, CSV and TensorBoard
    logs, plots, throughput.json and the export there (no temporary key left); `--resume` from
    the S3 checkpoint (a dead write's temporary beside it) continues to 6 steps, and every
    weight equals the same two runs on local disk."""
    train = {"max_steps": 4, "checkpoint_every": 2, "plots": True, "log_every": 1,
             "loggers": ["csv", "tensorboard"]}  # fmt: skip
    url, local = s3.url("runs/mae"), str(workdir / "local")
    for out in (url, local):
        pretrain(mae_config(shards, out, **train))
    written = keys(url)
    assert not [k for k in written if TMP_MARKER in k]
    for name in ("config.json", "throughput.json", "plots/loss.png",
                 "logs/version_0/metrics.csv", "export/encoder.json",
                 "export/encoder.safetensors", f"checkpoints/{LAST}",
                 "checkpoints/step0000004.ckpt"):  # fmt: skip
        assert name in written, name
    assert any(k.startswith("tensorboard/version_0/events.") for k in written)
    fs, root = get_fs(url)
    assert b"train/loss" in fs.cat_file(f"{root}/logs/version_0/metrics.csv")
    with fs.open(f"{root}/checkpoints/{LAST}", "rb") as f:
        assert torch.load(f, weights_only=True)["global_step"] == 4
    a, b = export_tensors(url), export_tensors(f"file://{local}")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the export loads from the bucket (sidecar URL), hash-checked, and runs
    encoder, sidecar = load_encoder(f"{url}/export/encoder.json")
    assert sidecar["architecture"]["name"] == "vit2d"
    assert encoder(torch.rand(2, 1, 28, 28)).shape[0] == 2

    fs.pipe(f"{root}/checkpoints/{LAST}{TMP_MARKER}0123456789ab", b"half a checkpoint")
    for out in (url, local):
        pretrain(mae_config(shards, out, "train.max_steps=6", **train), resume=True,
                 force_resume=True)  # fmt: skip
    assert not [k for k in keys(url) if TMP_MARKER in k]  # the dead write's temporary: removed
    with fs.open(f"{root}/checkpoints/{LAST}", "rb") as f:
        assert torch.load(f, weights_only=True)["global_step"] == 6
    a, b = export_tensors(url), export_tensors(f"file://{local}")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_ledger_run_on_s3_is_refused_before_training(s3, shards, workdir):
    cfg = mae_config(shards, s3.url("runs/ledger"), max_steps=1, ledger=True)
    with pytest.raises(ConfigError, match="train.ledger: .* use a local out_dir"):
        pretrain(cfg)
    assert not keys(s3.url("runs/ledger"))


def test_diffusion_export_to_s3_writes_the_bucket_not_a_local_folder(s3, workdir):
    """export_diffusion given an s3:// URL writes both files there (it once wrote a local
    folder named "s3:"); copied back, the export loads with its hash checked."""
    model = DiffusionModel(DiffusionConfig(channels=(8, 16, 16), attention_levels=(False,) * 3))
    url = s3.url("models/diffusion")
    weights = export_diffusion(model.eval(), url, preprocessing={}, classes=[])
    assert weights == f"{url}/model.safetensors"
    assert keys(url) == ["model.json", "model.safetensors"]
    get_tree(url, workdir / "copy")
    loaded = load_diffusion(workdir / "copy")
    state = model.unet.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.unet.state_dict().items())


@pytest.mark.slow
def test_finetune_run_and_export_on_s3_evaluate_from_the_bucket(s3, sample_data, workdir):
    """Shards and a base encoder on S3; `medfm finetune` (LoRA) writes its run folder to S3
    (run.json last), `medfm finetune export` of that run writes the export to S3 (medfm.json
    last), `medfm finetune evaluate` scores the export from the bucket with the metrics the run
    recorded, and `medfm hub push` sends the bucket's export to a hub, pulled back intact."""
    shards, encoder = s3.url("ft/shards"), s3.url("ft/encoder")
    write_pneumonia(shards, {"train": 32, "val": 16, "test": 16})
    spec = {"name": "vit2d", "size": "tiny", "embed_dim": 32, "depth": 2, "num_heads": 2,
            "img_size": 28, "patch_size": 7}  # fmt: skip
    torch.manual_seed(0)
    export_encoder(build_encoder(spec), encoder, preprocessing={"kind": "image2d"}, data={},
                   training={"steps": 0})  # fmt: skip
    run_url, export_url = s3.url("ft/run"), s3.url("ft/export")
    cfg = {"name": "ft", "out_dir": run_url, "encoder": encoder, "mode": "lora",
           "data": {"shards": shards, "batch_size": 16},
           "task": {"type": "binary", "label_key": "class", "label_names": ["normal", "pneumonia"]},
           "train": {"epochs": 1, "lr": 1e-3}, "eval": {"bootstrap": 20}}  # fmt: skip
    (workdir / "ft.yaml").write_text(json.dumps(cfg))
    r = medfm("finetune", "--config", "ft.yaml")
    assert r.exit_code == 0, r.output[-3000:]
    run_files = keys(run_url)
    assert {"run.json", "metrics.json", "checkpoint/head.safetensors",
            "checkpoint/adapter/adapter_model.safetensors"} <= set(run_files)  # fmt: skip
    r = medfm("finetune", "export", run_url, "--out", export_url)
    assert r.exit_code == 0, r.output[-3000:]
    exported = keys(export_url)
    assert {"medfm.json", "README.md", "head.safetensors", *ADAPTER_FILES} <= set(exported)
    assert not [k for k in run_files + exported if TMP_MARKER in k]
    fs, root = get_fs(export_url)
    meta = json.loads(fs.cat_file(f"{root}/medfm.json"))
    assert meta["base_encoder"]["uri"] == encoder and meta["data"]["shards"]["uri"] == shards
    r = medfm("finetune", "evaluate", export_url, "--config", "ft.yaml")
    assert r.exit_code == 0, r.output[-3000:]
    scored = json.loads(r.output.strip().splitlines()[-1])
    assert scored["n"] == 16
    assert scored["auroc"]["value"] == pytest.approx(meta["metrics"]["values"]["auroc"]["value"])
    # a local base encoder cannot be named by an export in a bucket: refused
    with pytest.raises(ExportError, match="a local path, which an export on an object store"):
        portable_uri(str(workdir / "encoder"), export_url)
    # the export in the bucket goes to a hub (a local one here) and comes back intact
    r = medfm("hub", "push", export_url, "ft-lora", "--hub", str(workdir / "hub"))
    assert r.exit_code == 0, r.output[-3000:]
    pulled = hub.pull("ft-lora", workdir / "pulled", hub=str(workdir / "hub")).path
    for name in exported:
        assert (pulled / name).read_bytes() == fs.cat_file(f"{root}/{name}"), name


# ---------------------------------------------------------------- 3D patches: bytes from S3


def chunk_bytes(shard_file: Path, grid: tuple[int, ...], starts, sizes, chunk: int) -> int:
    """Stored bytes of the chunks a patch intersects, from the shard file's own index (the
    16-byte (offset, nbytes) entries before its crc32c; an empty chunk's entry is all ones)."""
    n = int(np.prod(grid))
    index = np.frombuffer(shard_file.read_bytes()[-(16 * n + 4) : -4], "<u8").reshape(*grid, 2)
    hit = [range(s // chunk, (s + p - 1) // chunk + 1) for s, p in zip(starts, sizes, strict=True)]
    stored = [index[i, j, k][1] for i in hit[0] for j in hit[1] for k in hit[2]]
    return int(sum(int(b) for b in stored if b != 2**64 - 1))


@pytest.mark.slow
def test_patch_bytes_fetched_from_s3_stay_within_its_chunks(s3, sample_data, workdir):
    """Counted where the bytes arrive, at the s3fs layer (every call that returns object
    bytes, read-ahead included): after a first patch opens the volume (metadata, the chunk
    index), a patch fetches at most 1.2x the stored bytes of the image and label chunks it
    intersects (exactly them: ranged reads, no read-ahead)."""
    url, local = s3.url("ct-bytes"), workdir / "ct"
    write_ct_set(local, sample_data, copies=1, chunks=(16, 16, 16))
    put_tree(local, url, last=("manifest.parquet", "manifest.json"))
    sampler = PatchSampler(url, (24, 24, 12), mode="uniform")
    row = next(iter(ShardSet(url).rows()))
    grid = tuple(-(-s // 16) for s in row["shape"])  # one shard file holds the whole array
    shards = {name: local / row["shard"] / name / "c/0/0/0" for name in ("image", "label")}
    for name, path in shards.items():
        assert [p for p in path.parents[2].rglob("*") if p.is_file()] == [path], name
    reads, rng = S3Reads(), np.random.default_rng(0)
    fetched = touched = 0
    with reads.counting():
        sampler.patch(row, 0, rng)
        for _ in range(8):
            before = reads.bytes
            p = sampler.patch(row, 0, rng)
            fetched += reads.bytes - before
            for name in ("image", "label"):
                touched += chunk_bytes(shards[name], grid, p["start"], p["size"], 16)
    assert touched > 0 and fetched <= 1.2 * touched, (fetched, touched)
