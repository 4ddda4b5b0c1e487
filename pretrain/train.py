"""`run(cfg)`: data module, model, Trainer (strategy, precision, loggers, checkpoints), fit,
export. The CLI and the bench call this; so can a Python user."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L

from medfm.engine import precision_for as shared_precision_for
from medfm.io import get_fs, join, write_json
from medfm.models import Encoder
from medfm.models.contract import Contract
from medfm.models.export import export_encoder, save_module

from .checkpoint import (
    LAST,
    SafeCheckpointIO,
    SafeFSDPStrategy,
    StagedOutputs,
    checkpoint_dir,
    resume_checkpoint,
)
from .config import PretrainConfig, effective_batch, resolved_lr
from .data import PretrainData, set_vocab_size
from .engine import PretrainModule
from .plots import PlotCallback
from .throughput import ThroughputMonitor

log = logging.getLogger("medfm.pretrain")


def contract_for(
    encoder: Encoder | None, cfg: PretrainConfig, hints: dict[str, Any] | None = None
) -> Contract:
    """The preprocessing contract an encoder implies (input sizes come from its config); without
    one, the objectives' hints (a diffusion UNet's patch size). The data module fills in the
    kind from the shards when no encoder fixes it."""
    d = cfg.data
    if encoder is None:
        return Contract(kind="", intensity=d.intensity, window=d.window, **(hints or {}))
    p = encoder.config
    return Contract(
        kind=encoder.kind,
        intensity=d.intensity,
        window=d.window,
        channels=getattr(p, "in_chans", getattr(p, "num_leads", 1)),
        image_size=getattr(p, "img_size", 0) if encoder.kind == "image2d" else 0,
        patch_size=tuple(p.img_size) if encoder.kind == "volume3d" else (),
        signal_length=getattr(p, "length", 0),
        max_tokens=getattr(p, "max_tokens", 0),
    )


def build_strategy(cfg: PretrainConfig, module: PretrainModule, io: SafeCheckpointIO) -> Any:
    """The Trainer's strategy; every one reads and writes checkpoints through `io` only."""
    t = cfg.train
    if t.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(checkpoint_io=io)
    if t.strategy == "fsdp":
        blocks = set()
        for enc in (module.encoder, module.pair_encoder):
            if enc is not None:
                blocks |= enc.block_types()
        return SafeFSDPStrategy(
            checkpoint_io=io,
            auto_wrap_policy=blocks,
            activation_checkpointing_policy=blocks if t.activation_checkpointing else None,
            state_dict_type="full",
        )
    return "auto"


def build_loggers(cfg: PretrainConfig, root: str | None = None) -> list[Any]:
    """The loggers of train.loggers, writing below `root` (default out_dir; StagedOutputs.dir
    for an out_dir on an object store)."""
    from lightning.pytorch import loggers

    root = root or cfg.out_dir
    out = []
    for name in cfg.train.loggers:
        if name == "csv":
            out.append(loggers.CSVLogger(root, name="logs", version=0))
        elif name == "tensorboard":
            out.append(loggers.TensorBoardLogger(root, name="tensorboard", version=0))
        elif name == "wandb":  # optional extra: pip install medfm[wandb]
            # Offline (a run folder under wandb/, `wandb sync` uploads it) unless WANDB_MODE=online.
            offline = os.environ.get("WANDB_MODE", "offline") != "online"
            out.append(
                loggers.WandbLogger(project="medfm", name=cfg.name, save_dir=root, offline=offline)
            )
        elif name == "mlflow":  # optional extra: pip install medfm[mlflow]
            # A local store in the run (`mlflow ui --backend-store-uri sqlite:///...`) unless a
            # server is set. SQLite: MLflow 3 refuses new file stores (./mlruns) by default.
            store = "sqlite:///" + os.path.abspath(os.path.join(root, "mlflow.db"))
            uri = os.environ.get("MLFLOW_TRACKING_URI") or store
            out.append(loggers.MLFlowLogger(experiment_name=cfg.name, tracking_uri=uri))
        else:
            from .config import ConfigError

            raise ConfigError(
                f"train.loggers: unknown logger {name!r} (csv, tensorboard, wandb, mlflow)"
            )
    return out


