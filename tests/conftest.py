"""Shared fixtures: where the real sample data lives; no test leaves a DDP rendezvous behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The real data folder from MEDFM_SAMPLE_DATA; tests that need it skip without it."""
    root = os.environ.get("MEDFM_SAMPLE_DATA")
    if not root or not Path(root).is_dir():
        pytest.skip("MEDFM_SAMPLE_DATA is unset or missing (see ../shared/data/README.md)")
    return Path(root)


@pytest.fixture(scope="session")
def nibabel_data() -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data"


@pytest.fixture(scope="session")
def medfm_exe() -> str:
    """The installed `medfm` console script of the interpreter running the tests."""
    import sys

    exe = Path(sys.executable).parent / "medfm"
    assert exe.exists(), f"console script not installed next to {sys.executable}"
    return str(exe)


@pytest.fixture
def one_torch_thread():
    """Oversubscribed OpenMP threads crawl on a shared 2-core box: training tests use one."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray runtime for one test module (2 CPUs: the CI box's), shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_rendezvous_left_behind():
    """A LOCAL_RANK left in os.environ makes every later Lightning run of this test process (and
    of the processes it starts) take itself for an externally started rank and wait for ranks
    nobody starts; a process group left initialized makes a later run believe its ranks exist.
    The test that leaves either fails here, and the next starts clean."""
    import torch.distributed as dist

    from medfm.pretrain.train import RENDEZVOUS_ENV

    before = {k: os.environ.get(k) for k in RENDEZVOUS_ENV}
    yield
    left = {k: v for k in RENDEZVOUS_ENV if (v := os.environ.get(k)) != before[k]}
    for key in left:
        if before[key] is None:
            os.environ.pop(key)
        else:
            os.environ[key] = before[key]
    group = dist.is_available() and dist.is_initialized()
    if group:
        dist.destroy_process_group()
    if left or group:
        pytest.fail(f"the test left {left} in os.environ, a process group: {group}")
