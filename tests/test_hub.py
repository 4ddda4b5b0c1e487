"""The checkpoint hub: round trips, pinning, tamper and pickle refusal, resume, offline HF cache."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from hub_helpers import COMMIT, WritesMarker, hf_cache, inject, make_folder, tree_bytes
from typer.testing import CliRunner

from medfm.cli import app
from medfm.finetune import hub
from medfm.finetune.hub.transfer import staging_dir


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HUB_CACHE", str(tmp_path / "pull-cache"))
    return str(tmp_path / "hub")


def test_push_pull_round_trip_is_byte_identical(tmp_path, store):
    src = make_folder(tmp_path / "src")
    rev_id = hub.push(src, "lab/encoder@v1", hub=store)
    assert len(rev_id) == 64
    assert hub.push(src, "lab/encoder@v1", hub=store) == rev_id  # content-addressed
    report = hub.pull("lab/encoder@v1", tmp_path / "out", hub=store)
    assert tree_bytes(tmp_path / "out") == tree_bytes(src)
    assert report.revision == rev_id and report.downloaded_bytes > 0
    assert hub.ls(store, include_hf_cache=False) == {"lab/encoder": {"v1": rev_id}}
    index = json.loads((Path(store) / "index.json").read_text())
    assert index == {"lab/encoder": {"v1": rev_id}}
    again = hub.pull("lab/encoder@v1", tmp_path / "out", hub=store)
    assert again.downloaded_bytes == 0 and len(again.reused_files) == 3


def test_revision_ids_pin_content_after_the_name_moves(tmp_path, store):
    first = hub.push(make_folder(tmp_path / "a", 1.0), "enc", hub=store)
    second = hub.push(make_folder(tmp_path / "b", 2.0), "enc", hub=store)
    assert first != second
    hub.pull(f"enc@{first[:12]}", tmp_path / "pinned", hub=store)
    assert tree_bytes(tmp_path / "pinned") == tree_bytes(tmp_path / "a")
    hub.pull("enc", tmp_path / "latest", hub=store)
    assert tree_bytes(tmp_path / "latest") == tree_bytes(tmp_path / "b")


def test_missing_revision_and_repo(tmp_path, store):
    hub.push(make_folder(tmp_path / "a"), "enc@v1", hub=store)
    with pytest.raises(hub.RevisionNotFoundError, match=r"enc@v2.*named revisions: v1"):
        hub.pull("enc@v2", tmp_path / "x", hub=store)
    with pytest.raises(hub.RevisionNotFoundError, match="enc@" + "0" * 12):
        hub.pull("enc@" + "0" * 12, tmp_path / "x", hub=store)
    with pytest.raises(hub.RevisionNotFoundError, match="nobody/nothing"):
        hub.pull("nobody/nothing", tmp_path / "x", hub=store)


def test_flipped_byte_is_detected_and_the_file_not_used(tmp_path, store):
    src = make_folder(tmp_path / "src")
    hub.push(src, "enc", hub=store)
    digest = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    blob = Path(store) / "blobs" / "sha256" / digest
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(hub.IntegrityError, match="model.safetensors.*sha256 mismatch"):
        hub.pull("enc", tmp_path / "out", hub=store)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert not list((tmp_path / "out").glob("*.part"))
    assert not (tmp_path / "out" / ".medfm-hub.json").exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.ckpt", "weights.pt", "w.pth"])
def test_pickle_files_are_refused_and_never_unpickled(tmp_path, store, name):
    marker = tmp_path / "marker.txt"
    payload = pickle.dumps(WritesMarker(marker))
    inject(store, "evil", {name: payload, "config.json": b"{}"}, tmp_path)
    with pytest.raises(hub.UnsafeFileError, match=f"pickle.*{name}.*never unpickles"):
        hub.pull("evil", tmp_path / "out", hub=store)
    assert not marker.exists()
    assert not (tmp_path / "out" / name).exists()
    with pytest.raises(hub.UnsafeFileError):  # and push refuses to let one in
        hub.push(tmp_path / "inject", "evil2", hub=store)
    assert not marker.exists()


def test_pickle_behind_a_safe_name_is_refused_by_content(tmp_path, store):
    marker = tmp_path / "marker.txt"
    torch.save({"x": WritesMarker(marker)}, tmp_path / "torch.zip")
    payloads = {
        "model.safetensors": pickle.dumps(WritesMarker(marker)),
        "other.safetensors": (tmp_path / "torch.zip").read_bytes(),
    }
    for name, data in payloads.items():
        inject(store, "sneaky", {name: data}, tmp_path)
        with pytest.raises(hub.UnsafeFileError, match="content is a pickle"):
            hub.pull("sneaky", tmp_path / "out", hub=store)
        assert not (tmp_path / "out" / name).exists()
    assert not marker.exists()


def test_interrupted_download_resumes(tmp_path, store):
    src = make_folder(tmp_path / "src")
    hub.push(src, "enc", hub=store)
    full = (src / "model.safetensors").read_bytes()
    dest = tmp_path / "out"
    stage = staging_dir(dest)  # where an interrupted pull left its parts
    stage.mkdir()
    (stage / "model.safetensors.part").write_bytes(full[:5000])
    report = hub.pull("enc", dest, hub=store)
    assert report.resumed_bytes == 5000
    assert (dest / "model.safetensors").read_bytes() == full
    # A corrupt partial file fails the hash, is discarded, and the next pull starts over.
    (dest / "model.safetensors").unlink()
    stage.mkdir()
    (stage / "model.safetensors.part").write_bytes(b"\0" * 5000)
    with pytest.raises(hub.IntegrityError):
        hub.pull("enc", dest, hub=store)
    assert hub.pull("enc", dest, hub=store).resumed_bytes == 0
    assert (dest / "model.safetensors").read_bytes() == full


def test_failed_push_leaves_the_old_revision_visible(tmp_path, store, monkeypatch):
    old = hub.push(make_folder(tmp_path / "a", 1.0), "enc", hub=store)
    calls = []

    def crash_on_second_blob(self, local_file, digest):
        calls.append(digest)
        if len(calls) == 2:
            raise OSError("connection lost")
        return original(self, local_file, digest)

    original = hub.LocalHub.put_blob
    monkeypatch.setattr(hub.LocalHub, "put_blob", crash_on_second_blob)
    with pytest.raises(OSError, match="connection lost"):
        hub.push(make_folder(tmp_path / "b", 2.0), "enc", hub=store)
    monkeypatch.undo()
    assert hub.ls(store, include_hf_cache=False) == {"enc": {"main": old}}
    assert hub.LocalHub(store).revisions("enc") == [old]
    hub.pull("enc", tmp_path / "out", hub=store)
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "a")


def test_fsspec_url_hub_and_resolve(tmp_path, store):
    url = "memory://medfm-hub-test"
    src = make_folder(tmp_path / "src")
    rev_id = hub.push(src, "team/adapter@v1", hub=url)
    local = hub.resolve("hub://team/adapter@v1", hub=url)
    assert local.name == rev_id and tree_bytes(local) == tree_bytes(src)
    assert hub.verify_folder(local)["revision"] == rev_id
    assert hub.resolve(str(src)) == src


def test_cli_push_pull_ls(tmp_path, store):
    runner = CliRunner()
    src = make_folder(tmp_path / "src")
    res = runner.invoke(app, ["hub", "push", str(src), "lab/enc@v1", "--hub", store])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    res = runner.invoke(app, ["hub", "pull", "lab/enc@v1", "--to", str(out), "--hub", store])
    assert res.exit_code == 0, res.output
    assert tree_bytes(out) == tree_bytes(src)
    res = runner.invoke(app, ["hub", "ls", "--hub", store])
    assert "lab/enc@v1" in res.output
    res = runner.invoke(app, ["hub", "pull", "lab/enc@nope", "--to", str(out), "--hub", store])
    assert res.exit_code == 1 and "no such revision" in res.output


# -- Hugging Face backend, offline from a cache laid out as huggingface_hub writes it ---------
@pytest.fixture
def offline_hf(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("MEDFM_HUB_CACHE", str(tmp_path / "pull-cache"))
    return cache


def test_hf_offline_pull_from_cache(tmp_path, offline_hf):
    src = make_folder(tmp_path / "src")
    files = tree_bytes(src)
    hf_cache(offline_hf, "medfm-test/tiny", files, lfs={"model.safetensors"})
    report = hub.pull("hf://medfm-test/tiny@main", tmp_path / "out")
    assert report.revision == COMMIT and tree_bytes(tmp_path / "out") == files
    assert hub.resolve("hub://hf://medfm-test/tiny").name == COMMIT
    assert hub.ls(str(tmp_path / "empty-hub"))["hf://medfm-test/tiny"] == {"main": COMMIT}
    with pytest.raises(hub.RevisionNotFoundError, match="hf://medfm-test/absent"):
        hub.pull("hf://medfm-test/absent", tmp_path / "x")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_hf_offline_tampered_cache_is_refused(tmp_path, offline_hf, name):
    files = tree_bytes(make_folder(tmp_path / "src"))
    repo_dir = hf_cache(offline_hf, "medfm-test/tiny", files, lfs={"model.safetensors"})
    blob = (repo_dir / "snapshots" / COMMIT / name).resolve()
    data = bytearray(blob.read_bytes())
    data[3] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(hub.IntegrityError, match=f"{name}.*not used"):
        hub.pull("hf://medfm-test/tiny", tmp_path / "out")
    assert not (tmp_path / "out" / name).exists()


def test_hf_offline_pickle_repo_is_refused(tmp_path, offline_hf):
    marker = tmp_path / "marker.txt"
    files = {"pytorch_model.bin": pickle.dumps(WritesMarker(marker)), "config.json": b"{}"}
    hf_cache(offline_hf, "medfm-test/pickled", files, lfs={"pytorch_model.bin"})
    with pytest.raises(hub.UnsafeFileError, match="pytorch_model.bin"):
        hub.pull("hf://medfm-test/pickled", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
