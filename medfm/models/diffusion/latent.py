"""Latent diffusion (LDM, as MAISI and RoentGen do it): a KL autoencoder compresses images or
volume patches, a denoising UNet learns the scaled latents, classifier-free guidance steers it.

`AutoencoderConfig` builds MONAI's `AutoencoderKL` (2D or 3D). `LatentDiffusionModel` owns the
frozen autoencoder, the latent `DiffusionModel` (the pixel-space UNet family, over latent
channels and shape) and the latent scale factor (1 / std of the first training batch's latents,
as in Rombach et al. 2022 and MONAI's tutorials). Class-conditional models keep one extra class
embedding, the null class, which training swaps in with probability `class_dropout`; sampling
mixes eps = eps_uncond + w (eps_cond - eps_uncond) (w = 0: unconditional, 1: conditional).

Exports are the pretrain engine's: `<objective>_autoencoder.safetensors` (the autoencoder) and
`<objective>_latent.safetensors` (UNet, autoencoder and scale factor in one file, so its sha256,
the generator hash synthetic shards record, covers both networks), each beside the run's
config.json, from which the loaders here rebuild their sidecars.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load, load_file
from torch import nn

from medfm.config import ConfigError
from medfm.io import get_fs, sha256_bytes, sha256_file

from .export import PICKLE_SUFFIXES, CheckpointKindError, run_objective, training_data
from .model import (
    BETA_SCHEDULES,
    PREDICTION_TYPES,
    DiffusionConfig,
    DiffusionModel,
    build_scheduler,
    check_unet_levels,
)
from .sampling import SamplerSettings, initial_noise, make_scheduler

AE_OBJECTIVE, LDM_OBJECTIVE = "autoencoder_kl", "latent_diffusion"
AE_SUFFIX, LDM_SUFFIX = "_autoencoder.safetensors", "_latent.safetensors"
LOSSES = ("l1", "l2")
PREPARATION = ("kind", "intensity", "channels")  # contract fields both stages must share


@dataclass
class AutoencoderConfig:
    """MONAI AutoencoderKL plus its training loss: L1 or L2 reconstruction + kl_weight * KL.

    No perceptual or adversarial term (MAISI and the LDM paper add both for sharp full-size
    images; at the sizes this trains on CPU the pixel loss alone already reconstructs well)."""

    spatial_dims: int = 2
    in_channels: int = 1
    sample_size: tuple[int, ...] = (28, 28)  # 3D: the training patch; 2D: checked, not cropped
    channels: tuple[int, ...] = (32, 64)  # one per level; each level past the first halves
    attention_levels: tuple[bool, ...] = (False, False)
    latent_channels: int = 3
    num_res_blocks: int = 1
    norm_num_groups: int = 16
    loss: str = "l1"
    kl_weight: float = 1e-6  # MONAI's tutorials; larger pulls latents towards N(0, 1)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def latent_shape(self, sample_size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(s // self.factor for s in sample_size)

    def check(self) -> None:
        check_unet_levels(self)
        if self.loss not in LOSSES:
            raise ConfigError(f"loss: one of {LOSSES}, got {self.loss!r}")
        if self.kl_weight < 0:
            raise ConfigError(f"kl_weight: must be >= 0, got {self.kl_weight}")

    def describe(self) -> dict[str, Any]:
        return {"name": "autoencoder_kl", "params": asdict(self)}


def build_autoencoder(cfg: AutoencoderConfig) -> nn.Module:
    from monai.networks.nets import AutoencoderKL

    cfg.check()
    return AutoencoderKL(
        spatial_dims=cfg.spatial_dims,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        latent_channels=cfg.latent_channels,
        num_res_blocks=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=False,  # mid-block attention: costly in 3D, little gain here
        with_decoder_nonlocal_attn=False,
    )


def posterior_sample(
    ae: nn.Module, x: torch.Tensor, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, mu, sigma) for x in [-1, 1]; the noise comes from `gen` (resume-exact in training)."""
    mu, sigma = ae.encode(x)
    eps = torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)
    return mu + sigma * eps, mu, sigma


