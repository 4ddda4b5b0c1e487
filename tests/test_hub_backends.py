"""Every registered hub backend through the HubBackend protocol, and backends picked by scheme.

The sweep pushes a real encoder export (safetensors + sidecar) and a nested file, lists, resolves,
pulls, re-checks every hash, loads the pulled encoder, and refuses a tampered stored file. The
Hugging Face backend runs offline from a cache laid out as huggingface_hub writes it (its push
needs the network and is only checked to refuse offline).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import torch
from hub_helpers import COMMIT, hf_cache, make_folder, tree_bytes
from typer.testing import CliRunner

from medfm import io
from medfm.cli import app
from medfm.finetune import hub
from medfm.finetune.hub import HUB_BACKENDS, FsspecHub, HfHub, HubBackend, LocalHub, hf, open_hub
from medfm.io import get_fs, sha256_file
from medfm.models import build_encoder
from medfm.models.export import export_encoder, load_encoder

torch.set_num_threads(1)
REPO = "lab/enc"
ENCODER = {"name": "vit2d", "img_size": 32, "patch_size": 8, "in_chans": 1, "size": "tiny",
           "embed_dim": 32, "depth": 1, "num_heads": 2}  # fmt: skip


@pytest.fixture
def export_dir(tmp_path) -> Path:
    """A real encoder export, plus a nested file (folders must survive the round trip)."""
    torch.manual_seed(0)
    folder = tmp_path / "export"
    export_encoder(build_encoder(ENCODER), folder, preprocessing={"mode": "unit"}, data={},
                   training={"steps": 1})  # fmt: skip
    (folder / "card").mkdir()
    (folder / "card" / "README.md").write_text("# tiny encoder\n")
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- one case per way of running a backend -------------------------------------------------
@dataclass
class Case:
    backend: str  # its name in HUB_BACKENDS
    open: Callable[[pytest.FixtureRequest], HubBackend]
    publish: Callable[[HubBackend, Path], str]  # `folder` as REPO@v1; returns the revision id
    tamper: Callable[[HubBackend, str], None]  # flip a byte of the stored file with this sha256


def memory_root(request: pytest.FixtureRequest) -> str:
    root = f"memory://hub-sweep-{uuid.uuid4().hex[:8]}"
    request.addfinalizer(lambda: fsspec.filesystem("memory").rm(root, recursive=True))
    return root


def push_v1(backend: HubBackend, folder: Path) -> str:
    return backend.push(folder, REPO, "v1")


def flip_blob(backend: LocalHub, digest: str) -> None:
    data = bytearray(backend.fs.cat_file(backend.blob_path(digest)))
    data[len(data) // 2] ^= 0x01
    backend.fs.pipe_file(backend.blob_path(digest), bytes(data))


def offline_hf(request: pytest.FixtureRequest) -> HubBackend:
    tmp_path, monkeypatch = (request.getfixturevalue(f) for f in ("tmp_path", "monkeypatch"))
    (tmp_path / "hf-cache").mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return HUB_BACKENDS.get("hf")(None)


def hf_publish(backend: HubBackend, folder: Path) -> str:
    """Offline there is no push: lay the revision out in the cache as a download would."""
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE"):
        backend.push(folder, REPO, "v1")
    files = tree_bytes(folder)
    lfs = {name for name in files if name.endswith(".safetensors")}
    hf_cache(Path(hf.cache_dir()), REPO, files, lfs=lfs, ref="v1")
    return COMMIT


def hf_tamper(backend: HubBackend, digest: str) -> None:
    blob = Path(hf.cache_dir()) / f"models--{REPO.replace('/', '--')}" / "blobs" / digest
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))


CASES = {
    "local": Case(
        "local",
        lambda r: HUB_BACKENDS.get("local")(str(r.getfixturevalue("tmp_path") / "hub")),
        push_v1,
        flip_blob,
    ),
    "fsspec-memory": Case(
        "fsspec", lambda r: HUB_BACKENDS.get("fsspec")(memory_root(r)), push_v1, flip_blob
    ),
    "fsspec-file": Case(
        "fsspec",
        lambda r: HUB_BACKENDS.get("fsspec")(f"file://{r.getfixturevalue('tmp_path')}/hub"),
        push_v1,
        flip_blob,
    ),
    "hf": Case("hf", offline_hf, hf_publish, hf_tamper),
}
EMBEDDED = [name for name, case in CASES.items() if case.backend != "hf"]


def test_every_registered_backend_is_swept():
    assert {case.backend for case in CASES.values()} == set(HUB_BACKENDS.names())


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_backend_protocol_round_trip(case_name, request, tmp_path, monkeypatch, export_dir):
    monkeypatch.setenv("MEDFM_HUB_CACHE", str(tmp_path / "pull-cache"))
    case = CASES[case_name]
    backend = case.open(request)
    assert isinstance(backend, HubBackend)
    rev = case.publish(backend, export_dir)

    listing = backend.ls()  # keys are references: they parse back to the repo
    assert [hub.parse_ref(key).repo for key, refs in listing.items() if refs == {"v1": rev}] == [
        REPO
    ]
    assert backend.resolve(REPO, "v1") == rev
    assert backend.resolve(REPO, rev) == rev  # an immutable id names itself
    with pytest.raises(hub.RevisionNotFoundError):
        backend.resolve(REPO, "v2")

    report = backend.pull(REPO, "v1", tmp_path / "out")
    out = tmp_path / "out"
    assert report.revision == rev and tree_bytes(out) == tree_bytes(export_dir)
    assert sorted(report.files) == sorted(tree_bytes(export_dir))
    for rel, info in report.files.items():
        assert sha256_file(*get_fs(str(out / rel)))[0] == info["sha256"] == sha256(export_dir / rel)
    assert hub.verify_folder(out)["revision"] == rev
    pulled, _ = load_encoder(out / "encoder.json")
    original, _ = load_encoder(export_dir / "encoder.json")
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(pulled(x), original(x))
    cached = backend.pull(REPO, "v1").path  # default destination: the per-revision pull cache
    assert cached.name == rev and cached.is_relative_to(tmp_path / "pull-cache")

    weights = out / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(hub.IntegrityError, match="encoder.safetensors"):
        hub.verify_folder(out)

    case.tamper(backend, sha256(export_dir / "encoder.safetensors"))
    with pytest.raises(hub.IntegrityError, match="encoder.safetensors"):
        backend.pull(REPO, "v1", tmp_path / "tampered")
    assert not (tmp_path / "tampered" / "encoder.safetensors").exists()


@pytest.mark.parametrize("case_name", EMBEDDED)
@pytest.mark.parametrize("fail_at", ["second blob", "ref"])
def test_a_push_that_dies_leaves_the_old_revision(case_name, fail_at, request, tmp_path,
                                                  monkeypatch):  # fmt: skip
    backend = CASES[case_name].open(request)
    old = backend.push(make_folder(tmp_path / "a", 1.0), REPO)
    calls: list[str] = []
    cls = type(backend)
    publish_file, publish_bytes = cls.publish_file, cls.publish_bytes

    def dying_file(self, local_file, path):
        calls.append(path)
        if fail_at == "second blob" and len(calls) == 2:
            raise OSError("connection lost")
        publish_file(self, local_file, path)

    def dying_bytes(self, path, data):
        if fail_at == "ref" and "/refs/" in path:
            raise OSError("connection lost")
        publish_bytes(self, path, data)

    monkeypatch.setattr(cls, "publish_file", dying_file)
    monkeypatch.setattr(cls, "publish_bytes", dying_bytes)
    with pytest.raises(OSError, match="connection lost"):
        backend.push(make_folder(tmp_path / "b", 2.0), REPO)
    monkeypatch.undo()
    assert backend.ls() == {REPO: {"main": old}}
    assert backend.resolve(REPO, None) == old
    backend.pull(REPO, None, tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(tmp_path / "a")


def test_fsspec_hub_reads_and_writes_local_hub_folders(tmp_path):
    """The layout is the local hub's: a folder the local hub wrote is an fsspec hub, and back."""
    src = make_folder(tmp_path / "src")
    rev = LocalHub(str(tmp_path / "hub")).push(src, REPO, "v1")
    as_fsspec = FsspecHub(f"file://{tmp_path}/hub")
    assert as_fsspec.ls() == {REPO: {"v1": rev}}
    assert as_fsspec.push(make_folder(tmp_path / "b", 2.0), REPO, "v2") != rev
    as_fsspec.pull(REPO, "v1", tmp_path / "out")
    assert tree_bytes(tmp_path / "out") == tree_bytes(src)
    assert LocalHub(str(tmp_path / "hub")).resolve(REPO, "v2") == as_fsspec.resolve(REPO, "v2")


