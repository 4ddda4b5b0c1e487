"""Export and load diffusion models as safetensors plus a JSON sidecar (never a pickle).

The sidecar says `"kind": "diffusion"`, the UNet config, the noise schedule, the class list
and the preprocessing contract of the training data; `medfm synth generate` needs nothing else.
The checkpoint hash recorded in synthetic shards is the sha256 of the weights file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file, save

from medfm.io import as_url, atomic_write_bytes, get_fs, is_local, sha256_bytes, sha256_file
from medfm.models.contract import sorted_classes
from medfm.shards import Manifest

from .contract import build_contract, engine_window
from .model import DiffusionConfig, DiffusionModel, build_scheduler

KIND = "diffusion"
SIDECAR_FORMAT = "medfm-diffusion"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
ENGINE_SUFFIX = "_unet.safetensors"  # how the pretrain engine saves objective modules


class CheckpointKindError(ValueError):
    """The file is not a diffusion model export (an encoder, a pickle, something else)."""


@dataclass
class LoadedDiffusion:
    model: DiffusionModel
    sidecar: dict[str, Any]
    sha256: str
    weights_path: str

    @property
    def classes(self) -> list[Any]:
        return list(self.sidecar.get("classes", []))

    @property
    def contract(self) -> dict[str, Any]:
        return self.sidecar["preprocessing"]


def export_diffusion(
    model: DiffusionModel,
    out_dir: str | Path,
    *,
    preprocessing: dict[str, Any],
    classes: list[Any],
    class_key: str = "",
    data_manifests: list[dict[str, Any]] | None = None,
    step: int | None = None,
    name: str = "model",
) -> Path | str:
    """Write `<name>.safetensors`, then `<name>.json`, into out_dir (a local folder or an
    object-store URL, each file under a temporary name, then committed); returns the weights
    path (a URL for a URL). The weights are the UNet's state dict, under the UNet's own keys."""
    fs, root = get_fs(str(out_dir))  # str: pathlib would fold "s3://b" into a folder "s3:"
    state = {k: v.detach().cpu().contiguous() for k, v in model.unet.state_dict().items()}
    blob = save(state, metadata={"format": "pt"})
    weights = f"{root}/{name}.safetensors"
    atomic_write_bytes(fs, weights, blob)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "kind": KIND,
        "architecture": model.cfg.describe(),
        "scheduler": dict(model.scheduler.config),
        "classes": list(classes),
        "class_key": class_key,
        "preprocessing": preprocessing,
        "data_manifests": data_manifests or [],
        "step": step,
        "weights": {"path": f"{name}.safetensors", "sha256": sha256_bytes(blob)},
    }
    text = json.dumps(sidecar, indent=1, sort_keys=True, default=str)
    atomic_write_bytes(fs, f"{root}/{name}.json", text.encode())
    return Path(weights) if is_local(fs) else as_url(fs, weights)


def resolve(path: str | Path) -> tuple[Path, Path | dict[str, Any]]:
    """(weights, sidecar path) for a folder, a .safetensors file or a .json sidecar; for the
    export folder of a `medfm pretrain` run, (weights, sidecar dict) rebuilt from its config."""
    p = Path(path)
    if p.suffix in PICKLE_SUFFIXES:
        raise CheckpointKindError(
            f"{p}: {p.suffix} checkpoints are pickles and are never loaded; pass the exported "
            "diffusion model (folder, .safetensors or .json sidecar)"
        )
    if p.is_dir() and list(p.glob(f"*{ENGINE_SUFFIX}")):
        return engine_export(p)
    if p.is_dir():
        sidecars = sorted(q for q in p.glob("*.json") if q.with_suffix(".safetensors").exists())
        if len(sidecars) != 1:
            raise CheckpointKindError(
                f"{p}: expected one <name>.safetensors + <name>.json export, found "
                f"{[q.name for q in sidecars] or 'none'}"
            )
        p = sidecars[0]
    sidecar, weights = p.with_suffix(".json"), p.with_suffix(".safetensors")
    for q in (sidecar, weights):
        if not q.exists():
            raise CheckpointKindError(f"{p}: {q.name} is missing; an export is both files")
    return weights, sidecar


def engine_export(folder: Path) -> tuple[Path, dict[str, Any]]:
    """A diffusion sidecar for the export folder of a `medfm pretrain` run.

    The engine saves objective modules as `<objective>_unet.safetensors` beside the encoder
    export; the run's config.json (one level up) holds the objective's parameters and the data
    section, from which the preprocessing contract is rebuilt against the training manifest.
    """
    cfg, params, key = run_objective(folder, KIND)
    weights = folder / f"{key}{ENGINE_SUFFIX}"
    model_cfg = DiffusionConfig(**params)
    model_cfg.check()
    sidecar = {
        "format": SIDECAR_FORMAT,
        "kind": KIND,
        "architecture": model_cfg.describe(),
        "scheduler": dict(build_scheduler(model_cfg).config),
        **training_data(cfg, model_cfg.sample_size),
        "weights": {"path": weights.name, "sha256": sha256_file(*get_fs(str(weights)))[0]},
    }
    return weights, sidecar


def run_objective(folder: Path, name: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(run config, objective params, engine key) of the first `name` objective of the run whose
    export folder is `folder` (its config.json lies one level up)."""
    config_path = folder.parent / "config.json"
    if not config_path.exists():
        raise CheckpointKindError(f"{folder}: no {config_path.name} beside the export folder")
    cfg = json.loads(config_path.read_text())
    names = [o.get("name") for o in cfg["objectives"]]
    if name not in names:
        raise CheckpointKindError(f"{folder}: the run trained no {name} objective")
    spec = cfg["objectives"][names.index(name)]
    params = {k: v for k, v in spec.items() if k not in ("name", "weight")}
    return cfg, params, name  # the engine keys the first objective of a name by the name itself


