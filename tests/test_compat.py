"""medfm.compat: each private-API call site and its public fallback give the same result, and
the fallback really runs when the private name is gone."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

import medfm.clusters
from medfm import compat
from medfm.shards.chunkio import ShardedArrayReader, ShardedLayout, encode_shards


@pytest.fixture
def no_module(monkeypatch):
    """Make `import name` fail, as when a release removes a private module."""

    def hide(name: str) -> None:
        monkeypatch.setitem(sys.modules, name, None)

    return hide


# -- torch -------------------------------------------------------------------------------------
def test_shared_storage_fallback_is_shared_and_sized_alike(monkeypatch):
    private = compat.shared_storage(4096)
    public = compat.shared_storage_public(4096)
    for s in (private, public):
        assert s.is_shared() and s.nbytes() == 4096
    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", None)  # gone in a future torch
    fallback = compat.shared_storage(100)  # the guarded call takes the public path
    assert fallback.is_shared() and fallback.nbytes() == 100
    t = torch.empty(0, dtype=torch.uint8).set_(fallback)
    t[:] = 7
    assert t.sum().item() == 700


# -- zarr --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1,), (4,), (2, 2, 2), (3, 5), (4, 4, 4), (1, 3, 2), (8, 2, 3)])
def test_morton_order_fallback_matches_zarr(shape):
    assert compat.morton_order_public(shape) == compat.morton_order(shape)
    assert sorted(compat.morton_order_public(shape)) == sorted(np.ndindex(*shape))


def sharded(tmp_path: Path) -> tuple[zarr.Array, np.ndarray]:
    """A real zarr sharded array (written by zarr itself) with ragged edge chunks."""
    data = np.random.default_rng(0).integers(0, 900, (37, 50, 21)).astype("<i2")
    arr = zarr.create_array(
        str(tmp_path / "v.zarr"), shape=data.shape, chunks=(8, 8, 8), shards=(24, 16, 16),
        dtype=data.dtype, fill_value=0,
    )  # fmt: skip
    arr[...] = data
    return arr, data


def test_chunkio_with_the_public_fallbacks_writes_and_reads_what_zarr_does(
    tmp_path, no_module, monkeypatch
):
    arr, data = sharded(tmp_path)
    layout = ShardedLayout.of(arr)
    assert layout is not None
    private = dict(encode_shards(layout, data))
    region = (slice(3, 30), slice(10, 50), slice(0, 21))
    read_private = ShardedArrayReader(layout).read(region)

    no_module("zarr.core.indexing")
    no_module("zarr.core.sync")
    calls = []
    monkeypatch.setattr(compat, "run_sync_public", lambda c: calls.append(1) or asyncio.run(c))
    public = dict(encode_shards(layout, data))
    read_public = ShardedArrayReader(layout).read(region)
    assert calls  # the reader went through the fallback
    assert public == private  # byte for byte the shard files zarr wrote
    store = arr.store_path.store
    for key, blob in public.items():
        assert blob == Path(store.root, key).read_bytes()
    np.testing.assert_array_equal(read_public, data[region])
    np.testing.assert_array_equal(read_private, read_public)


# -- Ray ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_job_states_fallback_agrees_with_the_private_table():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=True, log_to_driver=False)
    try:
        me = ray.get_runtime_context().get_job_id()
        private = compat.ray_jobs_dead()
        public = compat.ray_jobs_dead_public()
    finally:
        ray.shutdown()
    assert private is not None and private[me] is False
    assert public is not None and public[me] is False
    assert {k: v for k, v in public.items() if k in private} == {
        k: private[k] for k in public if k in private
    }


def test_ray_job_states_take_the_public_path_when_the_private_module_is_gone(
    no_module, monkeypatch
):
    no_module("ray._private")
    monkeypatch.setattr(compat, "ray_jobs_dead_public", lambda: {"01000000": True})
    assert compat.ray_jobs_dead() == {"01000000": True}


@pytest.mark.parametrize("relative", ["ray/aws.yaml", "ray/gcp.yaml"])
def test_cluster_config_fallback_accepts_ours_and_refuses_a_bad_head(relative):
    config = yaml.safe_load((Path(medfm.clusters.__file__).parent / relative).read_text())
    compat.validate_cluster_config(config)
    compat.validate_cluster_config_public(config)
    bad = {**config, "head_node_type": "nope"}
    for check in (compat.validate_cluster_config, compat.validate_cluster_config_public):
        with pytest.raises(Exception, match="nope|head"):
            check(bad)


# -- declared dependencies ---------------------------------------------------------------------
def test_every_imported_third_party_module_is_a_declared_dependency():
    import ast
    import re
    from importlib.metadata import packages_distributions

    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    repo = Path(__file__).resolve().parent.parent
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [
        d for v in project["optional-dependencies"].values() for d in v
    ]

    def norm(s: str) -> str:
        return re.sub(r"[-_.]+", "-", re.split(r"[<>=\[; ]", s)[0]).lower()

    declared, dists = {norm(r) for r in reqs}, packages_distributions()
    missing = set()
    for folder in ("medfm", "ingest", "shards", "pretrain", "synth", "finetune", "clusters"):
        for path in (repo / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names} - set(sys.stdlib_module_names):
                    if top != "medfm" and not {norm(d) for d in dists.get(top, [])} & declared:
                        missing.add(f"{top} ({path.relative_to(repo)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
