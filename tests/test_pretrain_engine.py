"""Issue 20's GPU-ready engine on CPU: losses read back every `log_every` steps (not every step),
the host-counted EMA equal to torch's AveragedModel, TF32 and fused AdamW on CUDA, `torch.compile`
of whole objectives, channels_last CNNs, activation checkpointing under DDP, MFU and data-wait for
every objective and modality, and the analytic FLOPs of an MAE ViT-B/16 against a hand count and
against torch's FLOP counter. GPU-only checks are marked `gpu`."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from pretrain_helpers import (
    DECODER,
    TINY,
    base_config,
    ct_shards,
    ecg_shards,
    losses,
    mimic_linked_shards,
    pneumonia_shards,
)
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medfm.pretrain import engine
from medfm.pretrain.config import load_config
from medfm.pretrain.train import build, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VIT = {"name": "vit2d", "img_size": 28, "patch_size": 4, **TINY}
MAE = {"name": "mae", **DECODER}
DINO = {"name": "dino", "prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16,
        "local_crops": 2, "local_size": 12}  # fmt: skip
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import os

    data = os.environ.get("MEDFM_SAMPLE_DATA")
    if not data:
        pytest.skip("MEDFM_SAMPLE_DATA is not set")
    return pneumonia_shards(Path(data), tmp_path_factory.mktemp("pm") / "shards", n=128)


@pytest.fixture
def observed(monkeypatch):
    """The Trainer each `run` fits, observed (its `fit` is wrapped to keep it), not replaced."""
    seen: list[L.Trainer] = []
    fit = L.Trainer.fit

    def keep(self, *args, **kwargs):
        seen.append(self)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", keep)
    return seen


def fit(tree: dict) -> dict:
    return run(load_config(None, base=tree))


# -- no per-step host reads --------------------------------------------------------------------


@pytest.mark.slow
def test_losses_are_read_back_every_log_every_steps_only(tmp_path, shards, observed):
    tree = base_config(tmp_path, shards, VIT, [MAE], max_steps=12, log_every=4, ema_decay=0.9)
    fit(tree)
    module = observed[0].lightning_module
    # one read per window of 4 steps: after steps 4, 8 and 12 (none left for the final save)
    assert module.read_at == [4, 8, 12]
    assert [s for s, _ in module.history] == list(range(12))
    assert module.pending == []
    logged = losses(tree["out_dir"])  # the CSV logger still gets every 4th step's loss
    assert len(logged) == 3


def test_host_counted_ema_equals_averaged_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    avg = get_ema_multi_avg_fn(0.9)
    ours = engine.HostCountedEMA(net, multi_avg_fn=avg, use_buffers=True)
    torchs = AveragedModel(net, multi_avg_fn=avg, use_buffers=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(5):
        net(torch.randn(16, 4)).square().mean().backward()  # moves batch-norm stats too
        opt.step()
        opt.zero_grad()
        ours.update_parameters(net)
        torchs.update_parameters(net)
    a, b = ours.state_dict(), torchs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # after a load (a resume) the first-update flag is read from n_averaged again, once
    fresh = engine.HostCountedEMA(net, multi_avg_fn=avg, use_buffers=True)
    fresh.load_state_dict(a)
    assert fresh.started is None
    fresh.update_parameters(net)
    assert fresh.started is True and int(fresh.n_averaged) == 6


# -- TF32, fused AdamW ---------------------------------------------------------------------------


def test_tf32_only_on_cuda_and_fused_adamw_only_for_cuda_params():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)  # fmt: skip
    try:
        torch.set_float32_matmul_precision("highest")
        engine.fast_math(torch.device("cpu"))
        assert torch.get_float32_matmul_precision() == "highest"
        engine.fast_math(torch.device("cuda"))  # flags only: no device needed to set them
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]
    opt = engine.adamw([{"params": list(nn.Linear(2, 2).parameters())}], 1e-3, (0.9, 0.95))
    assert not opt.defaults["fused"]


@pytest.mark.gpu
@gpu
def test_fused_adamw_on_cuda():
    params = list(nn.Linear(2, 2).cuda().parameters())
    assert engine.adamw([{"params": params}], 1e-3, (0.9, 0.95)).defaults["fused"] is True


@pytest.mark.gpu
@gpu
@pytest.mark.slow
@pytest.mark.parametrize("objective", [MAE, DINO], ids=["mae", "dino"])
def test_a_gpu_step_makes_no_host_sync_outside_the_flush(tmp_path, shards, objective):
    """CUDA's sync debug mode raises on any device-to-host sync inside the steps between
    flushes (the loss read-back happens at batch end, every log_every steps). DINO too: its
    schedules are device tensors and its iBOT masks are drawn on the host."""

    class NoSync(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= 2:  # after warm-up (cuDNN/compile probes may sync)
                torch.cuda.set_sync_debug_mode("error")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            torch.cuda.set_sync_debug_mode("default")

    from medfm.pretrain import train

    tree = base_config(tmp_path, shards, VIT, [objective], max_steps=8, log_every=4,
                       ema_decay=0.9)  # fmt: skip
    tree["train"] |= {"accelerator": "gpu", "devices": 1}
    cfg = load_config(None, base=tree)
    module, data = train.build(cfg)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=8, precision="bf16-mixed",
                        callbacks=[NoSync()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, use_distributed_sampler=False)  # fmt: skip
    trainer.fit(module, datamodule=data.module)  # forward and backward under "error"
    assert module.read_at == [4, 8]


# -- compile, channels_last, activation checkpointing --------------------------------------------


@pytest.mark.slow
def test_compile_covers_each_objective_loss_encoder_and_decoder(tmp_path, shards, observed):
    import torch._dynamo

    torch._dynamo.reset()
    tree = base_config(
        tmp_path,
        shards,
        VIT,
        [MAE],
        max_steps=4,
        log_every=2,
        compile=True,
        compile_backend="aot_eager",
    )  # forward and backward captured, no codegen
    fit(tree)
    module = observed[0].lightning_module
    loss = module.objectives["mae"].loss
    assert hasattr(loss, "_torchdynamo_orig_callable")  # the loss method itself is compiled
    assert all(map(torch.isfinite, torch.tensor(losses(tree["out_dir"]))))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def test_cnn_encoder_runs_channels_last(tmp_path, shards):
    cnn = {"name": "timm", "arch": "resnet10t", "img_size": 28}
    tree = base_config(tmp_path, shards, cnn, [{"name": "simclr"}], max_steps=2)
    module, _ = build(load_config(None, base=tree))
    module.configure_model()
    # (a one-channel tensor is trivially NHWC: look at a wide convolution and a 3-channel batch)
    conv = next(
        m
        for m in module.encoder.modules()
        if isinstance(m, nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1)
    )
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    batch = module.memory_format({"data": torch.zeros(2, 3, 28, 28)})
    assert batch["data"].is_contiguous(memory_format=torch.channels_last)
    vit, _ = build(load_config(None, base=base_config(tmp_path, shards, VIT, [MAE])))
    vit.configure_model()  # a ViT is left as it is
    assert vit.encoder.patch_embed.proj.weight.is_contiguous()


@pytest.mark.slow
def test_activation_checkpointing_under_ddp_changes_nothing_but_memory(tmp_path, shards, observed):
    plain = base_config(tmp_path / "a", shards, VIT, [MAE], max_steps=6, log_every=1)
    ckpt = base_config(tmp_path / "b", shards, VIT, [MAE], max_steps=6, log_every=1,
                       strategy="ddp", accelerator="cpu", devices=1,
                       activation_checkpointing=True)  # fmt: skip
    fit(plain)
    fit(ckpt)
    wrapped = observed[1].lightning_module.encoder.blocks
    assert all(type(b).__name__ == "CheckpointWrapper" for b in wrapped)
    # the recomputed forward gives the same losses, and the parameter names stay as they were
    torch.testing.assert_close(losses(plain["out_dir"]), losses(ckpt["out_dir"]))
    keys = set(observed[1].lightning_module.state_dict())
    assert keys == set(observed[0].lightning_module.state_dict())


# -- MFU and data wait for every objective and modality ----------------------------------------


def configs(sample_data: Path, tmp: Path) -> dict[str, dict]:
    """One tiny run per objective and modality (the configs of the per-objective tests)."""
    pm = pneumonia_shards(sample_data, tmp / "pm", n=64)
    dx, rx, vocab = mimic_linked_shards(sample_data, tmp / "dx", tmp / "rx")
    ehr = {"name": "ehr_transformer", "vocab_size": vocab, "max_tokens": 48, **TINY}
    vol = {"name": "vit3d", "img_size": [32, 32, 16], "patch_size": [8, 8, 4], **TINY}
    ecg = {"name": "signal_vit", "num_leads": 2, "length": 720, "patch_size": 18, **TINY}
    dino = {"name": "dino", "prototypes": 64, "hidden_dim": 32, "bottleneck_dim": 16,
            "local_crops": 2, "local_size": 16}  # fmt: skip
    unet = {"name": "diffusion", "sample_size": [28, 28], "channels": [8, 16, 16],
            "attention_levels": [False, False, True]}  # fmt: skip
    out = {
        "mae-2d": (pm, VIT, [MAE]),
        "mae-3d": (ct_shards(sample_data, tmp / "ct"), vol, [MAE]),
        "mae-1d": (ecg_shards(sample_data, tmp / "ecg"), ecg, [MAE]),
        "simclr-2d": (pm, VIT, [{"name": "simclr"}]),
        "dino-2d": (pm, VIT, [dino]),
        "diffusion-2d": (pm, None, [unet]),
        "clip+mcm-ehr": (dx, ehr, [{"name": "clip"}, {"name": "mcm"}]),
    }
    trees = {}
    for name, (root, model, objectives) in out.items():
        tree = base_config(tmp / name, root, model, objectives, max_steps=8, log_every=4,
                           peak_flops=1e12)  # fmt: skip
        tree["data"]["batch_size"] = 4
        if name.startswith("mae-3d"):
            tree["data"]["patches_per_volume"] = 4
        if name.startswith("mae-1d"):
            tree["data"]["signal_length"] = 720
        if name.startswith("clip"):
            tree["pair_model"] = dict(ehr)
            tree["data"]["pair"] = {"shards": str(rx), "join": "study_id"}
        trees[name] = tree
    return trees


@pytest.mark.slow
def test_mfu_and_data_wait_are_logged_for_every_objective_and_modality(tmp_path, sample_data):
    for name, tree in configs(sample_data, tmp_path).items():
        summary = fit(tree)
        perf = summary["throughput"]
        assert perf["flops_per_sample"] > 0, name
        assert 0 < perf["mfu"] < 1 and 0 <= perf["data_wait_fraction"] <= 1, name
        rows = list(csv.DictReader(Path(tree["out_dir"], "logs/version_0/metrics.csv").open()))
        logged = {k for r in rows for k, v in r.items() if v}
        assert {"perf/mfu", "perf/data_wait_fraction", "perf/samples_per_s"} <= logged, name
        expected = "counted" if name.startswith("diffusion") else "analytic"
        assert perf["flops_source"] == expected, name


# -- the FLOP count of one ViT, by hand --------------------------------------------------------

# MAE ViT-B/16 at 224², one channel, mask 0.75, decoder 512 wide and 8 deep (the paper's).
# Training FLOPs are 6 per weight per token (2 forward, 4 backward) plus attention's
# 12 * depth * width * tokens per token (QK^T and AV, 2 * n * D each forward, times 3).
#  A block of width D holds qkv 3D² + 3D, proj D² + D, fc1 4D² + 4D, fc2 4D² + D, two norms 4D:
#  12D² + 13D. D = 768: 7,087,872; 12 blocks: 85,054,464.
#  The encoder sees the 49 kept patches + the class token = 50 tokens:
#   (6 * 85,054,464 + 12 * 12 * 768 * 50) * 50 = 515,856,384 * 50 = 25,792,819,200.
#  The patch embedding (768 x 256 weights) runs on all 196 patches: 6 * 196,608 * 196
#   = 231,211,008.
#  Decoder blocks, D = 512: 3,152,384 each, 8: 25,219,072, on 196 + 1 tokens:
#   (6 * 25,219,072 + 12 * 8 * 512 * 197) * 197 = 160,997,376 * 197 = 31,716,483,072.
#  decoder_embed (768 x 512) on 50 tokens: 117,964,800; decoder_pred (512 x 256) on 197:
#   154,927,104.
HAND_COUNT = 25_792_819_200 + 231_211_008 + 31_716_483_072 + 117_964_800 + 154_927_104
# = 58,013,405,184. medfm's count applies the embedding's 6/param to the position table and the
# heads to 196 tokens each: within 2% of the hand count.


def test_mae_vit_b16_flops_match_a_hand_count_and_torchs_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from medfm.models import build_encoder
    from medfm.pretrain.objectives import OBJECTIVES, Context

    enc = build_encoder({"name": "vit2d", "size": "base", "img_size": 224, "patch_size": 16})
    cfg = {"mask_ratio": 0.75, "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16}
    mae = OBJECTIVES.build("mae", cfg, Context(enc), where="objectives[0]")
    assert HAND_COUNT == 58_013_405_184
    assert mae.flops_per_sample() == pytest.approx(HAND_COUNT, rel=0.02)
    with FlopCounterMode(display=False) as counter:  # one real step: forward and backward
        mae.loss({"data": torch.rand(1, 1, 224, 224)})["loss"].backward()
    # the counter sees matmuls and attention only, and no input gradient for the first layer
    assert counter.get_total_flops() == pytest.approx(HAND_COUNT, rel=0.05)


# -- FSDP ---------------------------------------------------------------------------------------
# Lightning's FSDPStrategy hands FSDP no device on CPU, and FSDP then refuses to start ("needs a
# non-CPU accelerator"), so a Lightning FSDP fit runs on GPUs only (the gpu test below). On CPU,
# two gloo processes wrap the engine's module with torch's FSDP and the very policy medfm's
# strategy passes it, train, and round-trip the sharded and full state dicts.

TIMM_VIT = {"name": "timm", "arch": "vit_tiny_patch16_224", "img_size": 28, "patch_size": 4,
            "embed_dim": 64, "depth": 2, "num_heads": 4, "in_chans": 1}  # fmt: skip


class Step(nn.Module):
    """What Lightning's FSDP wrapper calls: a training step's loss as the module's forward."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, batch):
        return self.module.objective_losses(batch)[0]