@pytest.mark.parametrize(("cls", "renames"), [(LocalHub, 6), (FsspecHub, 0)])
def test_only_the_local_hub_renames_into_place(tmp_path, monkeypatch, cls, renames):
    """Object stores have no rename (fsspec's mv is copy + delete): the fsspec hub uploads each
    file once, to its final name; the local hub writes 3 blobs, record, ref and index by rename."""
    renamed: list[str] = []
    commit = io.commit
    monkeypatch.setattr(io, "commit", lambda fs, tmp, final: renamed.append(final) or commit(
        fs, tmp, final))  # fmt: skip
    cls(str(tmp_path / "hub")).push(make_folder(tmp_path / "src"), REPO)
    assert len(renamed) == renames


@pytest.mark.parametrize(
    ("url", "cls"),
    [
        ("{tmp}/hub", LocalHub),
        ("file://{tmp}/hub", LocalHub),
        ("memory://hub-pick", FsspecHub),
        ("hf://", HfHub),
    ],  # fmt: skip
)
def test_the_url_scheme_picks_the_backend(tmp_path, url, cls):
    assert type(open_hub(url.format(tmp=tmp_path))) is cls


def test_unknown_schemes_are_refused_with_the_registered_names(tmp_path):
    for call in (lambda: hub.parse_ref("nohub://a/b"), lambda: open_hub("nohub://x")):
        with pytest.raises(hub.HubError, match=r"unknown hub backend 'nohub'.*'local'"):
            call()
    res = CliRunner().invoke(app, ["hub", "ls", "--hub", "nohub://x"])
    assert res.exit_code == 1 and "unknown hub backend" in res.output
    assert not hub.is_hub_uri("memory://x") and hub.resolve("memory://x") == Path("memory://x")


