"""Workers hand batches over through reused shared-memory arenas (medfm.shards.batchring): the
batches must equal the in-process ones bit for bit, a batch the consumer keeps must never be
overwritten, and released arenas must be reused."""

from __future__ import annotations

import gc

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from readers_helpers import anatomical_slices

from medfm.shards import MixedDataset, Sample, ShardDataLoader, ShardDataset, ShardSetWriter

torch.set_num_threads(1)


def _samples() -> list[tuple[str, str, np.ndarray]]:
    """(dataset, key, pixels): real MR slices as 8- and 16-bit gray PNG, in one shape and in
    three (ragged), and pydicom's RGB secondary capture in eight orientations."""
    out = []
    for key, arr in anatomical_slices():
        u8 = (np.clip(arr, 0, None) * (255.0 / max(1, int(arr.max())))).astype(np.uint8)
        out.append(("ragged", key, u8))
        if "-ax" in key:
            out.append(("gray8", key, u8))
            out.append(("gray16", key, (np.clip(arr, 0, None).astype(np.uint16) * 37)))
    rgb = pydicom.dcmread(get_testdata_file("SC_rgb.dcm")).pixel_array
    for k in range(8):
        out.append(
            ("rgb", f"rgb{k}", np.ascontiguousarray(np.rot90(rgb[:, ::-1] if k > 3 else rgb, k)))
        )
    return out


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    root = tmp_path_factory.mktemp("ring") / "set"
    with ShardSetWriter(str(root), shard_max_bytes=20000) as w:
        for i, (dataset, key, arr) in enumerate(_samples()):
            w.write(
                Sample(
                    key=f"{dataset}-{key}", kind="image2d", modality="MR", dataset=dataset,
                    patient_id=f"p{i % 5}", split="train", data=arr, labels={"class": i % 3},
                )
            )  # fmt: skip
    return root


def _batches(loader) -> list[dict]:
    return [b for b in loader]


def assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert sorted(g) == sorted(w)
        for k in w:
            if isinstance(w[k], torch.Tensor):
                assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k
            elif k == "data" and isinstance(w[k], list):  # ragged images stay a list
                assert all(torch.equal(a, b) for a, b in zip(g[k], w[k], strict=True))
            else:
                assert g[k] == w[k], k


@pytest.mark.parametrize("dataset", ["gray8", "gray16", "rgb", "ragged"])
def test_worker_batches_equal_in_process_batches(pixels, dataset, tmp_path):
    def make(**kw):
        return ShardDataLoader(ShardDataset(pixels, datasets=dataset, seed=3), 4, **kw)

    def mark(worker_id: int) -> None:  # a user's worker_init_fn still runs
        (tmp_path / f"worker{worker_id}").touch()

    want = _batches(make())
    ring = make(num_workers=2, worker_init_fn=mark)
    assert_same(_batches(ring), want)
    assert_same(_batches(make(num_workers=2, reuse_buffers=False)), want)
    assert (tmp_path / "worker0").exists() and (tmp_path / "worker1").exists()
    first = want[0]["data"]
    if dataset != "ragged":
        assert first.dtype == torch.float32 and first.shape[1] == (3 if dataset == "rgb" else 1)
        assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
        assert ring.collate_fn._mapped, "the workers' batches did not come through the ring"


def test_kept_batches_are_never_overwritten(pixels):
    """A consumer that keeps every batch holds all arenas; workers then collate the ordinary way
    instead of reusing an arena whose batch is still alive."""
    want = _batches(ShardDataLoader(ShardDataset(pixels, datasets="gray16", seed=1), 2))
    loader = ShardDataLoader(ShardDataset(pixels, datasets="gray16", seed=1), 2, num_workers=2)
    kept = [b for b in loader]
    assert len(kept) > 2 * loader._ring_slots  # more batches than arenas
    assert_same(kept, want)


def test_released_arenas_are_reused_and_handed_back(pixels):
    ds = ShardDataset(pixels, datasets="ragged", seed=2)
    loader = ShardDataLoader(ds, 3, num_workers=2)
    n = 0
    for batch in loader:
        n += len(batch["key"])
    del batch
    gc.collect()
    ring = loader.collate_fn
    assert n == len(ds) and len(ring._mapped) <= 2 * loader._ring_slots < len(loader)
    assert bool(ring._free.all()), "a batch no one holds still leases its arena"


def test_persistent_workers_and_mixing_through_the_ring(pixels):
    def mixed():
        a = ShardDataset(pixels, datasets="gray8", seed=0, name="gray8")
        b = ShardDataset(pixels, datasets="gray16", seed=0, name="gray16")
        return MixedDataset({a: 1.0, b: 1.0}, seed=5, samples_per_epoch=40)

    want = ShardDataLoader(mixed(), 4)
    want = [_batches(want), _batches(want)]
    loader = ShardDataLoader(mixed(), 4, num_workers=2, persistent_workers=True)
    for epoch in range(2):
        assert_same(_batches(loader), want[epoch])
    assert len({s for b in want[0] for s in b["source"]}) == 2
