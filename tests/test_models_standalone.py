"""Models, their contracts and their exports work without the Lightning engine: in a fresh
interpreter, the model modules and the stages that load exports (synth, finetune) import, an
encoder and a diffusion model export and load back, and Lightning is never imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    import medfm.finetune.export
    import medfm.models
    import medfm.models.contract
    import medfm.models.diffusion
    import medfm.synth.generate
    from medfm.models import build_encoder
    from medfm.models.diffusion.export import export_diffusion, load_diffusion
    from medfm.models.diffusion.model import DiffusionConfig, DiffusionModel
    from medfm.models.diffusion.sampling import SamplerSettings, sample
    from medfm.models.export import export_encoder, load_encoder

    torch.manual_seed(0)
    out = Path(sys.argv[1])
    spec = {"name": "vit2d", "size": "tiny", "img_size": 28, "patch_size": 7, "embed_dim": 32,
            "depth": 1, "num_heads": 2}
    encoder = build_encoder(spec).eval()
    path = export_encoder(encoder, out / "enc", preprocessing={"mode": "unit"}, data={},
                          training={})
    loaded, sidecar = load_encoder(path)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.pooled(x), encoder.pooled(x))
    assert sidecar["preprocessing"] == {"mode": "unit"}

    cfg = DiffusionConfig(channels=(8, 16, 16), attention_levels=(False,) * 3)
    model = DiffusionModel(cfg).eval()
    export_diffusion(model, out / "unet", preprocessing={}, classes=[])
    again = load_diffusion(out / "unet").model
    settings = SamplerSettings("ddim", 2)
    torch.testing.assert_close(sample(again, [3], settings), sample(model, [3], settings))

    engines = sorted(m for m in ("lightning", "pytorch_lightning") if m in sys.modules)
    assert not engines, f"importing the models pulled in {engines}"
    print("standalone ok")
    """
)


def test_models_and_exports_need_no_lightning(tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # a fresh process: nothing imported yet
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "standalone ok" in res.stdout


def test_an_encoder_sidecar_reads_only_its_own_weights_and_names_a_corrupt_file(tmp_path):
    """A sidecar naming weights outside its folder, or weights whose header is corrupt but
    whose sha256 was recorded to match, fail with ExportError (found by bench/fuzz.py)."""
    import json

    import pytest
    from safetensors.torch import save_file

    from medfm.io import sha256_file
    from medfm.models import ENCODERS
    from medfm.models.export import ExportError, export_encoder, load_encoder

    enc = ENCODERS.build("vit2d", {"size": "tiny", "img_size": 28, "patch_size": 7,
                                   "embed_dim": 32, "depth": 1, "num_heads": 2})  # fmt: skip
    path = export_encoder(enc, tmp_path / "export", preprocessing={}, data={}, training={})
    sidecar = json.loads(path.read_text())
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"w": enc.state_dict()["cls_token"].clone()}, str(outside))
    for name in ("../elsewhere.safetensors", str(outside)):
        probe = dict(sidecar, weights=dict(sidecar["weights"], file=name))
        path.write_text(json.dumps(probe))
        with pytest.raises(ExportError, match="weights.file must be a file name"):
            load_encoder(path)
    weights = path.parent / sidecar["weights"]["file"]
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # header length now absurd
    digest = sha256_file(weights)[0]
    path.write_text(json.dumps(dict(sidecar, weights=dict(sidecar["weights"], sha256=digest))))
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        load_encoder(path)
