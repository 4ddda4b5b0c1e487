"""Ingest faults (security issue 18): one job per destination (a lease with a heartbeat, broken
only when stale), a full disk (a clear message, no temporaries, resume once there is space), and
a failed start that leaves no bookkeeping behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
from ingest_helpers import KEY
from PIL import Image

from medfm.ingest.bookkeeping import JOB_FILE, LEASE_FILE, Lease, LeaseError
from medfm.ingest.job import run_ingest
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
from medfm.io import find_temporaries, get_fs
from medfm.shards import verify

MEDFM = str(Path(sys.executable).parent / "medfm")


def env() -> dict[str, str]:
    """The environment now (ray.init adds what joining its cluster needs) plus the key."""
    return {**os.environ, "MEDFM_DEID_KEY": KEY.decode()}


@pytest.fixture(scope="module")
def ray_rt():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _pngs(folder: Path, n: int, side: int = 64) -> None:
    """Noise PNGs (incompressible): n * side^2 bytes of output, near enough."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(13)
    for i in range(n):
        img = rng.integers(0, 256, (side, side), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"img{i:03d}.png")


def _spec_file(tmp: Path, root: Path, **extra) -> Path:
    spec = {"sources": [{"name": "noise", "root": str(root), "format": "png"}], **extra}
    path = tmp / "spec.yaml"
    path.write_text(json.dumps(spec))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- 4: the lease

HOLDER = """
import json, sys
from pathlib import Path
from medfm.ingest.bookkeeping import Bookkeeper
from medfm.ingest.load import parse_spec
from medfm.ingest.privacy import Keyring
dest, spec = sys.argv[1], parse_spec(json.loads(Path(sys.argv[2]).read_text()))
book = Bookkeeper(dest)
lease = book.lease(heartbeat_s=0.2)
lease.acquire()
book.start(spec.fingerprint(), Keyring.load(), resume=False)
live = Path(dest, "tars", "t1-000000.tar.tmp-0123456789ab")  # the live job's work
live.parent.mkdir()
live.write_bytes(b"half a shard")
print("held", flush=True)
sys.stdin.read()
lease.release()
"""


def test_a_second_job_is_refused_while_the_first_holds_the_lease(tmp_path):
    _pngs(tmp_path / "in", 2)
    dest = tmp_path / "out"
    spec = _spec_file(tmp_path, tmp_path / "in")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(dest), str(spec)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env())  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in (["--resume"], []):
            cmd = [MEDFM, "ingest", str(spec), "--out", str(dest), *extra]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=120)
            assert res.returncode == 2, res.stderr[-2000:]
            assert "in use by a running ingest job" in res.stderr, res.stderr[-2000:]
            assert f"pid {holder.pid}" in res.stderr and "Traceback" not in res.stderr
        with pytest.raises(LeaseError, match=socket.gethostname()):
            run_ingest(parse_spec(json.loads(spec.read_text())), str(dest),
                       keyring=Keyring(KEY), resume=True, progress=False)  # fmt: skip
        live_tmp = dest / "tars" / "t1-000000.tar.tmp-0123456789ab"
        assert live_tmp.read_bytes() == b"half a shard"  # nothing of the live job was touched
        assert (dest / JOB_FILE).exists()
        held = json.loads((dest / LEASE_FILE).read_text())
        assert held["pid"] == holder.pid and held["host"] == socket.gethostname()
        deadline = time.monotonic() + 30
        while json.loads((dest / LEASE_FILE).read_text())["heartbeat"] == held["heartbeat"]:
            assert time.monotonic() < deadline, "the holder's heartbeat never moved"
            time.sleep(0.05)
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0 and not (dest / LEASE_FILE).exists()  # released on exit