@dataclass
class LatentDiffusionConfig:
    """The latent UNet over a trained autoencoder export (`autoencoder`: its export folder)."""

    autoencoder: str = ""
    sample_size: tuple[int, ...] = ()  # image (H, W) / patch (I, J, K); () = the autoencoder's
    channels: tuple[int, ...] = (32, 64)
    attention_levels: tuple[bool, ...] = (False, True)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    num_classes: int = 0  # 0 = unconditional; else classifier-free guidance over this many
    class_dropout: float = 0.1  # training: probability of the null class (Ho & Salimans 2022)
    guidance_scale: float = 3.0  # sampling default, w in eps_u + w (eps_c - eps_u)
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # the LDM paper's schedule
    prediction_type: str = "epsilon"

    def check(self) -> None:
        if not self.autoencoder:
            raise ConfigError(
                "autoencoder: set the export folder of an autoencoder_kl run (its "
                f"<run>/export, holding {AE_OBJECTIVE}{AE_SUFFIX})"
            )
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"class_dropout: must be in [0, 1), got {self.class_dropout}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"beta_schedule: one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"prediction_type: one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )

    def unet_config(self, ae: AutoencoderConfig) -> DiffusionConfig:
        """The latent UNet: autoencoder latent channels and shape, one extra (null) class."""
        size = tuple(self.sample_size) or tuple(ae.sample_size)
        if len(size) != ae.spatial_dims or any(s % ae.factor for s in size):
            raise ConfigError(
                f"sample_size: {list(size)} must have {ae.spatial_dims} entries divisible by "
                f"the autoencoder's downsampling factor {ae.factor}"
            )
        cfg = DiffusionConfig(
            spatial_dims=ae.spatial_dims,
            in_channels=ae.latent_channels,
            sample_size=ae.latent_shape(size),
            channels=tuple(self.channels),
            attention_levels=tuple(self.attention_levels),
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            num_classes=self.num_classes + 1 if self.num_classes else 0,
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
        )
        cfg.check()
        return cfg


