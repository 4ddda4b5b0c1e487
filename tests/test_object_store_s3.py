"""Every stage against a real S3 API: moto's standalone server on loopback (tests/s3_helpers.py),
reached over HTTP by s3fs in this process and in Ray workers. Nothing here mocks a filesystem
call. Also: a URL whose filesystem is not installed names the extra."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import yaml
from click.testing import Result
from fsspec.registry import known_implementations
from hub_helpers import make_folder, tree_bytes
from ingest_helpers import KEY, NIBABEL_FILES, PYDICOM_FILES
from readers_helpers import write_ct_set
from s3_helpers import S3Reads, moto_s3
from synth_helpers import write_pneumonia
from typer.testing import CliRunner

from medfm.cli import app
from medfm.finetune import hub
from medfm.finetune.hub import FsspecHub, open_hub
from medfm.ingest.job import run_ingest
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.io import TMP_MARKER, MissingExtraError, get_fs
from medfm.models.diffusion.contract import build_contract
from medfm.models.diffusion.export import export_diffusion
from medfm.models.diffusion.model import DiffusionConfig, DiffusionModel
from medfm.models.diffusion.sampling import SamplerSettings
from medfm.shards import CountingStore, Manifest, PatchSampler, ShardDataset, ShardSet, verify
from medfm.synth.audit import audit, load_audit_config
from medfm.synth.generate import GenerateOptions, generate

# ---------------------------------------------------------------- the `cloud` extra


def medfm(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_url_without_its_filesystem_names_the_extra_and_exits_2(tmp_path, monkeypatch, medfm_exe):
    hint = "gs:// URLs need gcsfs: pip install 'medfm[cloud]'"
    with pytest.raises(MissingExtraError, match=re.escape(hint)):
        get_fs("gs://bucket/set")
    for command in ("verify", "stats", "ls"):
        r = medfm("shards", command, "gs://bucket/set")
        assert r.exit_code == 2 and r.output.strip() == f"medfm shards: {hint}", r.output
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"sources: [{{name: a, root: {tmp_path}, format: png}}]\n")
    monkeypatch.setenv("MEDFM_DEID_KEY", KEY.decode())
    r = medfm("ingest", str(spec), "--out", "gs://bucket/set")
    assert r.exit_code == 2 and r.output.strip() == f"medfm ingest: {hint}", r.output
    # Any other stage: the console script's own handler (one process, so main() runs).
    r = subprocess.run([medfm_exe, "hub", "ls", "--hub", "gs://bucket/hub"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip() == f"medfm: {hint}", r.stderr


def _a_protocol_not_installed() -> str:
    for protocol in sorted(known_implementations):
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError:
            return protocol
    pytest.skip("every fsspec filesystem is installed")


def test_other_protocols_name_what_fsspec_asks_for():
    protocol = _a_protocol_not_installed()  # fsspec's registry raises the real ImportError
    with pytest.raises(MissingExtraError) as e:
        get_fs(f"{protocol}://bucket/set")
    assert str(e.value).startswith(f"{protocol}:// URLs need a package medfm does not install (")
    assert "bucket" not in str(e.value)


# ---------------------------------------------------------------- ingest to s3:// and back


@pytest.fixture(scope="module")
def s3():
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    with moto_s3() as server:
        yield server


@pytest.fixture(scope="module")
def ray_s3(s3):
    """A local Ray whose workers reach the S3 server: started after `s3` set the environment,
    which the workers inherit (and get again through the runtime env, explicitly)."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": s3.env},
    )
    yield ray
    ray.shutdown()


