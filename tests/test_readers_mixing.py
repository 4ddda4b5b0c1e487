"""MixedDataset on real shard sets: proportions, exhaustion, real/synthetic mixing, resume."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from readers_helpers import write_2d_set

from medfm.shards import MixedDataset, ShardDataLoader, ShardDataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("mix")
    real = write_2d_set(base / "real", dataset="anat")
    synth = write_2d_set(base / "synth", dataset="anat_synth", synthetic=True, prefix="syn-")
    return base, real, synth


def test_resample_proportions_within_binomial_tolerance(sets):
    base, _, _ = sets
    a = ShardDataset(base / "real", modalities="MR", name="mr")
    b = ShardDataset(base / "synth", name="synth")
    c = ShardDataset(base / "real", split="val", name="val")
    weights = {a: 0.6, b: 0.3, c: 0.1}
    n = 1500
    mixed = MixedDataset(weights, seed=11, mode="resample", samples_per_epoch=n)
    items = list(mixed)
    assert len(items) == n == len(mixed)
    counts = Counter(i["source"] for i in items)
    for ds, w in weights.items():
        sigma = np.sqrt(n * w * (1 - w))
        assert abs(counts[ds.name] - n * w) < 4 * sigma, (ds.name, counts)
    # every item really comes from the source it names
    assert all(i["meta"]["synthetic"] for i in items if i["source"] == "synth")
    assert all(i["meta"]["split"] == "val" for i in items if i["source"] == "val")
    # small sources are repeated (resampled), not exhausted
    assert max(Counter(i["key"] for i in items if i["source"] == "val").values()) > 1


def test_exhaust_uses_every_sample_once(sets):
    base, real, synth = sets
    r = ShardDataset(base / "real", name="real")
    s = ShardDataset(base / "synth", synthetic=True, name="synth")
    mixed = MixedDataset({r: 3.0, s: 1.0}, seed=1, mode="exhaust")
    keys = [i["key"] for i in mixed]
    assert sorted(keys) == sorted(real + synth)
    # while both last, draws follow the weights: the first half is mostly real
    head = keys[: len(keys) // 3]
    assert sum(not k.startswith("syn-") for k in head) > 0.6 * len(head)


def test_mixed_resume_through_workers(sets):
    base, _, _ = sets

    def make():
        r = ShardDataset(base / "real", seed=2, name="real")
        s = ShardDataset(base / "synth", seed=2, name="synth")
        mixed = MixedDataset({r: 0.7, s: 0.3}, seed=5, samples_per_epoch=120)
        return ShardDataLoader(mixed, 6, num_workers=2)

    full = [(k, s) for b in make() for k, s in zip(b["key"], b["source"], strict=True)]
    run = make()
    it, head = iter(run), []
    for _ in range(9):
        b = next(it)
        head += list(zip(b["key"], b["source"], strict=True))
    state = json.loads(json.dumps(run.state_dict()))
    del it
    resumed = make()
    resumed.load_state_dict(state)
    tail = [(k, s) for b in resumed for k, s in zip(b["key"], b["source"], strict=True)]
    assert head + tail == full and len(full) == 120


def test_rejects_sources_without_positions(sets):
    with pytest.raises(TypeError, match="cannot be mixed"):
        MixedDataset({"not a dataset": 1.0})
    base, _, _ = sets
    with pytest.raises(ValueError, match="positive"):
        MixedDataset({ShardDataset(base / "real"): 0.0})
