"""Issue 18, hub items: links out of a pushed folder, pulls that hold exactly one revision, and
content checks on push and pull (pickles of every protocol, torch zips, malformed safetensors).

Every attack uses real files on disk and a real local hub; pickles carry a `__reduce__` payload
that would write a marker file, so "nothing was unpickled" is checked, not assumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hub_helpers import WritesMarker, hf_cache, inject, make_folder, tree_bytes
from safetensors.torch import save_file

from medfm.finetune import hub
from medfm.finetune.hub.safety import check_content, sniff_pickle
from medfm.finetune.hub.transfer import PULL_RECORD, staging_dir


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HUB_CACHE", str(tmp_path / "pull-cache"))
    return str(tmp_path / "hub")


def hub_blobs(store: str) -> set[str]:
    root = Path(store) / "blobs" / "sha256"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


# -- item 8: push does not follow links out of the folder ------------------------------------
def test_push_refuses_a_symlink_that_leaves_the_folder(tmp_path, store):
    key = tmp_path / "secrets" / "deid.key"
    key.parent.mkdir()
    key.write_text("pseudonymisation key: do not publish")
    src = make_folder(tmp_path / "src")
    (src / "deid.key").symlink_to(key)
    with pytest.raises(hub.HubError, match=r"deid\.key is a symlink that leaves the folder"):
        hub.push(src, "lab/enc", hub=store)
    assert hashlib.sha256(key.read_bytes()).hexdigest() not in hub_blobs(store)
    assert hub.ls(store, include_hf_cache=False) == {}
    # a linked folder leading out is refused the same way
    (src / "deid.key").unlink()
    (src / "keys").symlink_to(key.parent, target_is_directory=True)
    with pytest.raises(hub.HubError, match="keys is a symlink"):
        hub.push(src, "lab/enc", hub=store)
    assert hashlib.sha256(key.read_bytes()).hexdigest() not in hub_blobs(store)


def test_push_takes_a_symlink_to_a_file_inside_the_folder(tmp_path, store):
    src = make_folder(tmp_path / "src")
    (src / "alias.json").symlink_to("config.json")
    hub.push(src, "lab/enc", hub=store)
    out = hub.pull("lab/enc", tmp_path / "out", hub=store).path
    assert not (out / "alias.json").is_symlink()
    assert (out / "alias.json").read_bytes() == (src / "config.json").read_bytes()


# -- item 10: a pulled folder holds exactly the revision, verified, or nothing ----------------
def test_pull_after_a_tag_moves_holds_only_the_new_revision(tmp_path, store):
    old = make_folder(tmp_path / "old", 1.0)
    (old / "old-only.json").write_text("{}")
    hub.push(old, "enc@v1", hub=store)
    dest = tmp_path / "dest"
    hub.pull("enc@v1", dest, hub=store)
    assert (dest / "old-only.json").exists()
    new = make_folder(tmp_path / "new", 2.0)
    hub.push(new, "enc@v1", hub=store)  # the tag moves
    hub.pull("enc@v1", dest, hub=store)
    assert tree_bytes(dest) == tree_bytes(new)
    assert hub.verify_folder(dest)["revision"] == hub.LocalHub(store).resolve("enc", "v1")


def test_files_planted_in_the_pull_cache_do_not_survive(tmp_path, store):
    outside = tmp_path / "outside.json"
    outside.write_text('{"planted": true}')
    src = make_folder(tmp_path / "src")
    hub.push(src, "enc", hub=store)
    cached = hub.resolve("hub://enc", hub=store)
    (cached / "extra.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (cached / "config.json").unlink()
    (cached / "config.json").symlink_to(outside)
    again = hub.resolve("hub://enc", hub=store)
    assert again == cached
    assert tree_bytes(again) == tree_bytes(src)
    assert not (again / "config.json").is_symlink()
    assert outside.read_text() == '{"planted": true}'


def test_a_part_file_linked_elsewhere_is_never_appended_to(tmp_path, store):
    src = make_folder(tmp_path / "src")
    hub.push(src, "enc", hub=store)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    stage = staging_dir(dest)
    stage.mkdir()
    for where in (dest, stage):  # the old resume location and the staging folder
        (where / "model.safetensors.part").symlink_to(victim)
    hub.pull("enc", dest, hub=store)
    assert victim.read_text() == "precious"
    assert tree_bytes(dest) == tree_bytes(src)
    assert not stage.exists()


def test_a_failed_pull_leaves_nothing_or_the_previous_revision(tmp_path, store):
    good = make_folder(tmp_path / "good", 1.0)
    hub.push(good, "enc@v1", hub=store)
    bad = make_folder(tmp_path / "bad", 2.0)
    hub.push(bad, "enc@v2", hub=store)
    digest = hashlib.sha256((bad / "model.safetensors").read_bytes()).hexdigest()
    blob = Path(store) / "blobs" / "sha256" / digest
    blob.write_bytes(blob.read_bytes()[:-1] + b"!")  # config.json is staged, then this fails
    fresh = tmp_path / "fresh"
    with pytest.raises(hub.IntegrityError, match="model.safetensors"):
        hub.pull("enc@v2", fresh, hub=store)
    assert not fresh.exists() and not staging_dir(fresh).exists()
    dest = tmp_path / "dest"
    hub.pull("enc@v1", dest, hub=store)
    with pytest.raises(hub.IntegrityError):
        hub.pull("enc@v2", dest, hub=store)
    assert tree_bytes(dest) == tree_bytes(good)  # v1, whole: nothing of v2 came in
    assert json.loads((dest / PULL_RECORD).read_text())["revision"] == hub.LocalHub(store).resolve(
        "enc", "v1"
    )
    assert not staging_dir(dest).exists()


def test_pull_refuses_to_replace_a_folder_it_did_not_pull(tmp_path, store):
    hub.push(make_folder(tmp_path / "src"), "enc", hub=store)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my work")
    with pytest.raises(hub.HubError, match="not a pulled folder"):
        hub.pull("enc", mine, hub=store)
    assert (mine / "notes.txt").read_text() == "my work"


# -- item 11: content is checked on push and on pull -----------------------------------------
def evil_payloads(tmp_path: Path, marker: Path) -> dict[str, bytes]:
    torch.save({"x": WritesMarker(marker)}, tmp_path / "torch.zip")
    out = {"torch-zip": (tmp_path / "torch.zip").read_bytes()}
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        out[f"protocol-{proto}"] = pickle.dumps(WritesMarker(marker), protocol=proto)
    return out


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "notes.txt"])
def test_pickles_of_every_protocol_are_refused_by_content(tmp_path, store, name):
    marker = tmp_path / "marker.txt"
    for kind, data in evil_payloads(tmp_path, marker).items():
        folder = make_folder(tmp_path / f"push-{kind}")
        (folder / name).write_bytes(data)
        with pytest.raises(hub.UnsafeFileError, match=f"{name}.*(pickle|safetensors|JSON)"):
            hub.push(folder, "evil", hub=store)
        inject(store, f"evil-{kind}", {name: data}, tmp_path / kind)
        out = tmp_path / f"out-{kind}"
        with pytest.raises(hub.UnsafeFileError, match=name):
            hub.pull(f"evil-{kind}", out, hub=store)
        assert not out.exists() and not staging_dir(out).exists(), kind
    assert hub.ls(store, include_hf_cache=False).keys() == {
        f"evil-{k}" for k in evil_payloads(tmp_path, marker)
    }  # only the injected ones: no push got through
    assert not marker.exists()


def test_sniff_pickle_catches_protocols_0_and_1(tmp_path):
    marker = tmp_path / "marker.txt"
    for proto in (0, 1):
        path = tmp_path / f"p{proto}.bin"
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0], "x": WritesMarker(marker)}, proto))
        with pytest.raises(hub.UnsafeFileError, match="content is a pickle"):
            sniff_pickle(path, path.name)
    assert not marker.exists()


def test_headerless_and_padded_pickles_are_refused(tmp_path):
    marker = tmp_path / "marker.txt"
    payload = pickle.dumps(WritesMarker(marker), protocol=4)
    padding = b"S'" + b"a" * 200_000 + b"'\n0"  # a 200 kB string, popped, then the payload
    for name, data in {"no-proto": payload[2:], "padded": padding + pickle.dumps(
        WritesMarker(marker), protocol=0
    )}.items():  # fmt: skip
        path = tmp_path / f"{name}.txt"
        path.write_bytes(data)
        with pytest.raises(hub.UnsafeFileError, match="content is a pickle"):
            sniff_pickle(path, path.name)
    assert not marker.exists()


def test_files_that_merely_start_like_pickle_opcodes_pass(tmp_path, store):
    """reST opens with `..` (STOP), numeric text with `1.` (POP_MARK, STOP), PNG with \\x89
    (NEWFALSE): none would run anything, and none is refused."""
    import matplotlib

    src = make_folder(tmp_path / "src")
    (src / "README.rst").write_text(".. -*- rest -*-\n\nA model\n=======\n")
    (src / "values.txt").write_text("1.000000e+00 0.000000e+00\n")
    png = Path(matplotlib.get_data_path()) / "images" / "hand.png"
    (src / "hand.png").write_bytes(png.read_bytes())
    hub.push(src, "lab/enc", hub=store)
    assert tree_bytes(hub.pull("lab/enc", tmp_path / "out", hub=store).path) == tree_bytes(src)


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


MALFORMED = {
    "offsets past the end": safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8
    ),
    "size disagrees with shape": safetensors_bytes(
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "header longer than the file": struct.pack("<Q", 10**6) + b"{}",
    "header not JSON": struct.pack("<Q", 4) + b"\xff\xfe{]",
    "unknown dtype": safetensors_bytes(
        {"w": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8
    ),
    "trailing bytes": safetensors_bytes(
        {"w": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 9
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_are_refused_on_push_and_pull(tmp_path, store, case):
    folder = make_folder(tmp_path / "src")
    (folder / "model.safetensors").write_bytes(MALFORMED[case])
    with pytest.raises(hub.UnsafeFileError, match="model.safetensors.*safetensors"):
        hub.push(folder, "bad", hub=store)
    inject(store, "bad", {"model.safetensors": MALFORMED[case]}, tmp_path)
    with pytest.raises(hub.UnsafeFileError, match="safetensors"):
        hub.pull("bad", tmp_path / "out", hub=store)
    assert not (tmp_path / "out").exists()


def test_real_safetensors_of_every_dtype_pass(tmp_path):
    tensors = {
        str(dt): torch.zeros(3, 2, dtype=dt)
        for dt in (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8)
    }
    tensors["scalar"] = torch.tensor(1.5)
    tensors["empty"] = torch.zeros(0, 4)
    path = tmp_path / "w.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    check_content(path, path.name, path.name)


def test_hf_offline_pull_checks_content_too(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("MEDFM_HUB_CACHE", str(tmp_path / "pull-cache"))
    marker = tmp_path / "marker.txt"
    files = tree_bytes(make_folder(tmp_path / "src"))
    files["model.safetensors"] = pickle.dumps(WritesMarker(marker), protocol=0)
    hf_cache(cache, "medfm-test/sneaky", files, lfs={"model.safetensors"})
    with pytest.raises(hub.UnsafeFileError, match="model.safetensors"):
        hub.pull("hf://medfm-test/sneaky", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert not os.path.exists(staging_dir(tmp_path / "out"))


# -- item 9: an export names no local path, and loads nothing from outside itself ------------
ENC2D = {"name": "vit2d", "size": "tiny", "embed_dim": 32, "depth": 1, "num_heads": 2,
         "img_size": 28, "patch_size": 7}  # fmt: skip


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sample_data):
    """A real (tiny, one-epoch) LoRA fine-tune of an untrained encoder on PneumoniaMNIST."""
    import numpy as np

    from medfm.finetune.config import load_config
    from medfm.finetune.train import run
    from medfm.models import build_encoder
    from medfm.models.contract import Contract
    from medfm.models.export import export_encoder
    from medfm.shards import Sample, ShardSetWriter

    npz = sample_data / "pneumoniamnist" / "pneumoniamnist.npz"
    if not npz.is_file():
        pytest.skip(f"{npz} is missing")
    base = tmp_path_factory.mktemp("export-security")
    z = np.load(npz)
    with ShardSetWriter(str(base / "shards")) as w:
        for split, n in {"train": 48, "val": 24, "test": 24}.items():
            for i in range(n):
                w.write(Sample(
                    key=f"pm-{split}-{i}", kind="image2d", modality="DX", dataset="pneumoniamnist",
                    patient_id=f"{split}{i}", split=split, data=z[f"{split}_images"][i],
                    labels={"label": int(z[f"{split}_labels"][i, 0])}, licence="CC BY 4.0",
                ))  # fmt: skip
    torch.manual_seed(0)
    export_encoder(build_encoder(ENC2D), base / "encoder",
                   preprocessing=Contract(kind="image2d", image_size=28).describe(), data={},
                   training={"steps": 0})  # fmt: skip
    cfg = load_config(None, base={
        "name": "sec", "out_dir": str(base / "run"), "encoder": str(base / "encoder"),
        "mode": "lora", "data": {"shards": str(base / "shards"), "batch_size": 24},
        "task": {"type": "binary", "label_key": "label", "label_names": ["normal", "pneumonia"]},
        "train": {"epochs": 1, "lr": 1e-3}, "eval": {"bootstrap": 20},
    })  # fmt: skip
    return base, run(cfg)


@pytest.mark.slow
def test_export_records_no_local_path_and_moves_with_its_encoder(lora_run, tmp_path):
    from medfm.finetune.export import export, load

    base, run_dir = lora_run
    out = export(run_dir, base / "exports" / "sec", overwrite=True)
    for name in ("medfm.json", "README.md", "adapter_config.json"):
        text = (out / name).read_text()
        assert str(base) not in text and str(Path.home()) not in text, name
    meta = json.loads((out / "medfm.json").read_text())
    assert meta["base_encoder"]["uri"] == "../../encoder"
    assert not Path(meta["data"]["shards"]["uri"]).is_absolute()
    assert "base_model" not in (out / "README.md").read_text().split("---")[1]
    # the export and its encoder moved together still load: the path is relative
    moved = tmp_path / "moved"
    (moved / "exports").mkdir(parents=True)
    (out.parent.parent / "encoder").rename(moved / "encoder")
    try:
        out.rename(moved / "exports" / "sec")
        model = load(moved / "exports" / "sec")
        assert model.medfm["name"] == "sec"
    finally:
        (moved / "encoder").rename(base / "encoder")


@pytest.mark.slow
def test_export_files_outside_the_export_are_refused_without_their_hash(lora_run, tmp_path):
    from medfm.finetune.export import ExportError, export, load, read_export

    base, run_dir = lora_run
    out = export(run_dir, tmp_path / "exp")
    secret = tmp_path / "hostname"
    secret.write_text("ward-7-workstation\n")
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    meta = json.loads((out / "medfm.json").read_text())
    for name in (f"../{secret.name}", str(secret), "sub/../../hostname"):
        bad = {**meta, "files": {**meta["files"], name: "0" * 64}}
        (out / "medfm.json").write_text(json.dumps(bad))
        with pytest.raises(ExportError, match="not a file inside the export") as err:
            load(out)
        assert digest not in str(err.value)
    # a listed file that is a link out of the export, even one with the recorded hash
    (out / "medfm.json").write_text(json.dumps({**meta, "files": {**meta["files"], "x": digest}}))
    (out / "x").symlink_to(secret)
    with pytest.raises(ExportError, match="a link"):
        read_export(out)
    (out / "x").unlink()
    # the files this mode loads must be listed (hash-checked), or it is refused
    files = {k: v for k, v in meta["files"].items() if k != "adapter_model.safetensors"}
    (out / "medfm.json").write_text(json.dumps({**meta, "files": files}))
    with pytest.raises(ExportError, match="adapter_model.safetensors"):
        read_export(out)
    # the base encoder may not be any local path
    absolute = {**meta, "base_encoder": {**meta["base_encoder"], "uri": str(base / "encoder")}}
    (out / "medfm.json").write_text(json.dumps(absolute))
    with pytest.raises(ExportError, match="absolute local path.*base="):
        load(out)
    model = load(out, base=str(base / "encoder"))  # given explicitly, it is the user's choice
    assert model.medfm["base_encoder"]["sha256"] == meta["base_encoder"]["sha256"]
    (out / "medfm.json").write_bytes(b"\xff{")
    with pytest.raises(ExportError, match="not valid JSON"):
        read_export(out)
