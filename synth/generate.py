"""`medfm synth generate`: sample a diffusion model into a normal shard set.

The export chooses the generator: a `latent_diffusion` run's export folder samples latents with
classifier-free guidance and decodes them with its autoencoder (medfm.models.diffusion.latent);
anything else loads as a pixel-space diffusion model (medfm.models.diffusion.export).

Work is planned as (index, seed, class) jobs and split into chunks; each chunk runs locally or as
a Ray task, writes its own tar shards through a `SampleWriter` with a unique prefix, and returns
rows + files; the driver commits the manifest once. Samples carry `synthetic=true`, the
checkpoint hash, seed, class and sampler settings, and are stored in the dtype and shape of the
training data (the preprocessing contract inverted), so readers treat them like real samples.
"""

from __future__ import annotations

import atexit
import logging
import math
import posixpath
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfm.device import select_device
from medfm.io import get_fs, get_tree, is_remote, remove_temporaries
from medfm.models.diffusion.contract import intensity_of
from medfm.models.diffusion.export import LoadedDiffusion, from_bytes, load_diffusion
from medfm.models.diffusion.latent import (
    LDM_OBJECTIVE,
    LoadedLatentDiffusion,
    is_latent_export,
    latent_from_bytes,
    load_latent_diffusion,
    sample_latent,
)
from medfm.models.diffusion.sampling import SamplerSettings, sample
from medfm.shards import Geometry, Sample, SampleWriter, ShardFile, write_manifest
from medfm.shards.manifest import HEADER_NAME

log = logging.getLogger("medfm.synth")

Loaded = LoadedDiffusion | LoadedLatentDiffusion


class UnknownClassError(ValueError):
    """A requested class is not one the model was trained on."""


@dataclass
class Job:
    index: int
    seed: int
    label: Any  # class value as stored in labels; None for unconditional models


@dataclass
class GenerateOptions:
    n: int
    classes: list[Any] = field(default_factory=list)  # empty: all classes in turn
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    batch_size: int = 64
    seed: int = 0
    address: str | None = None  # Ray cluster address ("auto", "ray://...", "local")
    tasks: int = 0  # Ray tasks; 0 = one per available GPU, else per 2 CPUs
    device: str = "auto"
    overwrite: bool = False
    guidance_scale: float | None = None  # class-conditional latent diffusion; None: its default


def load_generator(model: str) -> Loaded:
    """The generator an export holds: latent diffusion (UNet + autoencoder) or pixel-space;
    `model` may be on an object store (copied here first: the loaders read files)."""
    model = local_model(model)
    return load_latent_diffusion(model) if is_latent_export(model) else load_diffusion(model)


_LOCAL_MODELS: dict[str, str] = {}  # object-store model -> its copy, once per process


