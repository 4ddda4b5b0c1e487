"""medfm.io on real local files and fsspec memory:// URLs: atomic writes leave nothing half
written, hashes agree with hashlib, and the synth audit writes where its URL says."""

from __future__ import annotations

import hashlib
import json
import os
import uuid

import fsspec
import matplotlib
import numpy as np
import pytest
import torch

from medfm import io

matplotlib.use("Agg")


@pytest.fixture(params=["local", "memory"])
def dest(request, tmp_path) -> str:
    """A folder that does not exist yet: on local disk, or in the fsspec memory filesystem."""
    if request.param == "local":
        return str(tmp_path / "out")
    return f"memory://io-{uuid.uuid4().hex[:8]}/out"


def listing(folder: str) -> list[str]:
    fs, path = io.get_fs(folder)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def test_atomic_open_leaves_no_temporary_when_the_writer_fails(dest):
    io.write_text(f"{dest}/a.txt", "old")
    with pytest.raises(RuntimeError, match="killed"), io.atomic_open(f"{dest}/a.txt") as f:
        f.write(b"half of the new conte")
        raise RuntimeError("killed mid-write")
    assert listing(dest) == ["a.txt"]  # no .tmp- file beside it
    fs, path = io.get_fs(f"{dest}/a.txt")
    assert fs.cat_file(path) == b"old"  # the previous version is intact
    assert io.find_temporaries(*io.get_fs(dest)) == []


def test_fs_and_path_or_one_url_name_the_same_file(dest):
    fs, folder = io.get_fs(dest)
    io.atomic_write_bytes(fs, f"{folder}/b.bin", b"\x00\x01payload")
    with io.atomic_open(fs, f"{folder}/c.bin") as f:
        f.write(b"streamed")
    assert io.sha256_file(f"{dest}/b.bin") == io.sha256_file(fs, f"{folder}/b.bin")
    assert fs.cat_file(f"{folder}/c.bin") == b"streamed"
    with pytest.raises(TypeError):
        io.locate(fs)  # a filesystem without a path names nothing
    with pytest.raises(TypeError):
        io.locate(dest, "x")  # a URL already names the file


def test_sha256_of_file_and_bytes_agree_with_hashlib(dest):
    data = np.random.default_rng(0).bytes(3 * io.HASH_BLOCK + 17)  # several blocks, ragged end
    with io.atomic_open(f"{dest}/big.bin") as f:
        f.write(data)
    want = hashlib.sha256(data).hexdigest()
    assert io.sha256_file(f"{dest}/big.bin") == (want, len(data))
    assert io.sha256_bytes(data) == want
    arr = np.arange(1000, dtype="<i4")
    assert io.sha256_bytes(arr) == hashlib.sha256(arr.tobytes()).hexdigest()


def test_json_safetensors_and_figures_land_at_the_url(dest):
    from matplotlib.figure import Figure
    from safetensors.torch import load

    io.write_json(f"{dest}/r.json", {"b": 1, "a": [1.5]}, indent=1, sort_keys=True)
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    digest = io.save_safetensors(f"{dest}/w.safetensors", tensors, {"format": "pt"})
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    io.save_figure(fig, f"{dest}/plot.png", dpi=50)

    fs, folder = io.get_fs(dest)
    assert json.loads(fs.cat_file(f"{folder}/r.json")) == {"a": [1.5], "b": 1}
    raw = fs.cat_file(f"{folder}/w.safetensors")
    assert digest == hashlib.sha256(raw).hexdigest()
    assert torch.equal(load(raw)["w"], tensors["w"])
    assert fs.cat_file(f"{folder}/plot.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert listing(dest) == ["plot.png", "r.json", "w.safetensors"]


# -- the synth audit and withholding, writing to memory:// -------------------------------------


@pytest.fixture(scope="module")
def synth_world(tmp_path_factory):
    """Real PneumoniaMNIST shards and an untrained conditional diffusion export (local)."""
    from synth_helpers import write_pneumonia

    from medfm.models.diffusion.contract import build_contract
    from medfm.models.diffusion.export import export_diffusion
    from medfm.models.diffusion.model import DiffusionConfig, DiffusionModel
    from medfm.shards import Manifest

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("io-synth")
    real = tmp / "real"
    write_pneumonia(real, {"train": 40, "val": 12})
    m = Manifest.open(str(real))
    rows = [r for r in m.rows() if r["split"] == "train"]
    cfg = DiffusionConfig(channels=(8, 16, 16), attention_levels=(False,) * 3, num_classes=2)
    export = export_diffusion(
        DiffusionModel(cfg).eval(),
        tmp / "model",
        preprocessing=build_contract(str(real), rows, m.header, (28, 28), None),
        classes=[0, 1],
        class_key="class",
        data_manifests=[{"root": str(real), "sha256": m.header["manifest"]["sha256"]}],
    )
    return {"tmp": tmp, "real": str(real), "export": str(export)}


def test_synth_audit_and_withhold_write_into_the_memory_filesystem(synth_world, monkeypatch):
    from medfm.models.diffusion.sampling import SamplerSettings
    from medfm.shards import Manifest
    from medfm.synth.audit import audit, load_audit_config
    from medfm.synth.generate import GenerateOptions
    from medfm.synth.withhold import generate_audited

    monkeypatch.chdir(synth_world["tmp"])  # a `memory:` folder would appear here
    out = f"memory://synth-{uuid.uuid4().hex[:8]}/audited"
    cfg = load_audit_config(overrides={"msssim_pairs": 10})
    opts = GenerateOptions(n=6, sampler=SamplerSettings("ddim", 2))
    header, _ = generate_audited(synth_world["export"], out, opts, synth_world["real"], cfg)
    assert header["num_samples"] == len(Manifest.open(out))

    mem = fsspec.filesystem("memory")
    root = io.get_fs(out)[1]
    saved = json.loads(mem.cat_file(f"{root}/audit/report.json"))
    assert saved["synthetic"] == out and "withheld" in saved  # withhold's final report
    for name in ("report.png", "closest_pairs.png"):
        assert mem.size(f"{root}/audit/{name}") > 500
    assert not [p for p in mem.ls(root, detail=False) if io.TMP_MARKER in p]

    again = f"memory://synth-{uuid.uuid4().hex[:8]}/audit"
    audit(out, synth_world["real"], again, cfg)
    assert mem.exists(f"{io.get_fs(again)[1]}/report.json")
    assert not [p for p in os.listdir(".") if p.startswith(("memory", "s3"))]