def every_kind_spec(sample_data: Path) -> dict:
    """2D DICOM, a 3D NIfTI, WFDB signals and MIMIC-IV demo tables (three of them, for time),
    one task per item, so that resume has parts to skip."""
    return {
        "sources": [
            {"name": "ct", "root": str(PYDICOM_FILES), "include": ["CT_small.dcm"],
             "format": "dicom"},
            {"name": "nib", "root": str(NIBABEL_FILES), "format": "nifti", "modality": "MR",
             "include": ["anatomical.nii"]},
            {"name": "ecg", "root": str(sample_data / "wfdb"), "format": "wfdb",
             "include": ["s0010_re.hea"]},
            {"name": "mimic", "root": str(sample_data / "mimic-iv-demo-2.2"), "format": "mimic_iv",
             "include": [f"hosp/{t}.csv.gz" for t in ("patients", "admissions", "diagnoses_icd")],
             "options": {"buckets": 1}},
        ],
        "volume": {"spacing": [2.0, 2.0, 2.0]},
        "shards": {"task_items": 1},
    }  # fmt: skip


def sorted_rows(root: str) -> list[dict]:
    """Every manifest row, whole: names and hashes derive from the inputs, so two runs of the
    same job agree on all of them, shard names and offsets included."""
    return sorted(Manifest.open(root).rows(decode_json=True), key=lambda r: r["key"])


@pytest.fixture(scope="module")
def ingested(s3, ray_s3, sample_data, tmp_path_factory):
    """The same spec ingested by `medfm ingest` to s3:// (on the module's Ray) and to disk."""
    work = tmp_path_factory.mktemp("s3ingest")
    spec = every_kind_spec(sample_data)
    (work / "spec.yaml").write_text(yaml.safe_dump(spec))
    url, local = s3.url("every-kind"), str(work / "local")
    os.environ["MEDFM_DEID_KEY"] = KEY.decode()
    try:
        r = medfm("ingest", str(work / "spec.yaml"), "--out", url, "--quiet")
    finally:
        del os.environ["MEDFM_DEID_KEY"]
    assert r.exit_code == 0, r.output[-3000:]
    run_ingest(parse_spec(spec), local, keyring=Keyring(KEY), progress=False)
    return url, local, spec


@pytest.mark.slow
def test_ingest_to_s3_equals_ingest_to_disk_and_the_cli_reads_it(ingested, medfm_exe):
    url, local, _ = ingested
    fs, path = get_fs(url)
    assert fs.protocol[0] == "s3" and fs.exists(f"{path}/manifest.json")
    assert not [p for p in fs.find(path) if TMP_MARKER in p]  # every temporary was committed
    rows = sorted_rows(url)
    assert {r["kind"] for r in rows} == {"image2d", "volume3d", "signal", "ehr"}
    assert rows == sorted_rows(local)  # same samples, hashes, splits as on local disk

    def cli(*args: str) -> str:
        r = medfm("shards", *args)
        assert r.exit_code == 0, r.output
        return r.output

    report = json.loads(cli("verify", url, "--json"))
    assert report["ok"] and report["rows_checked"] == len(rows) and report["files_checked"] > 0
    stats = json.loads(cli("stats", url, "--json"))
    assert stats["samples"] == len(rows) and stats["by_kind"]["volume3d"] == 1
    listed = [json.loads(line) for line in cli("ls", url, "--json").splitlines()]
    assert sorted(r["key"] for r in listed) == [r["key"] for r in rows]
    assert "ehr/mimic/vocab.json" in Manifest.open(url).header["files"]  # hashed, verified


@pytest.mark.slow
def test_2d_loader_reads_the_s3_set_like_the_local_one(ingested):
    url, local, _ = ingested

    def images(root: str) -> dict[str, torch.Tensor]:
        ds = ShardDataset(root, kinds="image2d", shuffle=False)
        return {item["key"]: item["data"] for item in ds}

    remote, here = images(url), images(local)
    assert remote.keys() == here.keys() and len(remote) == 1
    for key, data in remote.items():
        assert torch.equal(data, here[key])


