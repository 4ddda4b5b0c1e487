"""Every stage against a real S3 API: moto's standalone server on loopback (tests/s3_helpers.py),
reached over HTTP by s3fs in this process, in `medfm` subprocesses and in Ray workers. Nothing
here mocks a filesystem call. Also: a URL whose filesystem is not installed names the extra."""

from __future__ import annotations

import importlib.util
import subprocess

import fsspec
import pytest
from fsspec.registry import known_implementations

from medfm.io import MissingExtraError, get_fs

# ---------------------------------------------------------------- the `cloud` extra


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_url_without_its_filesystem_names_the_extra_and_exits_2(medfm_exe, tmp_path):
    with pytest.raises(
        MissingExtraError, match=r"gs:// URLs need gcsfs: pip install 'medfm\[cloud\]'"
    ):
        get_fs("gs://bucket/set")
    for args in (["shards", "verify"], ["shards", "stats"], ["shards", "ls"]):
        r = subprocess.run([medfm_exe, *args, "gs://bucket/set"], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip() == "medfm shards: gs:// URLs need gcsfs: pip install 'medfm[cloud]'"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"sources: [{{name: a, root: {tmp_path}, format: png}}]\n")
    r = subprocess.run(
        [medfm_exe, "ingest", str(spec), "--out", "gs://bucket/set"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "pip install 'medfm[cloud]'" in r.stderr and "bucket" not in r.stderr


def _a_protocol_not_installed() -> str:
    for protocol in sorted(known_implementations):
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError:
            return protocol
    pytest.skip("every fsspec filesystem is installed")


def test_other_protocols_name_what_fsspec_asks_for():
    protocol = _a_protocol_not_installed()  # fsspec's registry raises the real ImportError
    with pytest.raises(MissingExtraError) as e:
        get_fs(f"{protocol}://bucket/set")
    assert str(e.value).startswith(f"{protocol}:// URLs need a package medfm does not install (")
    assert "bucket" not in str(e.value)