def local_model(model: str) -> str:
    """A local path for a model export: itself, or for an s3:// (gs://, ...) one a copy in a
    temporary folder removed at exit. A folder comes whole, with its run's config.json one
    level up (an engine export rebuilds its sidecar from it); a .safetensors or .json file
    comes with the files sharing its stem (weights and sidecar)."""
    if not is_remote(model) or model in _LOCAL_MODELS:
        return _LOCAL_MODELS.get(model, model)
    fs, root = get_fs(model)
    root = root.rstrip("/")
    tmp = Path(tempfile.mkdtemp(prefix="medfm-model-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    local = tmp / "run" / posixpath.basename(root)
    if fs.isdir(root):
        get_tree(model, local)
        config = f"{posixpath.dirname(root)}/config.json"
        if fs.isfile(config):
            fs.get_file(config, str(local.parent / "config.json"))
    elif fs.isfile(root):
        local.parent.mkdir(parents=True)
        for path in fs.glob(f"{posixpath.splitext(root)[0]}.*"):
            fs.get_file(path, str(local.parent / posixpath.basename(path)))
    else:
        raise FileNotFoundError(f"{model}: no model export there")
    _LOCAL_MODELS[model] = str(local)
    return str(local)


def generator_from_bytes(weights: bytes, sidecar: dict[str, Any]) -> Loaded:
    if sidecar.get("kind") == LDM_OBJECTIVE:
        return latent_from_bytes(weights, sidecar)
    return from_bytes(weights, sidecar)


def guidance_of(loaded: Loaded, guidance_scale: float | None) -> dict[str, Any]:
    """The guidance weight a class-conditional latent model samples with ({} for others)."""
    if isinstance(loaded, LoadedLatentDiffusion) and loaded.model.conditional:
        default = loaded.model.cfg.guidance_scale
        return {"guidance_scale": default if guidance_scale is None else float(guidance_scale)}
    if guidance_scale is not None:
        raise ValueError(
            f"{loaded.weights_path}: --guidance-scale needs a class-conditional latent "
            "diffusion model; this one has no classifier-free guidance"
        )
    return {}


def draw(
    loaded: Loaded,
    seeds: list[int],
    settings: SamplerSettings,
    labels: list[int] | None,
    device: torch.device,
    guidance_scale: float | None,
) -> torch.Tensor:
    """Samples in the contract's [0, 1] space, from either kind of generator."""
    if isinstance(loaded, LoadedLatentDiffusion):
        return sample_latent(loaded.model, seeds, settings, labels, guidance_scale, device)
    return sample(loaded.model, seeds, settings, labels, device)


def generator_provenance(loaded: Loaded) -> dict[str, Any]:
    """Hashes naming the generator: the weights file's, and a latent model's autoencoder's."""
    out = {"generator_sha256": loaded.sha256}
    if isinstance(loaded, LoadedLatentDiffusion):
        out["autoencoder_sha256"] = loaded.autoencoder_sha256
    return out


def plan_jobs(loaded: Loaded, opts: GenerateOptions) -> list[Job]:
    """One job per sample: seed = base seed + index; classes cycle through the request."""
    if opts.n < 1:
        raise ValueError(f"--n must be at least 1, got {opts.n}")
    guidance_of(loaded, opts.guidance_scale)  # refuses guidance a model cannot honour
    known = loaded.classes
    if not known:
        if opts.classes:
            raise UnknownClassError(
                f"{loaded.weights_path}: the model is unconditional; --class {opts.classes} "
                "cannot be honoured"
            )
        return [Job(i, opts.seed + i, None) for i in range(opts.n)]
    by_name = {str(k): k for k in known}  # the CLI passes strings; labels may be ints
    unknown = [c for c in opts.classes if str(c) not in by_name]
    if unknown:
        raise UnknownClassError(
            f"unknown class {unknown}; the model was trained on {[str(k) for k in known]}"
        )
    wanted = [by_name[str(c)] for c in opts.classes] if opts.classes else known
    return [Job(i, opts.seed + i, wanted[i % len(wanted)]) for i in range(opts.n)]


def to_sample(
    x: np.ndarray,
    job: Job,
    loaded: Loaded,
    settings: SamplerSettings,
    guidance_scale: float | None = None,
):
    """A model output in [0, 1] (C, *spatial) -> a Sample stored like the training data."""
    c = loaded.contract
    stored = intensity_of(c).inverse(x, c["dtype"])
    stored = stored[0] if stored.shape[0] == 1 else np.moveaxis(stored, 0, -1)
    labels = {loaded.sidecar["class_key"]: job.label} if job.label is not None else {}
    record = {"seed": job.seed, "class": job.label, "sampler": settings.to_dict()}
    record |= guidance_of(loaded, guidance_scale)
    common = dict(
        key=f"synth-{loaded.sha256[:12]}-{job.index:07d}",
        kind=c["kind"],
        modality=c["modality"],
        dataset=f"{c['dataset']}-synthetic",
        patient_id=f"synthetic-{job.index:07d}",  # no real patient behind it
        split="train",
        data=stored,
        labels=labels,
        channels=list(c.get("channels", [])),
        synthetic=True,
        generator=loaded.sha256,
        provenance=generator_provenance(loaded)
        | {"model_step": loaded.sidecar.get("step")}
        | record,
        meta=record,
    )
    if c["kind"] == "volume3d":
        spacing = tuple(c["spacing"]) if c.get("spacing") else (1.0, 1.0, 1.0)
        return Sample(geometry=Geometry(spacing=spacing), **common)
    return Sample(spacing=tuple(c["spacing"]) if c.get("spacing") else None, **common)


def run_chunk(
    loaded: Loaded,
    jobs: list[Job],
    out: str,
    prefix: str,
    settings: SamplerSettings,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
    guidance_scale: float | None = None,
) -> tuple[list[dict[str, Any]], list[ShardFile]]:
    """Sample `jobs` in batches and store them under `prefix`; returns (rows, files)."""
    loaded.model.to(device).eval()
    classes = loaded.classes
    writer = SampleWriter(out, prefix)
    t0 = time.perf_counter()
    try:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            labels = [classes.index(j.label) for j in batch] if classes else None
            seeds = [j.seed for j in batch]
            x = draw(loaded, seeds, settings, labels, device, guidance_scale)
            for job, arr in zip(batch, x.float().cpu().numpy(), strict=True):
                writer.write(to_sample(arr, job, loaded, settings, guidance_scale))
            if progress:
                done = start + len(batch)
                rate = done / (time.perf_counter() - t0)
                eta = (len(jobs) - done) / rate
                log.info(
                    "%s: %d/%d samples, %.1f samples/s, ETA %.0f s",
                    prefix,
                    done,
                    len(jobs),
                    rate,
                    eta,
                )
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _ray_chunk(
    model_bytes: bytes, sidecar: dict, jobs, out, prefix, settings, batch_size, guidance=None
):
    """Ray task body: the model travels as bytes, so workers need no access to its path (a
    latent model's file holds its autoencoder too)."""
    loaded = generator_from_bytes(model_bytes, sidecar)
    device = select_device("auto")
    return run_chunk(loaded, jobs, out, prefix, settings, batch_size, device, False, guidance)


def run_ray(loaded: Loaded, jobs: list[Job], out: str, opts: GenerateOptions):
    """Chunks as Ray tasks (one per GPU, else per 2 CPUs, or opts.tasks); (rows, files) each."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=opts.address, include_dashboard=False, log_to_driver=False)
    try:
        res = ray.cluster_resources()
        gpus = res.get("GPU", 0)
        chunks = split_chunks(jobs, opts.tasks or max(1, int(gpus) or int(res.get("CPU", 2)) // 2))
        task = (
            ray.remote(num_gpus=1, num_cpus=1)(_ray_chunk)
            if gpus
            else ray.remote(num_cpus=1)(_ray_chunk)
        )
        weights = ray.put(Path(loaded.weights_path).read_bytes())
        run = uuid.uuid4().hex[:6]
        pending = {
            task.remote(
                weights,
                loaded.sidecar,
                c,
                out,
                f"synth-{run}-{i:04d}",
                opts.sampler,
                opts.batch_size,
                opts.guidance_scale,
            ): len(c)
            for i, c in enumerate(chunks)
        }
        results, done, t0 = [], 0, time.perf_counter()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            done += pending.pop(ready[0])
            results.append(ray.get(ready[0]))
            rate = done / (time.perf_counter() - t0)
            log.info("ray: %d/%d samples, %.1f samples/s", done, opts.n, rate)
        return results
    finally:
        if started:
            ray.shutdown()


def split_chunks(jobs: list[Job], parts: int) -> list[list[Job]]:
    size = math.ceil(len(jobs) / max(1, parts))
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def prepare_out(out: str, overwrite: bool) -> None:
    fs, path = get_fs(out)
    if fs.exists(f"{path}/{HEADER_NAME}"):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a shard set (pass --overwrite)")
        fs.rm(path, recursive=True)
    remove_temporaries(fs, path)


def generate_samples(
    model: str, out: str, opts: GenerateOptions
) -> tuple[Loaded, list[dict[str, Any]], list[ShardFile]]:
    """Sample into `out` without committing a manifest (generate() and the audit do that)."""
    loaded = load_generator(model)
    jobs = plan_jobs(loaded, opts)
    opts.sampler.check()
    prepare_out(out, opts.overwrite)
    if opts.address:
        results = run_ray(loaded, jobs, out, opts)
    else:
        device = select_device(opts.device)
        prefix = f"synth-{uuid.uuid4().hex[:6]}-0000"
        results = [
            run_chunk(
                loaded,
                jobs,
                out,
                prefix,
                opts.sampler,
                opts.batch_size,
                device,
                guidance_scale=opts.guidance_scale,
            )
        ]
    rows = [r for rs, _ in results for r in rs]
    files = [f for _, fs in results for f in fs]
    return loaded, rows, files


def synthetic_attributes(loaded: Loaded, opts: GenerateOptions) -> dict[str, Any]:
    """Header attributes: the inherited contract plus how the set was generated."""
    latent = {}
    if isinstance(loaded, LoadedLatentDiffusion):
        latent = guidance_of(loaded, opts.guidance_scale) | {
            "kind": LDM_OBJECTIVE,
            "scale_factor": loaded.sidecar["scale_factor"],
            "autoencoder_manifests": [
                m.get("sha256") for m in loaded.sidecar["autoencoder"]["data_manifests"]
            ],
        }
    return {
        "preprocessing": loaded.contract.get("declared", {}),
        "synthetic": generator_provenance(loaded)
        | latent
        | {
            "model_step": loaded.sidecar.get("step"),
            "contract": loaded.contract,
            "sampler": opts.sampler.to_dict(),
            "base_seed": opts.seed,
            "requested": opts.n,
            "classes": opts.classes or loaded.classes,
            "training_manifests": [m.get("sha256") for m in loaded.sidecar["data_manifests"]],
        },
    }


def generate(model: str, out: str, opts: GenerateOptions) -> dict[str, Any]:
    """Sample n images/volumes into a committed shard set at `out`; returns its header."""
    loaded, rows, files = generate_samples(model, out, opts)
    c = loaded.contract
    datasets = {f"{c['dataset']}-synthetic": {"synthetic": True, "generator": loaded.sha256}}
    return write_manifest(
        out, rows, files, datasets=datasets, attributes=synthetic_attributes(loaded, opts)
    )