def test_a_shuffled_2d_epoch_from_s3_fetches_each_byte_about_once(s3, sample_data, tmp_path):
    """PneumoniaMNIST images in a tar, copied to S3 as it is: one shuffled epoch (a shuffle
    buffer sends samples back and forth within a shard) yields what the local copy yields in
    the same order, fetching at most 1.2x the tars' bytes (a readahead file re-read the rest of
    a shard at every backward seek: 4.4x)."""
    local = tmp_path / "pm"
    write_pneumonia(local, {"train": 600})
    url = s3.url("pm-epoch")
    fs, path = get_fs(url)
    fs.put(str(local), path, recursive=True)
    tar_bytes = sum(p.stat().st_size for p in (local / "tars").glob("*.tar"))

    def epoch(root: str) -> list[tuple[str, torch.Tensor]]:
        ds = ShardDataset(root, seed=3, buffer_size=200)
        return [(item["key"], item["data"]) for item in ds]

    with S3Reads().counting() as reads:
        remote = epoch(url)
    here = epoch(str(local))
    assert [k for k, _ in remote] == [k for k, _ in here] and len(remote) == 600
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(remote, here, strict=True))
    assert [k for k, _ in here] != sorted(k for k, _ in here)  # the order was shuffled
    assert reads.bytes <= 1.2 * tar_bytes, (reads.bytes, tar_bytes)


@pytest.mark.slow
def test_resume_on_s3_reruns_only_the_unfinished_task(ingested, ray_s3):
    """A job stopped before its end (one task's part and the manifest, the commit point, not
    yet written; a dead attempt's temporary left among the tars) resumes on S3: the finished
    tasks are reused, the temporary is removed, and the manifest equals the first run's."""
    url, _, spec = ingested
    before = sorted_rows(url)
    fs, path = get_fs(url)
    parts = sorted(fs.find(f"{path}/_ingest/parts"))
    assert len(parts) == 4
    fs.rm([parts[0], f"{path}/manifest.json", f"{path}/manifest.parquet"])
    fs.pipe(f"{path}/tars/t0-000000.tar{TMP_MARKER}deadbeef0000", b"half a tar")
    job = parse_spec(spec)
    summary = run_ingest(job, url, keyring=Keyring(KEY), progress=False, resume=True)
    assert (summary.tasks_run, summary.tasks_reused) == (1, 3)
    assert sorted_rows(url) == before
    assert not [p for p in fs.find(path) if TMP_MARKER in p]
    assert verify(url).ok


# ---------------------------------------------------------------- 3D patches: ranged reads


def counted_patches(root: str, draws: int) -> tuple[list[dict], list[list[tuple]], int]:
    """`draws` uniform patches of the CT and, per patch, the (key, range, bytes) its store
    returned, after a first patch that opens the group (metadata is read once)."""
    stores: list[CountingStore] = []

    def counting(store):
        stores.append(CountingStore(store))
        return stores[-1]

    sampler = PatchSampler(root, (24, 24, 12), mode="uniform", store_wrapper=counting)
    row = next(r for r in ShardSet(root).rows() if r["key"] == "ct0")
    rng = np.random.default_rng(0)
    sampler.patch(row, 0, rng)
    patches, reads = [], []
    for _ in range(draws):
        stores[0].reset()
        patches.append(sampler.patch(row, 0, rng))
        reads.append(sorted((k, repr(r), n) for k, r, n in stores[0].requests))  # async: any order
    fs, path = get_fs(root)
    return patches, reads, fs.size(f"{path}/{row['shard']}/image/c/0/0/0")