def finish_wandb(trainer: L.Trainer) -> None:
    """End this run's W&B run: a later run in the process would log into it (WandbLogger reuses
    `wandb.run`), and an offline run's records stay buffered until it ends."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()


def precision_for(cfg: PretrainConfig) -> str:
    """The rule fine-tuning shares (medfm.engine): bf16-mixed on a GPU, 32-true on the CPU."""
    return shared_precision_for(cfg.train.precision, cfg.train.accelerator)


def build(cfg: PretrainConfig) -> tuple[PretrainModule, PretrainData]:
    """Model and data, checked against each other before any training step."""
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    set_vocab_size(cfg)  # an EHR encoder's vocabulary comes from the shard set
    module = PretrainModule(cfg)
    if module.ema is not None:  # updated by hand, never by the loss: DDP must not wait for its
        module.ema.requires_grad_(False)  # gradients (a multi-node run failed on "unused")
    hints = {k: v for obj in module.objectives.values() for k, v in obj.contract_hints().items()}
    contract = contract_for(module.encoder, cfg, hints)
    pair_contract = contract_for(module.pair_encoder, cfg) if module.pair_encoder else None
    data = PretrainData(cfg.data, contract, cfg.train.seed, pair_contract)
    module.check_data(data.kind, data.pair_kind, data.classes)
    return module, data


# Lightning's launcher writes the DDP rendezvous into the environment of the process that calls
# fit and takes only WORLD_SIZE out again, and its strategies leave the process group they
# started. With LOCAL_RANK left set, the next run in the process (or a run it starts in a
# subprocess) takes itself for an externally started rank and waits forever for ranks nobody
# starts; with the group left, a later run believes its ranks exist. Two fresh-clone CI runs
# hung on exactly that.
RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK")


@contextmanager
def distributed_state_kept() -> Iterator[None]:
    """Run the body, then put the rendezvous variables back as they were and end the process
    group it started."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in RENDEZVOUS_ENV}
    had_group = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run(cfg: PretrainConfig, *, resume: bool = False, force_resume: bool = False) -> dict:
    """Train (or continue) the run described by `cfg`; returns a summary dict."""
    with distributed_state_kept():
        return _run(cfg, resume, force_resume)


def _run(cfg: PretrainConfig, resume: bool, force_resume: bool) -> dict:
    set_vocab_size(cfg)  # before the resume check: the run's fingerprint includes it
    # The one read of the resumed checkpoint: Lightning is handed this state, not the file again.
    ckpt, state = resume_checkpoint(cfg, force_resume) if resume else (None, None)
    io = SafeCheckpointIO(preloaded={str(ckpt): state} if ckpt else None)
    module, data = build(cfg)
    t = cfg.train
    staged = StagedOutputs(cfg)  # loggers, plots, throughput.json: local, or staged and uploaded
    fs, out = get_fs(cfg.out_dir)
    fs.makedirs(out, exist_ok=True)
    throughput = ThroughputMonitor(module.flops_per_sample(), t.log_every, staged.dir, t.peak_flops)
    callbacks: list[Any] = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=checkpoint_dir(cfg),
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=t.checkpoint_every,
            save_top_k=1,
            save_last=True,
        ),
        throughput,
        L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"),
    ]
    if t.plots:
        callbacks.append(PlotCallback(staged.dir))
    callbacks.append(staged)  # after the plots: a checkpoint uploads what they wrote
    strategy = build_strategy(cfg, module, io)
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=precision_for(cfg),
        max_steps=t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=t.grad_accum,
        gradient_clip_val=t.clip_grad or None,
        callbacks=callbacks,
        logger=build_loggers(cfg, staged.dir),
        log_every_n_steps=t.log_every,
        plugins=[io] if strategy == "auto" else None,
        use_distributed_sampler=False,  # medfm.shards splits data by rank itself
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,  # ThroughputMonitor prints rate and ETA lines instead
        enable_model_summary=False,
        default_root_dir=staged.dir,
    )
    if trainer.is_global_zero:
        world = trainer.world_size  # what the lr rule scales by (train.blr)
        resolved = {"lr": resolved_lr(cfg, world), "effective_batch": effective_batch(cfg, world)}
        write_json(
            join(cfg.out_dir, "config.json"), cfg.to_dict() | {"resolved": resolved}, indent=1
        )
    trainer.fit(module, datamodule=data.module, ckpt_path=str(ckpt) if ckpt else None)
    trainer.save_checkpoint(join(checkpoint_dir(cfg), LAST), weights_only=False)  # end state
    finish_wandb(trainer)
    summary = {"steps": trainer.global_step, "throughput": throughput.summary}
    if trainer.is_global_zero:
        summary["export"] = str(export_all(cfg, module, data, trainer.global_step))
        staged.close()
    return summary


def export_all(cfg: PretrainConfig, module: PretrainModule, data: PretrainData, step: int):
    """Encoders (EMA when kept) and objective extras into out_dir/export."""
    dest = join(cfg.out_dir, "export")
    training = {
        "config_fingerprint": cfg.fingerprint(),
        "steps": step,
        "objectives": cfg.objectives,
        "ema_decay": cfg.train.ema_decay,
        "run": cfg.name,
    }
    described = data.describe()
    path = None
    if module.encoder is not None:
        path = export_encoder(
            module.export_encoder(),
            dest,
            preprocessing=data.contract.describe() | {"source": source_fields(data)},
            data=described,
            training=training,
        )
    if module.pair_encoder is not None:
        export_encoder(
            module.pair_encoder,
            dest,
            name="pair_encoder",
            preprocessing=data.pairing.contract.describe(),
            data=described,
            training=training,
        )
    for key, obj in module.export_objectives().items():
        for name, sub in obj.export_modules().items():
            save_module(sub, join(dest, f"{key}_{name}.safetensors"))
    return path or dest


def source_fields(data: PretrainData) -> dict[str, Any]:
    """Channels, spacing and modality of the training rows (what the contract was fitted to)."""
    row = data.datasets[0].row(0)
    return {
        "modality": row["modality"],
        "channels": list(row["channels"] or []),
        "spacing": list(row["spacing"] or []),
        "sampling_rate": row["sampling_rate"],
    }