class LatentDiffusionModel(nn.Module):
    """Frozen autoencoder + latent `DiffusionModel` + the latent scale factor (a buffer, 0 until
    the first training batch sets it), all in one state dict."""

    def __init__(self, cfg: LatentDiffusionConfig, ae_cfg: AutoencoderConfig):
        super().__init__()
        self.cfg, self.ae_cfg = cfg, ae_cfg
        self.image_size = tuple(cfg.sample_size) or tuple(ae_cfg.sample_size)
        self.autoencoder = build_autoencoder(ae_cfg).requires_grad_(False).eval()
        self.diffusion = DiffusionModel(cfg.unet_config(ae_cfg))
        self.register_buffer("scale_factor", torch.zeros(()))

    @property
    def conditional(self) -> bool:
        return self.cfg.num_classes > 0

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def train(self, mode: bool = True) -> LatentDiffusionModel:
        super().train(mode)
        self.autoencoder.eval()  # frozen: never in training mode
        return self

    def check_input(self, x: torch.Tensor) -> None:
        want = (self.ae_cfg.in_channels, *self.image_size)
        if tuple(x.shape[1:]) != want:
            raise ValueError(
                f"latent diffusion expects batches of shape (B, {', '.join(map(str, want))}), "
                f"got {tuple(x.shape)}; set sample_size to match the shards"
            )

    @torch.no_grad()
    def encode(self, x01: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of [0, 1] inputs; the first call fixes the scale factor (averaged
        over ranks, so every rank scales alike)."""
        z, _, _ = posterior_sample(self.autoencoder, x01 * 2.0 - 1.0, gen)
        if not self.scale_factor > 0:
            std = z.float().std()
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(std)
                std /= dist.get_world_size()
            self.scale_factor.fill_(1.0 / float(std))
        return z * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents back to images/patches in the contract's [0, 1]."""
        x = self.autoencoder.decode(z / self.scale_factor)
        return ((x.float() + 1.0) / 2.0).clamp(0, 1)


def guided_prediction(
    model: LatentDiffusionModel, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, w
) -> torch.Tensor:
    """The UNet's prediction with classifier-free guidance weight w (one batched pass)."""
    diff, n = model.diffusion, len(z)
    if labels is None:
        return diff(z, t.expand(n))
    null = torch.full_like(labels, model.null_class)
    if w == 1.0 or w == 0.0:  # one branch suffices
        return diff(z, t.expand(n), labels if w == 1.0 else null)
    both = diff(torch.cat([z, z]), t.expand(2 * n), torch.cat([labels, null]))
    cond, uncond = both.chunk(2)
    return uncond + w * (cond - uncond)


@torch.inference_mode()
def sample_latent(
    model: LatentDiffusionModel,
    seeds: list[int],
    settings: SamplerSettings,
    class_index: list[int] | None = None,
    guidance_scale: float | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw len(seeds) latents (per-seed noise, as `sampling.sample`), decode them: (B, C,
    *sample_size) in [0, 1]. guidance_scale None: the model's configured default."""
    if not model.scale_factor > 0:
        raise ValueError("latent diffusion model has no scale factor: it was never trained")
    diff = model.diffusion
    scheduler = make_scheduler(diff, settings)
    scheduler.set_timesteps(settings.steps, device=device)
    z = initial_noise(seeds, (diff.cfg.in_channels, *diff.cfg.sample_size), device)
    z = z * scheduler.init_noise_sigma
    labels = None
    if model.conditional:
        if class_index is None or len(class_index) != len(seeds):
            raise ValueError("class-conditional model: give one class index per seed")
        labels = torch.as_tensor(class_index, dtype=torch.long, device=device)
    w = model.cfg.guidance_scale if guidance_scale is None else float(guidance_scale)
    step_kwargs: dict[str, Any] = {}
    if settings.sampler == "ddim":
        step_kwargs["eta"] = settings.eta
        if settings.eta > 0:
            step_kwargs["generator"] = torch.Generator(device=device).manual_seed(int(seeds[0]))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=z.is_cuda)
    for t in scheduler.timesteps:
        with autocast:
            pred = guided_prediction(model, scheduler.scale_model_input(z, t), t, labels, w)
        z = scheduler.step(pred.float(), t, z, **step_kwargs).prev_sample
    return model.decode(z)


# ---------------------------------------------------------------- loading engine exports


@dataclass
class LoadedAutoencoder:
    model: nn.Module
    cfg: AutoencoderConfig
    sidecar: dict[str, Any]
    sha256: str
    weights_path: str


def _export_folder(path: str | Path, suffix: str, what: str) -> Path:
    p = Path(path)
    if p.suffix in PICKLE_SUFFIXES:
        raise CheckpointKindError(f"{p}: {p.suffix} checkpoints are pickles and are never loaded")
    folder = p.parent if p.suffix == ".safetensors" else p
    if not folder.is_dir() or not list(folder.glob(f"*{suffix}")):
        raise CheckpointKindError(
            f"{p}: not the export folder of a run with the {what} objective (no *{suffix} in it)"
        )
    return folder


def _tuples(params: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: tuple(v) if k in keys and v is not None else v for k, v in params.items()}


def autoencoder_config(params: dict[str, Any]) -> AutoencoderConfig:
    cfg = AutoencoderConfig(**_tuples(params, ("sample_size", "channels", "attention_levels")))
    cfg.check()
    return cfg


def load_autoencoder(path: str | Path) -> LoadedAutoencoder:
    """The autoencoder of an `autoencoder_kl` run's export folder (weights hash checked against
    nothing but themselves: the folder is the record)."""
    folder = _export_folder(path, AE_SUFFIX, AE_OBJECTIVE)
    cfg, params, key = run_objective(folder, AE_OBJECTIVE)
    ae_cfg = autoencoder_config(params)
    weights = folder / f"{key}{AE_SUFFIX}"
    digest = sha256_file(*get_fs(str(weights)))[0]
    model = build_autoencoder(ae_cfg)
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise CheckpointKindError(f"{weights}: weights do not fit the run's config ({e})") from e
    sidecar = {
        "kind": "autoencoder",
        "architecture": ae_cfg.describe(),
        **training_data(cfg, ae_cfg.sample_size),
        "weights": {"path": str(weights), "sha256": digest},
    }
    return LoadedAutoencoder(model.eval(), ae_cfg, sidecar, digest, str(weights))


@dataclass
class LoadedLatentDiffusion:
    """What `medfm synth generate` needs of a latent-diffusion export (as `LoadedDiffusion`)."""

    model: LatentDiffusionModel
    sidecar: dict[str, Any]
    sha256: str  # of the latent file: UNet, autoencoder and scale factor
    weights_path: str

    @property
    def classes(self) -> list[Any]:
        return list(self.sidecar.get("classes", []))

    @property
    def contract(self) -> dict[str, Any]:
        return self.sidecar["preprocessing"]

    @property
    def autoencoder_sha256(self) -> str:
        return self.sidecar["autoencoder"]["sha256"]


def is_latent_export(path: str | Path) -> bool:
    """Whether `path` is (a file of) a latent-diffusion run's export folder."""
    p = Path(path)
    folder = p.parent if p.suffix == ".safetensors" else p
    return folder.is_dir() and bool(list(folder.glob(f"*{LDM_SUFFIX}")))


def latent_config(params: dict[str, Any]) -> LatentDiffusionConfig:
    keys = ("sample_size", "channels", "attention_levels")
    return LatentDiffusionConfig(**_tuples(params, keys))


def build_latent(
    sidecar: dict[str, Any], state: dict[str, torch.Tensor], digest: str, where: str
) -> LoadedLatentDiffusion:
    """Rebuild from a sidecar and the latent file's tensors (which hold the autoencoder too)."""
    cfg = latent_config(sidecar["architecture"]["params"])
    model = LatentDiffusionModel(cfg, autoencoder_config(sidecar["autoencoder"]["params"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointKindError(f"{where}: weights do not fit the run's config ({e})") from e
    sidecar["scale_factor"] = float(model.scale_factor)
    return LoadedLatentDiffusion(model.eval(), sidecar, digest, where)


def load_latent_diffusion(
    path: str | Path, device: str | torch.device = "cpu"
) -> LoadedLatentDiffusion:
    """A `latent_diffusion` run's export folder. Refuses a model whose autoencoder differs from
    the autoencoder export its config names (retrained or replaced since)."""
    folder = _export_folder(path, LDM_SUFFIX, LDM_OBJECTIVE)
    cfg, params, key = run_objective(folder, LDM_OBJECTIVE)
    ldm_cfg = latent_config(params)
    ae = load_autoencoder(ldm_cfg.autoencoder)
    unet_cfg = ldm_cfg.unet_config(ae.cfg)
    weights = folder / f"{key}{LDM_SUFFIX}"
    sidecar = {
        "format": "medfm-latent-diffusion",
        "kind": LDM_OBJECTIVE,
        "architecture": {"name": LDM_OBJECTIVE, "params": asdict(ldm_cfg)},
        "unet": unet_cfg.describe(),
        "autoencoder": {
            "params": asdict(ae.cfg),
            "path": ldm_cfg.autoencoder,
            "sha256": ae.sha256,
            "data_manifests": ae.sidecar["data_manifests"],
        },
        "scheduler": dict(build_scheduler(unet_cfg).config),
        **training_data(cfg, tuple(ldm_cfg.sample_size) or tuple(ae.cfg.sample_size)),
        "weights": {"path": weights.name, "sha256": sha256_file(*get_fs(str(weights)))[0]},
    }
    check_same_preparation(sidecar["preprocessing"], ae.sidecar["preprocessing"], str(weights))
    loaded = build_latent(
        sidecar, load_file(str(weights)), sidecar["weights"]["sha256"], str(weights)
    )
    mine = loaded.model.autoencoder.state_dict()
    if any(not torch.equal(v, mine[k]) for k, v in ae.model.state_dict().items()):
        raise CheckpointKindError(
            f"{weights}: its autoencoder differs from the export at {ldm_cfg.autoencoder} "
            "(retrained or replaced since this model was trained); decode with the one it saw"
        )
    loaded.model.to(device)
    return loaded


def check_same_preparation(mine: dict[str, Any], ae: dict[str, Any], where: str) -> None:
    """Refuse latents learnt from data the autoencoder never saw prepared that way (another
    kind, intensity window or channels): decoding them would map back to the wrong values."""
    diffs = [f"{k}: {mine.get(k)} vs {ae.get(k)}" for k in PREPARATION if mine.get(k) != ae.get(k)]
    if diffs:
        raise CheckpointKindError(
            f"{where}: trained on data prepared unlike its autoencoder's training data "
            f"({'; '.join(diffs)}); train both stages under one contract"
        )


def latent_from_bytes(weights: bytes, sidecar: dict[str, Any]) -> LoadedLatentDiffusion:
    """Rebuild from the latent file's bytes (how Ray tasks receive a model); hash checked."""
    digest = sha256_bytes(weights)
    if digest != sidecar["weights"]["sha256"]:
        raise CheckpointKindError("model bytes do not match the sidecar's sha256")
    return build_latent(dict(sidecar), load(weights), digest, sidecar["weights"]["path"])
