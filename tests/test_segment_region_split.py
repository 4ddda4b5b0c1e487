"""task.region_split: one labelled volume cut into train / val / test slabs along an axis, with
gaps between them. Patches are drawn from a real shard set whose voxels carry their own index
along the split axis, so what a patch *read* (not just where it starts) shows which slab it
came from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medfm.config import ConfigError
from medfm.finetune.config import load_config
from medfm.finetune.data import Collate, contract_for, split_rows
from medfm.finetune.encoder import load_base_encoder
from medfm.finetune.segment import SlabBox, sampler, score_split, slab_bounds, train_dataset
from medfm.finetune.tasks import task_for
from medfm.finetune.train import build_model, run
from medfm.models import build_encoder
from medfm.models.contract import Contract
from medfm.models.export import export_encoder
from medfm.shards import Geometry, Sample, ShardSetWriter

SHAPE = (24, 61, 16)  # split along axis 1
PATCH = (16, 8, 16)
ENC = {"name": "vit3d", "size": "tiny", "embed_dim": 32, "depth": 2, "num_heads": 2,
       "img_size": list(PATCH), "patch_size": [4, 4, 4]}  # fmt: skip
SLABS = {"test": 0.3, "train": 0.4, "val": 0.3}


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """One volume (in the manifest's val split: region_split ignores it) whose voxels hold
    1 + their j index; its label map is foreground in a block that crosses every slab."""
    root = tmp_path_factory.mktemp("region") / "shards"
    j = np.arange(SHAPE[1], dtype=np.int16)[None, :, None]
    image = np.broadcast_to(j + 1, SHAPE).copy()
    label = np.zeros(SHAPE, np.uint8)
    label[4:20, :, 4:12] = 1
    with ShardSetWriter(str(root)) as w:
        w.write(Sample(
            key="vol", kind="volume3d", modality="CT", dataset="synthetic_ct", patient_id="p0",
            split="val", data=image, label_map=label, licence="CC0",
            geometry=Geometry.from_nifti_affine(np.eye(4)),
        ))  # fmt: skip
        w.close(datasets={"synthetic_ct": {"licence": "CC0"}})
    encoder = root.parent / "encoder"
    torch.manual_seed(0)
    contract = Contract(kind="volume3d", intensity="window", window=(0.0, 61.0), channels=1,
                        patch_size=PATCH)  # fmt: skip
    export_encoder(build_encoder(ENC), encoder, preprocessing=contract.describe(), data={},
                   training={"steps": 0})  # fmt: skip
    return root, encoder


def config(volume, patches: int = 200, **region):
    root, encoder = volume
    return load_config(None, base={
        "name": "slabs", "out_dir": str(root.parent / "run"), "encoder": str(encoder),
        "mode": "full", "data": {"shards": str(root), "batch_size": 4},
        "task": {"type": "segmentation", "label_names": ["background", "fg"],
                 "region_split": {"axis": 1, "slabs": SLABS} | region},
        "train": {"epochs": 1, "patches_per_volume": patches, "seed": 3},
        "eval": {"bootstrap": 20},
    })  # fmt: skip


def contract_of(cfg):
    base = load_base_encoder(cfg.encoder)
    return contract_for(base.preprocessing, base.encoder, cfg)


def read_js(image: np.ndarray) -> set[int]:
    """The j indices a patch read (0 is padding)."""
    return {int(v) - 1 for v in np.unique(image) if v > 0}


def test_slabs_are_disjoint_and_a_patch_apart():
    cfg_slabs = {"test": 0.3, "train": 0.4, "val": 0.3}
    rs = type("RS", (), {"slabs": cfg_slabs, "axis": 1})()
    b = slab_bounds(61, rs, 8)
    assert b == {"test": (0, 14), "train": (22, 39), "val": (47, 61)}
    spans = sorted(b.values())
    assert all(nxt[0] - cur[1] == 8 for cur, nxt in zip(spans, spans[1:], strict=False))
    with pytest.raises(ValueError, match="leave a slab empty"):
        slab_bounds(17, rs, 8)


def test_no_training_patch_reads_a_held_out_voxel(volume):
    cfg = config(volume)
    root = str(volume[0])
    contract = contract_of(cfg)
    bounds = SlabBox(cfg, "train", contract.patch_size).bounds({"shape": list(SHAPE)})
    train = set(range(*bounds["train"]))
    held_out = set(range(*bounds["val"])) | set(range(*bounds["test"]))
    # Rows come from every manifest split: the volume's own split ("val") is not used.
    assert [r["key"] for r in split_rows(root, "train", cfg)] == ["vol"]
    seen = set()
    for it in train_dataset(root, contract, cfg):
        js = read_js(it["data"].numpy())
        assert js <= train and not js & held_out, (it["meta"]["patch_start"], sorted(js))
        seen |= js
    assert seen == train  # 200 random and foreground-centred patches reach the whole slab


@pytest.mark.parametrize("split", ["val", "test"])
def test_scoring_windows_tile_their_slab_and_nothing_else(volume, split):
    cfg = config(volume)
    contract = contract_of(cfg)
    grid = sampler(str(volume[0]), contract, cfg, split, mode="grid", overlap=0.25)
    row = split_rows(str(volume[0]), split, cfg)[0]
    lo, hi = grid.box.bounds(row)[split]
    covered = set()
    for sub in range(grid.units_for(row)):
        covered |= read_js(grid.patch(row, sub)["image"])
    assert covered == set(range(lo, hi))


def test_gap_below_the_patch_and_bad_slabs_are_refused(volume):
    cfg = config(volume, gap=4)
    with pytest.raises(ConfigError, match="gap: 4 voxels is less than the patch's 8"):
        SlabBox(cfg, "train", contract_of(cfg).patch_size)
    with pytest.raises(ConfigError, match="slabs: one fraction each"):
        config(volume, slabs={"train": 0.5, "test": 0.5})
    with pytest.raises(ConfigError, match="sum to 1"):
        config(volume, slabs={"train": 0.5, "val": 0.3, "test": 0.3})
    base = config(volume).to_dict()
    base["task"] |= {"type": "binary", "label_names": ["a", "b"]}
    with pytest.raises(ConfigError, match="only segmentation"):
        load_config(None, base=base)


def test_run_records_the_slabs_and_scores_test_blocks(volume):
    cfg = config(volume, patches=8, blocks=4, blocks_axis=2)
    out = run(cfg)
    fit = json.loads((out / "run.json").read_text())["fit"]
    assert fit["slabs"] == {"vol": {"axis": 1, "gap": 8, "test": [0, 14], "train": [22, 39],
                                    "val": [47, 61]}}  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert np.isfinite(m["dice"]["value"]) and m["dice"]["n_boot"] > 0
    # Four blocks of the test slab along k, each its own case for the bootstrap.
    contract, task = contract_of(cfg), task_for(cfg.task)
    model = build_model(load_base_encoder(cfg.encoder), cfg, task)
    cases, ids = score_split(model, str(volume[0]), "test", contract, cfg, "cpu", full=False)
    assert len(cases) == 4 and len(set(ids)) == 4
    assert Collate(contract, task)  # the task's collate builds for the same contract