def fsdp_rank(rank: int, world: int, port: int, tree: dict, out: str) -> None:
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as Sharded

    from medfm.pretrain.checkpoint import SafeCheckpointIO
    from medfm.pretrain.train import build_strategy
    from medfm.shards.dataset import ShardDataset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = load_config(None, base=tree)

    def wrapped(seed: int):
        torch.manual_seed(seed)
        module, data = build(cfg)
        policy = build_strategy(cfg, module, SafeCheckpointIO()).kwargs["auto_wrap_policy"]
        model = Sharded(Step(module), auto_wrap_policy=policy, device_id=torch.device("cpu"),
                     use_orig_params=True)  # fmt: skip
        return model, module, data

    model, module, data = wrapped(0)
    units = [type(m.module).__name__ for m in model.modules() if isinstance(m, Sharded)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    reader = ShardDataset(data.sources[0].root, shuffle=False)  # each rank its own 8 images
    x = torch.stack([data.contract.apply(reader.load(i, 0))["data"]
                     for i in range(rank * 8, rank * 8 + 8)])  # fmt: skip
    for step in range(3):
        module.ctx.seed = step
        model({"data": x}).backward()
        opt.step()
        opt.zero_grad()
    with Sharded.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
        dcp.save({"model": model.state_dict()}, checkpoint_id=f"{out}/sharded")
    full_cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with Sharded.state_dict_type(model, StateDictType.FULL_STATE_DICT, full_cfg):
        full = model.state_dict()
    # a differently initialised model, restored from the shards, has the same full weights
    other, _, _ = wrapped(1)
    with Sharded.state_dict_type(other, StateDictType.SHARDED_STATE_DICT):
        state = {"model": other.state_dict()}
        dcp.load(state, checkpoint_id=f"{out}/sharded")
        other.load_state_dict(state["model"])
    with Sharded.state_dict_type(other, StateDictType.FULL_STATE_DICT, full_cfg):
        restored = other.state_dict()
    if rank == 0:
        torch.save({"full": full, "restored": restored, "units": units}, f"{out}/rank0.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_wraps_blocks_and_round_trips_sharded_and_full_state_into_plain_timm(tmp_path, shards):
    import timm
    import torch.multiprocessing as mp
    from clusters_helpers import free_port

    from medfm.models.export import export_encoder

    tree = base_config(tmp_path, shards, TIMM_VIT, [MAE], strategy="fsdp")
    mp.spawn(fsdp_rank, args=(2, free_port(), tree, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    # the wrapping: the root plus one FSDP unit per transformer block of timm's Block class, the
    # encoder's two and the MAE decoder's one
    assert got["units"] == ["Step", "Block", "Block", "Block"]
    full, restored = got["full"], got["restored"]
    module, _ = build(load_config(None, base=tree))
    plain = {f"module.{k}": v for k, v in module.state_dict().items()}
    assert full.keys() == plain.keys()  # no FSDP prefixes in the full state
    for k in full:
        torch.testing.assert_close(restored[k], full[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(
        full["module.encoder.blocks.0.attn.qkv.weight"],
        plain["module.encoder.blocks.0.attn.qkv.weight"],
    )  # it trained
    # export from the FSDP run's weights; plain timm loads it with strict key matching
    module.load_state_dict({k.removeprefix("module."): v for k, v in full.items()})
    export_encoder(module.encoder, tmp_path / "export", preprocessing={}, data={}, training={})
    from safetensors.torch import load_file

    ref = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=64,
                            depth=2, num_heads=4, in_chans=1, num_classes=0,
                            no_embed_class=True)  # fmt: skip
    ref.load_state_dict(load_file(tmp_path / "export" / "encoder.safetensors"), strict=True)
    torch.testing.assert_close(ref.blocks[0].attn.qkv.weight,
                               full["module.encoder.blocks.0.attn.qkv.weight"])  # fmt: skip


@pytest.mark.gpu
@gpu
@pytest.mark.slow
def test_lightning_fsdp_fit_on_gpu_exports_into_plain_timm(tmp_path, shards):
    import timm
    from safetensors.torch import load_file

    tree = base_config(tmp_path, shards, TIMM_VIT, [MAE], strategy="fsdp", accelerator="gpu",
                       devices=1, max_steps=6, activation_checkpointing=True)  # fmt: skip
    assert fit(tree)["steps"] == 6
    ref = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, embed_dim=64,
                            depth=2, num_heads=4, in_chans=1, num_classes=0,
                            no_embed_class=True)  # fmt: skip
    ref.load_state_dict(load_file(tmp_path / "run" / "export" / "encoder.safetensors"))