@pytest.mark.parametrize("store", ["local", "memory"])
def test_a_stale_lease_is_broken_and_a_live_one_is_not(store, tmp_path):
    where = str(tmp_path / "out") if store == "local" else f"memory://lease-{os.getpid()}/out"
    fs, root = get_fs(where)
    path = f"{root}/{LEASE_FILE}"
    fs.makedirs(f"{root}/_ingest", exist_ok=True)
    host, now = socket.gethostname(), time.time()
    holders = {
        "dead pid here": ({"host": host, "pid": _dead_pid(), "heartbeat": now}, True),
        "old heartbeat elsewhere": ({"host": "node-7", "pid": 1, "heartbeat": now - 3600}, True),
        "unreadable": (None, True),
        "live pid here": ({"host": host, "pid": os.getpid(), "heartbeat": now}, False),
        "fresh heartbeat elsewhere": ({"host": "node-7", "pid": 1, "heartbeat": now}, False),
    }
    for name, (holder, stale) in holders.items():
        with fs.open(path, "wb") as f:
            f.write(b"{half" if holder is None else json.dumps({**holder, "token": "x"}).encode())
        if holder is None and store == "local":  # judged by age: make it old
            os.utime(path, (now - 3600, now - 3600))
        lease = Lease(fs, path, stale_s=60)
        if name == "unreadable" and store == "memory":
            continue  # the memory store keeps no usable modification time for this
        if stale:
            lease.acquire()
            assert json.loads(fs.cat_file(path))["token"] == lease.token, name
            second = Lease(fs, path, stale_s=60)
            with pytest.raises(LeaseError):  # and now it is live: ours
                second.acquire()
            lease.release()
            assert not fs.exists(path), name
        else:
            with pytest.raises(LeaseError, match="in use by a running ingest job"):
                lease.acquire()
            assert json.loads(fs.cat_file(path))["token"] == "x", name  # left alone
    if store == "memory":
        fsspec.filesystem("memory").rm(f"/lease-{os.getpid()}", recursive=True)


def test_a_holder_whose_lease_was_taken_over_stops_and_says_so(tmp_path):
    fs, root = get_fs(str(tmp_path))
    lease = Lease(fs, f"{root}/{LEASE_FILE}", heartbeat_s=0.02)
    lease.acquire()
    other = {"host": "node-7", "pid": 1, "token": "other", "heartbeat": time.time()}
    (tmp_path / LEASE_FILE).write_text(json.dumps(other))
    deadline = time.monotonic() + 30
    while not lease.lost:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(LeaseError, match="lost its lease"):
        lease.check()
    lease.release()
    assert json.loads((tmp_path / LEASE_FILE).read_text())["token"] == "other"  # not ours to drop


# ---------------------------------------------------------------- 15: a failed start


def test_a_failed_start_leaves_no_job_behind(ray_rt, tmp_path):
    root, dest = tmp_path / "in", tmp_path / "out"
    spec = parse_spec({"sources": [{"name": "noise", "root": str(root), "format": "png"}]})
    with pytest.raises(Exception, match="root folder does not exist"):  # discovery fails
        run_ingest(spec, str(dest), keyring=Keyring(KEY), progress=False)
    assert not dest.exists()  # the job made it, and takes it away again
    _pngs(root, 3)
    summary = run_ingest(spec, str(dest), keyring=Keyring(KEY), progress=False)  # no --resume
    assert summary.written == 3 and verify(str(dest)).ok


# ---------------------------------------------------------------- 13: a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only: CI runs as root; elsewhere skipped)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_says_where_and_how_much_then_resumes(ray_rt, tmp_path, small_disk):
    _pngs(tmp_path / "in", 40, side=192)  # ~1.5 MB of shards for a 1 MiB disk
    dest = small_disk / "out"
    spec = _spec_file(tmp_path, tmp_path / "in", shards={"task_items": 4})
    address = ray_rt.get_runtime_context().gcs_address
    cmd = [MEDFM, "ingest", str(spec), "--out", str(dest), "--address", address, "--workers",
           "2", "--quiet"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"no space left on the destination {dest}" in res.stderr, res.stderr[-3000:]
    assert "bytes) more" in res.stderr and "--resume" in res.stderr
    assert "Traceback" not in res.stderr
    fs, root = get_fs(str(dest))
    assert find_temporaries(fs, root) == []
    assert not [p for p in dest.rglob("*") if ".tmp-" in p.name]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.splitlines()[-1])
    assert summary["written"] == 40 and summary["quarantined"] == 0
    assert verify(str(dest)).ok
    assert not (dest / LEASE_FILE).exists()
