"""PatchSampler on a real CT with its segmentation: patch-only reads (counted through a wrapping
Zarr store), foreground sampling, sliding-window grid, mm units, resume and MONAI transforms."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from readers_helpers import load_ct, write_ct_set
from zarr.abc.store import RangeByteRequest, SuffixByteRequest

from medfm.shards import (
    CountingStore,
    ItemTransform,
    PatchSampler,
    ShardDataLoader,
    ShardDataset,
    ShardSet,
)

torch.set_num_threads(1)
CHUNK = 16


@pytest.fixture(scope="module")
def ct(tmp_path_factory, sample_data):
    root = tmp_path_factory.mktemp("ct") / "set"
    write_ct_set(root, sample_data, copies=2, chunks=(CHUNK,) * 3)
    return root


def rows(root):
    return {r["key"]: r for r in ShardSet(str(root)).rows()}


def shard_index(path) -> np.ndarray:
    """(offset, nbytes) of every chunk, from the sharding codec's index at the end of the file."""
    grid = [-(-s // CHUNK) for s in (128, 112, 32)]  # shard shape: the volume in whole chunks
    n = int(np.prod(grid))
    raw = path.read_bytes()[-(16 * n + 4) : -4]
    return np.frombuffer(raw, "<u8").reshape(*grid, 2)


def covered(intervals) -> set[int]:
    return {b for start, end in intervals for b in range(start, end)}


def test_patch_reads_only_intersecting_chunks(ct):
    stores = []

    def counting(store):
        stores.append(CountingStore(store))
        return stores[-1]

    sampler = PatchSampler(ct, (24, 24, 12), mode="uniform", store_wrapper=counting)
    row = rows(ct)["ct0"]
    shard_file = ct / row["shard"] / "image" / "c" / "0" / "0" / "0"
    index = shard_index(shard_file)
    rng = np.random.default_rng(0)
    sampler.patch(row, 0, rng)  # opens the group: metadata reads happen once
    (store,) = stores
    for _ in range(6):
        store.reset()
        p = sampler.patch(row, 0, rng)
        start, size = p["start"], p["size"]
        spans = zip(start, size, strict=True)
        hit = [range(s // CHUNK, (s + n - 1) // CHUNK + 1) for s, n in spans]
        want = [index[i, j, k] for i, j, k in itertools.product(*hit)]
        want = [(int(o), int(o + n)) for o, n in want]
        image_reads = [(r, n) for key, r, n in store.requests if key.startswith("image/c/")]
        assert all(key.startswith(("image/c/", "label/c/")) for key, _, _ in store.requests)
        data = [(r.start, r.end) for r, _ in image_reads if isinstance(r, RangeByteRequest)]
        index_reads = [n for r, n in image_reads if isinstance(r, SuffixByteRequest)]
        assert covered(data) == covered(want)  # exactly the chunks the patch intersects
        chunk_bytes = sum(e - s for s, e in want)
        assert sum(n for _, n in image_reads) <= 1.2 * chunk_bytes + sum(index_reads)
        assert sum(n for _, n in image_reads) < 0.5 * shard_file.stat().st_size


def test_patches_equal_the_stored_voxels(ct, sample_data):
    img, seg, _ = load_ct(sample_data)
    sampler = PatchSampler(ct, (40, 33, 20), mode="uniform", seed=1)
    row = rows(ct)["ct0"]
    for i in range(4):
        p = sampler.patch(row, 0, np.random.default_rng(i))
        region = tuple(slice(s, s + n) for s, n in zip(p["start"], p["size"], strict=True))
        assert np.array_equal(p["image"], img[region]) and np.array_equal(p["label"], seg[region])


def test_foreground_fraction_centres_on_labels(ct, tmp_path):
    row = rows(ct)["ct0"]
    fg = PatchSampler(ct, 8, mode="foreground", foreground_fraction=1.0, cache_dir=str(tmp_path))
    uni = PatchSampler(ct, 8, mode="uniform")
    centre_hits = []
    for i in range(30):
        p = fg.patch(row, 0, np.random.default_rng(i))
        centre_hits.append(p["label"][4, 4, 4] > 0 or (p["label"] > 0).any())
    assert all(centre_hits)
    assert list(tmp_path.glob("*.npz"))  # foreground locations cached on disk
    rate_uniform = np.mean(
        [(uni.patch(row, 0, np.random.default_rng(i))["label"] > 0).any() for i in range(30)]
    )
    assert rate_uniform < 1.0
    # the cached locations are reused by a fresh sampler, and classes are sampled evenly
    again = PatchSampler(ct, 8, mode="foreground", foreground_fraction=1.0, cache_dir=str(tmp_path))
    assert again.foreground(row, None).keys() == fg.foreground(row, None).keys()


def test_grid_windows_tile_the_volume(ct, sample_data):
    img, _, _ = load_ct(sample_data)
    grid = PatchSampler(ct, (64, 48, 16), mode="grid", overlap=0.5)
    row = rows(ct)["ct0"]
    out = np.full(img.shape, np.iinfo(np.int32).min, dtype=np.int32)
    for sub in range(grid.units_for(row)):
        p = grid.patch(row, sub)
        region = tuple(slice(s, s + n) for s, n in zip(p["start"], p["size"], strict=True))
        out[region] = p["image"]
    assert np.array_equal(out, img)  # stitched windows give back the whole volume


def test_mm_units_convert_by_spacing(ct):
    row = rows(ct)["ct0"]  # spacing 3 mm
    mm = PatchSampler(ct, (48.0, 30.0, 15.0), units="mm")
    assert mm.voxel_size(row) == (16, 10, 5)
    resized = PatchSampler(ct, (48.0, 30.0, 15.0), units="mm", output_shape=(32, 20, 10))
    p = resized.patch(row, 0, np.random.default_rng(0))
    assert p["image"].shape == (32, 20, 10) and p["label"].shape == (32, 20, 10)


def test_dataset_patches_with_workers_resume_and_monai(ct):
    from monai.transforms import Compose, RandFlipd, RandGaussianNoised

    aug = ItemTransform(
        Compose(
            [
                RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
                RandGaussianNoised(keys=["image"], prob=1.0, std=5.0),
            ]
        )
    )

    def make():
        sampler = PatchSampler(ct, 24, mode="foreground", patches_per_volume=6, seed=3)
        ds = ShardDataset(ct, patches=sampler, seed=3, transform=aug)
        return ShardDataLoader(ds, 2, num_workers=2)

    full = list(make())
    assert len(full) == 6 and full[0]["data"].shape == (2, 1, 24, 24, 24)
    assert full[0]["label_map"].shape == (2, 1, 24, 24, 24) and full[0]["location"].shape == (2, 3)
    assert all(type(b["data"]) is torch.Tensor for b in full)  # plain tensors, no MetaTensor
    run = make()
    it = iter(run)
    head = [next(it) for _ in range(2)]
    state = json.loads(json.dumps(run.state_dict()))
    del it
    resumed = make()
    resumed.load_state_dict(state)
    got = head + list(resumed)
    for a, b in zip(got, full, strict=True):  # same patches and the same augmentation draws
        assert a["key"] == b["key"] and torch.equal(a["location"], b["location"])
        assert torch.equal(a["data"], b["data"])


def test_patches_from_a_remote_url(ct):
    import fsspec

    fs = fsspec.filesystem("memory")
    for path in sorted(p for p in ct.rglob("*") if p.is_file()):
        fs.pipe(f"/ctremote/{path.relative_to(ct)}", path.read_bytes())
    local = PatchSampler(ct, 20, mode="foreground", patches_per_volume=2, seed=4)
    remote = PatchSampler("memory://ctremote", 20, mode="foreground", patches_per_volume=2, seed=4)
    a = list(ShardDataset(ct, patches=local, seed=4))
    b = list(ShardDataset("memory://ctremote", patches=remote, seed=4))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"] and torch.equal(x["data"], y["data"])
        assert torch.equal(x["label_map"], y["label_map"])
