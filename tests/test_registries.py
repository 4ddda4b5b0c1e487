"""Sweeps of every registered reader, encoder and objective, and plug-ins found through entry
points (a real distribution on sys.path, discovered by importlib.metadata)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medfm.config import ConfigError
from medfm.ingest.registry import READERS, Reader
from medfm.ingest.spec import SpecError
from medfm.models import ENCODERS, Encoder
from medfm.pretrain.objectives import OBJECTIVES, Context, Objective

torch.set_num_threads(1)

# Readers that cannot run without options: the error must name the missing key.
REQUIRED_OPTIONS = {"event_tables": "options.tables"}
# Shrinks an encoder's default size for the objective sweep (the input shape stays the default).
TINY = {"size": "tiny", "embed_dim": 64, "depth": 2, "num_heads": 4}
# The same for configs with other size fields (MONAI's names).
TINY_FOR = {
    "monai_swin3d": {"feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 2, 4)},
    "monai_vit3d": {"hidden_size": 64, "mlp_dim": 128, "num_layers": 2, "num_heads": 4},
}


# ---------------------------------------------------------------- readers


def test_every_reader_builds_with_default_options_and_claims_distinct_endings():
    claimed: dict[str, str] = {}
    for entry in READERS.entries():
        cls = entry.factory
        assert issubclass(cls, Reader) and cls.name == entry.name
        if entry.name in REQUIRED_OPTIONS:
            with pytest.raises(SpecError, match=REQUIRED_OPTIONS[entry.name]):
                cls()
        else:
            assert isinstance(cls(), Reader)
        assert isinstance(cls.sniff(b"\0" * 132), bool)
        for ending in (*cls.extensions, *cls.companions):
            assert ending.startswith(".") and ending == ending.lower(), (entry.name, ending)
            assert ending not in claimed, f"{ending} claimed by {claimed[ending]} and {entry.name}"
            claimed[ending] = entry.name


# ---------------------------------------------------------------- encoders


def _tiny_input(enc: Encoder) -> torch.Tensor:
    """One sample of the encoder's modality, at the shape its config expects."""
    if enc.kind == "volume3d":  # a Swin's tokens have no pixels of their own to unpatchify
        return torch.rand(1, enc.config.in_chans, *enc.config.img_size)
    if enc.num_tokens:  # fixed token grid: a random patch per token, folded back to the input
        return enc.unpatchify(torch.rand(1, enc.num_tokens, enc.patch_dim))
    if enc.kind == "ehr":
        return torch.randint(1, enc.config.vocab_size - 1, (1, 16))
    raise AssertionError(f"no tiny input for {enc.kind} encoders ({enc.name}): add one here")


@torch.no_grad()
def test_every_encoder_builds_from_its_default_config_and_runs_forward():
    assert ENCODERS.names()
    for entry in ENCODERS.entries():
        enc = ENCODERS.build(entry.name, {})
        assert isinstance(enc, Encoder) and enc.name == entry.name
        assert enc.describe()["params"] == dataclasses.asdict(entry.config_cls())
        x = _tiny_input(enc)
        enc.check_input(x, enc.kind)
        out = enc(x)
        assert out.shape == (1, 1 + (enc.num_tokens or x.shape[1]), enc.embed_dim), entry.name
        assert torch.isfinite(out).all(), entry.name


# ---------------------------------------------------------------- objectives


def _tiny_encoders() -> list[Encoder]:
    out = []
    for entry in ENCODERS.entries():
        names = {f.name for f in dataclasses.fields(entry.config_cls)}
        tiny = TINY_FOR.get(entry.name) or {k: v for k, v in TINY.items() if k in names}
        out.append(ENCODERS.build(entry.name, tiny))
    return out


# Objectives that cannot build without a parameter (a path to another export): the error must
# name it; tests/test_latent_diffusion.py builds them with a real export.
REQUIRED_PARAMS = {"latent_diffusion": "autoencoder"}


