"""ShardDataset and ShardDataLoader on real shard sets: filters, decoding, distribution across real
processes, deterministic shuffling, exact resume, remote URLs and bad shards."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from readers_helpers import write_2d_set, write_ct_set, write_pneumonia_set

from medfm.shards import ShardDataLoader, ShardDataset, ShardError, ShardFormatError, ShardSet

torch.set_num_threads(1)
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def anat(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("anat") / "set"
    return root, write_2d_set(root)


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_filters_decoding_and_labels(anat):
    root, keys = anat
    ds = ShardDataset(root, split="train", modalities="MR", shuffle=False)
    rows = list(ShardSet(str(root)).rows())
    want = {r["key"] for r in rows if r["split"] == "train" and r["modality"] == "MR"}
    items = list(ds)
    assert {it["key"] for it in items} == want and len(items) == len(want)
    it = items[0]
    assert it["data"].dtype == torch.float32 and it["data"].ndim == 3 and it["data"].shape[0] == 1
    assert it["meta"]["modality"] == "MR" and it["meta"]["split"] == "train"
    # int16 MR slices are not rescaled: values equal the stored voxels
    row = next(r for r in rows if r["key"] == it["key"])
    stored = ShardSet(str(root)).read_sample(row).data
    assert torch.equal(it["data"][0], torch.from_numpy(stored.astype(np.float32)))
    assert int(it["label"]) == json.loads(row["labels"])["class"]
    ones = ShardDataset(root, labels={"class": 1}, shuffle=False)
    assert {i["key"] for i in ones} == {
        r["key"] for r in rows if json.loads(r["labels"])["class"] == 1
    }
    ct = ShardDataset(root, labels=lambda r: r["modality"] == "CT", shuffle=False)
    assert [i["key"] for i in ct] == ["dcm-ct"]


def test_pneumonia_uint8_scaled_and_batched(tmp_path, sample_data):
    write_pneumonia_set(tmp_path / "pm", sample_data, n=64)
    loader = ShardDataLoader(ShardDataset(tmp_path / "pm", seed=1), 16, num_workers=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    b = batches[0]
    assert b["data"].shape == (16, 1, 28, 28) and 0.0 <= float(b["data"].min())
    assert float(b["data"].max()) <= 1.0 and b["label"].dtype == torch.int64
    assert sorted(k for b in batches for k in b["key"]) == [f"pm{i:05d}" for i in range(64)]


def test_shuffle_is_deterministic_per_seed_and_epoch(anat):
    root, _ = anat
    a = ShardDataLoader(ShardDataset(root, seed=5), 4, num_workers=2)
    first, second = keys_of(a), keys_of(a)  # each pass is the next epoch
    b = ShardDataLoader(ShardDataset(root, seed=5), 4, num_workers=0)
    assert keys_of(b) == first and keys_of(b) == second
    assert first != second and sorted(first) == sorted(second)
    c = ShardDataset(root, seed=5)
    c.set_epoch(1)
    assert [i["key"] for i in c] == second
    unshuffled = [i["key"] for i in ShardDataset(root, shuffle=False)]
    assert first != unshuffled


@pytest.fixture(scope="module")
def two_ranks(anat, tmp_path_factory) -> tuple[dict, dict]:
    """2 real rank processes (gloo) x 2 DataLoader workers, batch 3, over two shard sets: the
    ~100-sample set in many small shards, and the same samples in one single shard."""
    tmp = tmp_path_factory.mktemp("ranks")
    one = tmp / "one"
    write_2d_set(one, shard_max_bytes=1 << 30)
    assert len(list((one / "tars").iterdir())) == 1
    roots = [str(anat[0]), str(one)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        out = tmp / f"rank{rank}.json"
        cmd = [sys.executable, str(HERE / "readers_rank_worker.py"), str(out), "3", "2", *roots]
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        assert p.wait(timeout=180) == 0  # a hang (unequal batch counts) fails here
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]
    return tuple({"ranks": [r[root] for r in ranks], "root": root} for root in roots)


def check_exactly_once(ranks: list[dict], keys: list[str]) -> None:
    seen = [k for r in ranks for b in r["batches"] for k in b]
    per = -(-len(keys) // 2)
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == ranks[0]["len"]
    assert set(seen) == set(keys)
    assert len(seen) == 2 * per  # every sample once, plus the padding that evens out the ranks
    assert len(seen) - len(set(seen)) == 2 * per - len(keys)


@pytest.mark.slow
def test_exactly_once_two_ranks_two_workers_real_processes(anat, two_ranks):
    root, keys = anat
    assert len(ShardSet(str(root)).manifest.header["files"]) > 8  # more shards than slots
    check_exactly_once(two_ranks[0]["ranks"], keys)


@pytest.mark.slow
def test_fewer_shards_than_slots_splits_by_sample(anat, two_ranks):
    check_exactly_once(two_ranks[1]["ranks"], anat[1])


def test_rows_of_upcoming_units_are_converted_together(anat, monkeypatch):
    """A shuffle buffer scatters a stretch of units over the shard order; their manifest rows
    come from one conversion, not from a block of neighbours each (which thrashed the block
    cache late in long epochs), and equal the rows the block path gives."""
    import medfm.shards.dataset as dataset_module

    monkeypatch.setattr(dataset_module, "ROW_BLOCK", 4)
    root, _ = anat
    ds = ShardDataset(root, seed=2, buffer_size=40)
    units = ds.rank_sequence(0)[-16:]
    rows = [int(ds._unit_row[u]) for u in units]
    assert len({r // 4 for r in rows}) > 3  # scattered over many blocks
    by_block = [ds.row(r) for r in rows]
    fresh = ShardDataset(root, seed=2, buffer_size=40)
    fresh.prepare(units, 0)
    assert [fresh.row(r) for r in rows] == by_block
    assert not fresh._rows._items, "prepared rows still converted whole blocks"
    assert [i["key"] for i in fresh._load_all(units, 0)] == [r["key"] for r in by_block]


def test_rank_split_equal_lengths_drop_last(anat):
    root, keys = anat
    for drop_last in (False, True):
        parts = [
            [i["key"] for i in ShardDataset(root, rank=r, world_size=3, drop_last=drop_last)]
            for r in range(3)
        ]
        assert len({len(p) for p in parts}) == 1
        flat = [k for p in parts for k in p]
        if drop_last:
            assert len(flat) == len(set(flat)) == 3 * (len(keys) // 3)
        else:
            assert set(flat) == set(keys)


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_mid_epoch(anat, workers):
    root, _ = anat

    def make():
        ds = ShardDataset(root, seed=7, buffer_size=10)
        return ShardDataLoader(ds, 5, num_workers=workers, persistent_workers=workers > 0)

    reference = make()
    keys_of(reference)  # epoch 0
    full = keys_of(reference)  # epoch 1: resume inside the second epoch
    run = make()
    keys_of(run)
    it, head = iter(run), []
    for _ in range(7):
        head += next(it)["key"]
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
    assert state["epoch"] == 1 and state["consumed"] == 35
    del it
    resumed = make()
    resumed.load_state_dict(state)
    tail = keys_of(resumed)
    assert head + tail == full
    assert sorted(keys_of(resumed)) == sorted(full)  # then epoch 2 runs in full


def test_elastic_resume_on_another_world_size(anat):
    root, keys = anat
    old = [ShardDataset(root, seed=2, rank=r, world_size=2) for r in range(2)]
    consumed = []
    for ds in old:
        it = iter(ds)
        consumed += [next(it)["key"] for _ in range(13)]
    state = old[0].state_dict()
    assert state["consumed"] == 13 and state["world_size"] == 2
    rest = []
    for r in range(3):
        ds = ShardDataset(root, seed=2, rank=r, world_size=3)
        ds.load_state_dict(state)
        rest += [i["key"] for i in ds]
    assert set(consumed) | set(rest) == set(keys)
    assert not set(consumed) & set(rest) and len(set(rest)) == len(keys) - len(consumed)


def test_empty_selection_and_foreign_patch_sampler_are_errors(anat, tmp_path):
    from medfm.shards import PatchSampler

    root, _ = anat
    with pytest.raises(ValueError, match="no samples match"):
        ShardDataset(root, modalities="US")
    with pytest.raises(ValueError, match="PatchSampler reads"):
        ShardDataset(root, patches=PatchSampler(str(tmp_path), 8))


def test_resume_rejects_other_dataset(anat):
    root, _ = anat
    state = ShardDataset(root, split="train").state_dict()
    with pytest.raises(ValueError, match="cannot resume"):
        ShardDataset(root).load_state_dict(state)


def test_remote_fsspec_url(anat):
    import fsspec

    root, _ = anat
    fs = fsspec.filesystem("memory")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        fs.pipe(f"/readers/{path.relative_to(root)}", path.read_bytes())
    remote = [i["key"] for i in ShardDataset("memory://readers", seed=4)]
    assert remote == [i["key"] for i in ShardDataset(root, seed=4)]


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_shard_fails_naming_it_or_skips_counted(tmp_path, caplog):
    root = tmp_path / "set"
    keys = write_2d_set(root)
    shard = sorted((root / "tars").iterdir())[3]
    _truncate(shard, 0.3)
    with pytest.raises(ShardFormatError, match=shard.name):
        list(ShardDataset(root, shuffle=False))
    with caplog.at_level(logging.WARNING, logger="medfm.shards"):
        items = list(ShardDataset(root, shuffle=False, on_error="skip", max_skips=5))
    skipped = [r for r in caplog.records if "skipped bad sample" in r.message]
    assert 1 <= len(skipped) <= 5 and all(shard.name in r.message for r in skipped)
    assert len(items) == len(keys)  # replaced, so every rank keeps its batch count
    assert sum(bool(i["meta"].get("substituted")) for i in items) == len(skipped)
    with pytest.raises(ShardError, match="max_skips=0"):
        list(ShardDataset(root, shuffle=False, on_error="skip", max_skips=0))


def test_corrupt_member_detected_by_hash(tmp_path):
    root = tmp_path / "set"
    write_2d_set(root)
    row = next(iter(ShardSet(str(root)).rows()))
    loc = json.loads(row["members"])[row["member"]]
    path = root / row["shard"]
    data = bytearray(path.read_bytes())
    data[loc["offset"] + loc["size"] - 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardFormatError, match="sha256 mismatch"):
        list(ShardDataset(root, shuffle=False))


def test_deleted_zarr_chunk_fails_naming_volume_or_skips(tmp_path, sample_data, caplog):
    root = tmp_path / "ct"
    write_ct_set(root, sample_data, copies=2)
    chunk = root / "volumes.zarr" / "ct1" / "image" / "c" / "0" / "0" / "0"
    assert chunk.exists()
    chunk.unlink()
    with pytest.raises(ShardFormatError, match="ct1.*missing"):
        list(ShardDataset(root, shuffle=False))
    with caplog.at_level(logging.WARNING, logger="medfm.shards"):
        items = list(ShardDataset(root, shuffle=False, on_error="skip"))
    assert [i["key"] for i in items] == ["ct0", "ct0"]
    assert any("ct1" in r.message for r in caplog.records)


def test_whole_volume_items(tmp_path, sample_data):
    root = tmp_path / "ct"
    write_ct_set(root, sample_data, copies=1)
    (item,) = list(ShardDataset(root))
    assert item["data"].shape == (1, 122, 101, 30) and item["label_map"].shape == (1, 122, 101, 30)
    assert item["meta"]["spacing"] == pytest.approx([3.0, 3.0, 3.0])


def test_item_transform_seeds_only_the_cpu_generator(monkeypatch):
    from medfm.shards import ItemTransform

    # torch.manual_seed would also queue a reseed of every CUDA device, recording a stack trace
    # each time: 3 ms per sample, most of the loading time of a 28 px image.
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    draw = ItemTransform(lambda _: torch.rand(3))
    before = torch.get_rng_state()
    got = draw({"data": None}, seed=7)["data"]
    assert torch.equal(got, torch.rand(3, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    assert not reseeded