@pytest.mark.slow
def test_patches_from_s3_fetch_only_their_chunks(s3, sample_data, tmp_path):
    """The CT written to S3 and to disk (chunks of 16): each patch from S3 asks the server for
    the same byte ranges as from disk, where test_readers_patches bounds them by the chunks the
    patch intersects (<= 1.2x), and for far less than the shard object."""
    url, local = s3.url("ct-patches"), str(tmp_path / "ct")
    for root in (url, local):
        write_ct_set(root, sample_data, copies=1, chunks=(16, 16, 16))
    remote, remote_reads, shard_bytes = counted_patches(url, 4)
    here, local_reads, _ = counted_patches(local, 4)
    assert remote_reads == local_reads
    for p, q, reads in zip(remote, here, remote_reads, strict=True):
        assert np.array_equal(p["image"], q["image"]) and np.array_equal(p["label"], q["label"])
        assert all(k.startswith(("image/c/", "label/c/")) for k, _, _ in reads)
        image_bytes = sum(n for k, _, n in reads if k.startswith("image/"))
        assert 0 < image_bytes < 0.5 * shard_bytes


# ---------------------------------------------------------------- the hub on s3://


def test_hub_on_s3_pushes_pulls_and_refuses_a_tampered_blob(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HUB_CACHE", str(tmp_path / "pull-cache"))
    backend = open_hub(s3.url("hub"))
    assert isinstance(backend, FsspecHub)  # picked by the s3:// scheme
    v1 = make_folder(tmp_path / "v1", 1.0)
    rev = backend.push(v1, "lab/enc", "v1")
    assert backend.resolve("lab/enc", "v1") == rev
    backend.pull("lab/enc", "v1", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(v1)
    assert hub.verify_folder(tmp_path / "out")["revision"] == rev
    rev2 = backend.push(make_folder(tmp_path / "v2", 2.0), "lab/enc", "v1")  # moves the ref
    assert rev2 != rev and backend.resolve("lab/enc", "v1") == rev2
    assert backend.resolve("lab/enc", rev) == rev  # the old revision stays whole
    digest = hashlib.sha256((v1 / "model.safetensors").read_bytes()).hexdigest()
    blob = bytearray(backend.fs.cat_file(backend.blob_path(digest)))
    blob[len(blob) // 2] ^= 0x01
    backend.fs.pipe_file(backend.blob_path(digest), bytes(blob))
    with pytest.raises(hub.IntegrityError, match="model.safetensors"):
        backend.pull("lab/enc", rev, tmp_path / "tampered")


# ---------------------------------------------------------------- synth: export, generate, audit


@pytest.mark.slow
def test_synth_generate_and_audit_write_to_s3(s3, sample_data, one_torch_thread):
    """Real PneumoniaMNIST images written to s3://; an (untrained) diffusion model whose contract
    is built from that set, exported to s3:// too, samples into s3:// (a verified shard set),
    and the audit against the s3:// set writes its report there; no temporary left."""
    real = s3.url("pneumonia")
    write_pneumonia(real, {"train": 12, "val": 10})  # the audit calibrates on >= 10
    m = Manifest.open(real)
    rows = [r for r in m.rows() if r["split"] == "train"]
    cfg = DiffusionConfig(channels=(8, 16, 16), attention_levels=(False,) * 3)
    model = s3.url("model")
    export_diffusion(
        DiffusionModel(cfg).eval(),
        model,
        preprocessing=build_contract(real, rows, m.header, (28, 28), None),
        classes=[],
        data_manifests=[{"root": real, "sha256": m.header["manifest"]["sha256"]}],
    )
    out, audited = s3.url("synthetic"), s3.url("audit")
    opts = GenerateOptions(n=4, sampler=SamplerSettings("ddim", 2))
    header = generate(model, out, opts)
    assert header["num_samples"] == 4 and len(Manifest.open(out)) == 4 and verify(out).ok
    report = audit(out, real, audited, load_audit_config(overrides={"msssim_pairs": 4}))
    fs, path = get_fs(audited)
    assert json.loads(fs.cat_file(f"{path}/report.json"))["synthetic"] == report["synthetic"] == out
    assert fs.size(f"{path}/report.png") > 500
    written = fs.find(path) + fs.find(get_fs(out)[1])
    assert not [p for p in written if TMP_MARKER in p]