def test_every_objective_default_config_builds_with_each_encoder_kind_it_claims():
    encoders = _tiny_encoders()
    for name in OBJECTIVES.names():
        OBJECTIVES.config(name, {})  # the defaults validate
        if name in REQUIRED_PARAMS:
            with pytest.raises(ConfigError, match=REQUIRED_PARAMS[name]):
                OBJECTIVES.build(name, {}, Context(None))
            continue
        built: dict[str, Objective | Exception] = {}
        for enc in encoders:
            pair = ENCODERS.build(enc.name, dataclasses.asdict(enc.config))
            try:
                built[enc.kind] = OBJECTIVES.build(name, {}, Context(enc, pair))
            except Exception as e:  # noqa: BLE001 - fine for kinds it does not claim (below)
                built[enc.kind] = e
        objectives = [o for o in built.values() if isinstance(o, Objective)]
        assert objectives, f"objective {name!r} builds with no registered encoder: {built}"
        claimed = set(objectives[0].kinds)
        for kind, obj in built.items():
            if kind in claimed:
                if isinstance(obj, Exception):
                    raise obj
                assert obj.name == name
                obj.check(kind)


# ---------------------------------------------------------------- plug-ins

PLUGIN = {
    "medfm_demo_plugin/__init__.py": "",
    "medfm_demo_plugin/encoders.py": """
        from medfm.models import ENCODERS
        from medfm.models.vit2d import ViT2D, ViT2DConfig

        class DemoViT(ViT2D):
            def __init__(self, cfg):
                super().__init__(cfg)
                self.name = "demo_vit"  # what export sidecars record, to rebuild it by name

        @ENCODERS.register("demo_vit", ViT2DConfig)
        def demo_vit(cfg):
            return DemoViT(cfg)
    """,
    "medfm_demo_plugin/readers.py": """
        from medfm.ingest.registry import Reader, register_reader

        @register_reader("demo_txt", extensions=(".demotxt",), companions=(".demoidx",))
        class TextReader(Reader):
            def read(self, item, ctx):
                return iter(())
    """,
    "medfm_demo_plugin-0.1.dist-info/METADATA": """
        Metadata-Version: 2.1
        Name: medfm-demo-plugin
        Version: 0.1
    """,
    "medfm_demo_plugin-0.1.dist-info/entry_points.txt": """
        [medfm.encoders]
        demo_vit = medfm_demo_plugin.encoders

        [medfm.readers]
        demo_txt = medfm_demo_plugin.readers
        nifti = medfm_demo_plugin.not_imported
    """,
    "medfm_broken_plugin.py": "raise ImportError('the plug-in needs a missing library')",
    "medfm_broken_plugin-0.1.dist-info/METADATA": """
        Metadata-Version: 2.1
        Name: medfm-broken-plugin
        Version: 0.1
    """,
    "medfm_broken_plugin-0.1.dist-info/entry_points.txt": """
        [medfm.encoders]
        broken_vit = medfm_broken_plugin
    """,
}

PROBE = """
import json, warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from medfm.ingest.registry import READERS, create_reader, is_companion, reader_for
    from medfm.models import ENCODERS
    encoders, readers = ENCODERS.names(), READERS.names()
enc = ENCODERS.build("demo_vit", {"img_size": 32, "patch_size": 8, "size": "tiny", "depth": 1})
reader = create_reader("demo_txt", lines=3)
print(json.dumps({
    "encoders": encoders,
    "readers": readers,
    "out": list(enc(torch.rand(2, 1, 32, 32)).shape),
    "reader": [type(reader).__name__, reader.name, reader.options],
    "name": enc.describe()["name"],
    "auto": [reader_for("a/b.DEMOTXT"), is_companion("a/b.demoidx"), reader_for("x.nii")],
    "nifti": READERS.get("nifti").__module__,
    "warnings": [str(w.message) for w in caught],
}))
"""


def _write_plugin(root: Path) -> None:
    for rel, text in PLUGIN.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


def test_entry_point_plugins_are_listed_and_built_by_name_and_a_broken_one_only_warns(tmp_path):
    _write_plugin(tmp_path)
    run = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    assert "demo_vit" in got["encoders"] and "vit2d" in got["encoders"]
    assert "broken_vit" not in got["encoders"]
    assert "demo_txt" in got["readers"] and "dicom" in got["readers"]
    assert got["out"] == [2, 1 + 16, 192] and got["name"] == "demo_vit"
    assert got["reader"] == ["TextReader", "demo_txt", {"lines": 3}]
    assert got["auto"] == ["demo_txt", True, "nifti"]
    assert got["nifti"] == "medfm.ingest.readers.itk"  # a built-in name wins over a plug-in's
    broken = [w for w in got["warnings"] if "medfm_broken_plugin" in w]
    assert len(broken) == 1 and "needs a missing library" in broken[0]
    assert not [w for w in got["warnings"] if "not_imported" in w]