# -- a backend added the way a plug-in adds one: one class, one registration ----------------
class MirrorHub(LocalHub):
    """`mirror://NAME` is a local hub in folder NAME under `base` (set by the fixture)."""

    base: Path

    def __init__(self, root: str | None = None):
        super().__init__(str(self.base / (root or "mirror://default").removeprefix("mirror://")))


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HUB_CACHE", str(tmp_path / "pull-cache"))
    monkeypatch.setattr(MirrorHub, "base", tmp_path / "mirror", raising=False)
    HUB_BACKENDS.register("mirror")(MirrorHub)
    yield tmp_path / "mirror"
    HUB_BACKENDS.unregister("mirror")  # the next test sees the built-in backends only


def test_a_registered_backend_is_picked_by_its_scheme(tmp_path, mirror):
    src = make_folder(tmp_path / "src")
    rev = hub.push(src, "lab/enc@v1", hub="mirror://a")  # the hub location's scheme
    assert (mirror / "a" / "repos" / "lab" / "enc" / "refs" / "v1").read_text() == rev
    assert hub.ls("mirror://a", include_hf_cache=False) == {"lab/enc": {"v1": rev}}
    assert hub.push(src, "mirror://lab/enc@v2") == rev  # the reference's scheme
    assert (mirror / "default" / "repos" / "lab" / "enc" / "refs" / "v2").read_text() == rev
    assert hub.is_hub_uri("mirror://lab/enc")
    assert tree_bytes(hub.resolve("hub://mirror://lab/enc@v2")) == tree_bytes(src)
    res = CliRunner().invoke(app, ["hub", "ls", "--hub", "mirror://a"])
    assert res.exit_code == 0 and f"lab/enc@v1\t{rev}" in res.output
