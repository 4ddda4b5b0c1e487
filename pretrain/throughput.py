"""Honest throughput: samples/s, the share of step time spent waiting for data, peak memory and,
on GPU, model FLOPs utilisation (MFU) from an analytic FLOPs-per-sample count that accounts for
masking (an MAE encoder sees only the visible tokens), as in nanoGPT and torchtitan. An objective
without an analytic count (0) gets one counted by `torch.utils.flop_counter` over one real
training step (forward and backward of that step's batch, nothing run twice).

Timings are host clocks; on CUDA the monitor synchronises once per report window (every
`log_every` steps), so a window's time is the device's, without a sync in every step.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.flop_counter import FlopCounterMode

from medfm.io import write_json

# Dense bf16 tensor-core peaks (FLOP/s) from vendor data sheets; matched on the device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
WARMUP_BATCHES = 3  # the first batches include worker start-up and compilation
COUNT_BATCH = 1  # the batch whose FLOPs are counted when the objectives give no analytic count


def peak_flops(device: torch.device, configured: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: `configured` when set (train.peak_flops), else the GPU's."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class ThroughputMonitor(L.Callback):
    """Times each batch: data wait = from the end of one step to the start of the next."""

    def __init__(
        self, flops_per_sample: float, log_every: int, out_dir: str, peak: float = 0.0
    ) -> None:
        self.flops_per_sample, self.log_every, self.out_dir = flops_per_sample, log_every, out_dir
        self.peak = peak
        self.flops_source = "analytic" if flops_per_sample else "counted"
        self.counter: FlopCounterMode | None = None
        self.last_end: float | None = None
        self.window = {"wait": 0.0, "step": 0.0, "samples": 0}
        self.total = {"wait": 0.0, "step": 0.0, "samples": 0}
        self.batches, self.start_time, self.start_step = 0, 0.0, 0
        self.summary: dict[str, Any] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_time, self.start_step = time.perf_counter(), trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_start = time.perf_counter()
        if not self.flops_per_sample and self.batches == COUNT_BATCH:
            self.counter = FlopCounterMode(display=False)
            self.counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.counter is not None:  # forward + backward of this batch on this device
            self.counter.__exit__(None, None, None)
            self.flops_per_sample = self.counter.get_total_flops() / len(batch["data"])
            self.counter = None
        report = trainer.global_step % self.log_every == 0
        if report and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the window's time is the device's
        now = time.perf_counter()
        self.batches += 1
        if self.last_end is not None and self.batches > WARMUP_BATCHES:
            n = len(batch["data"]) * trainer.world_size
            for acc in (self.window, self.total):
                acc["wait"] += self.batch_start - self.last_end
                acc["step"] += now - self.last_end
                acc["samples"] += n
        self.last_end = now
        if report and self.window["step"] > 0:
            self.report(trainer, pl_module, self.window)
            self.window = {"wait": 0.0, "step": 0.0, "samples": 0}

    def metrics(self, pl_module, acc: dict[str, float]) -> dict[str, float]:
        rate = acc["samples"] / acc["step"]
        out = {
            "perf/samples_per_s": rate,
            "perf/data_wait_fraction": acc["wait"] / acc["step"],
            "perf/peak_memory_gib": peak_memory_gib(pl_module.device),
        }
        peak = peak_flops(pl_module.device, self.peak)
        if peak and self.flops_per_sample:
            world = pl_module.trainer.world_size
            out["perf/mfu"] = self.flops_per_sample * rate / (peak * world)
        return out

    def report(self, trainer, pl_module, acc: dict[str, float]) -> None:
        m = self.metrics(pl_module, acc)
        if trainer.logger is not None:
            for logger in trainer.loggers:
                logger.log_metrics(m, step=trainer.global_step)
        done = trainer.global_step - self.start_step
        left = trainer.max_steps - trainer.global_step
        elapsed = time.perf_counter() - self.start_time
        eta = elapsed / max(done, 1) * left
        loss = trainer.callback_metrics.get("train/loss")
        loss_txt = f"loss {float(loss):.4f} " if loss is not None else ""
        mfu = f" mfu {m['perf/mfu']:.1%}" if "perf/mfu" in m else ""
        pl_module.print(
            f"step {trainer.global_step}/{trainer.max_steps} {loss_txt}"
            f"{m['perf/samples_per_s']:.1f} samples/s data-wait "
            f"{m['perf/data_wait_fraction']:.1%}{mfu} ETA {eta:.0f}s",
            flush=True,
        )

    def on_train_end(self, trainer, pl_module) -> None:
        if self.total["step"] <= 0:
            return
        self.summary = {k.split("/")[1]: v for k, v in self.metrics(pl_module, self.total).items()}
        self.summary.update(
            flops_per_sample=self.flops_per_sample,
            flops_source=self.flops_source,
            measured_batches=max(0, self.batches - WARMUP_BATCHES),
            device=str(pl_module.device),
        )
        if trainer.is_global_zero:
            path = Path(self.out_dir) / "throughput.json"
            write_json(path, self.summary, indent=1)