def training_data(cfg: dict[str, Any], sample_size: tuple[int, ...]) -> dict[str, Any]:
    """The sidecar fields a run's data section implies: the preprocessing contract rebuilt
    against the training manifest, the class list, the manifest hash and the step."""
    data = cfg["data"]
    shards = Manifest.open(data["shards"])
    kinds = tuple(data.get("kinds") or ("image2d", "volume3d"))
    rows = [r for r in shards.rows() if r["split"] == data["split"] and r["kind"] in kinds]
    window = engine_window(data, rows, data["shards"])
    contract = build_contract(data["shards"], rows, shards.header, sample_size, window)
    class_key = data.get("class_key", "")
    classes = []
    if class_key:
        classes = sorted_classes({json.loads(r["labels"])[class_key] for r in rows})
    return {
        "classes": classes,
        "class_key": class_key,
        "preprocessing": contract,
        "data_manifests": [{"root": data["shards"], "sha256": shards.header["manifest"]["sha256"]}],
        "step": cfg["train"]["max_steps"],
    }


def read_sidecar(path: Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(path, dict):
        return path
    try:
        sidecar = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointKindError(f"{path}: sidecar is not valid JSON ({e})") from e
    if isinstance(sidecar, dict) and sidecar.get("format") == "medfm-encoder":
        sidecar.setdefault("kind", "encoder")
    if not isinstance(sidecar, dict) or sidecar.get("kind") != KIND:
        found = sidecar.get("kind", "unknown") if isinstance(sidecar, dict) else "unknown"
        arch = sidecar.get("architecture", {}) if isinstance(sidecar, dict) else {}
        name = arch.get("name", "?") if isinstance(arch, dict) else "?"
        raise CheckpointKindError(
            f"{path}: this is a {found} checkpoint (architecture {name!r}), not a diffusion "
            "model; `medfm synth generate` needs a model exported by a diffusion objective"
        )
    return sidecar


def build_loaded(
    sidecar: dict[str, Any], state: dict[str, torch.Tensor], digest: str, where: str
) -> LoadedDiffusion:
    """Rebuild the model from a (checked) sidecar and load its weights."""
    params = dict(sidecar["architecture"]["params"])
    for key in ("sample_size", "channels", "attention_levels"):
        params[key] = tuple(params[key])
    model = DiffusionModel(DiffusionConfig(**params))
    try:
        model.unet.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointKindError(f"{where}: weights do not fit the sidecar's UNet ({e})") from e
    return LoadedDiffusion(model.eval(), sidecar, digest, where)


def load_diffusion(path: str | Path, device: str | torch.device = "cpu") -> LoadedDiffusion:
    """Load an export (folder, .safetensors or .json); verifies the weights hash."""
    weights, sidecar_path = resolve(path)
    sidecar = read_sidecar(sidecar_path)
    digest = sha256_file(*get_fs(str(weights)))[0]
    if digest != sidecar["weights"]["sha256"]:
        raise CheckpointKindError(f"{weights}: sha256 differs from its sidecar")
    loaded = build_loaded(sidecar, load_file(str(weights)), digest, str(weights))
    loaded.model.to(device)
    return loaded


def from_bytes(weights: bytes, sidecar: dict[str, Any]) -> LoadedDiffusion:
    """Rebuild from the weights' bytes (how Ray tasks receive a model); hash checked."""
    digest = sha256_bytes(weights)
    if digest != sidecar["weights"]["sha256"]:
        raise CheckpointKindError("model bytes do not match the sidecar's sha256")
    return build_loaded(sidecar, load(weights), digest, sidecar["weights"]["path"])
