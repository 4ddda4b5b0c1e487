"""Fine-tuning components on their own: bootstrap CIs, metrics, heads, LoRA, LR decay, config."""

from __future__ import annotations

import pytest
import torch

from medfm.config import ConfigError
from medfm.finetune.config import LoraConfig, TaskConfig, load_config
from medfm.finetune.fit import fit_epochs
from medfm.finetune.heads import UNETRDecoder
from medfm.finetune.metrics import bootstrap
from medfm.finetune.model import FinetuneModel, apply_lora, param_groups
from medfm.finetune.tasks import LabelError, task_for
from medfm.models import build_encoder

torch.set_num_threads(1)
TINY2D = {"name": "vit2d", "size": "tiny", "embed_dim": 32, "depth": 3, "num_heads": 2,
          "img_size": 32, "patch_size": 8}  # fmt: skip


def task(kind: str, labels: list[str] = ("a", "b")):
    return task_for(TaskConfig(type=kind, label_names=list(labels)))


def noisy_scores(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    return y.float() + torch.randn(n, generator=g), y


def test_bootstrap_resamples_patients_not_images():
    """Images of one patient share a patient effect; resampling images would hide it."""
    g = torch.Generator().manual_seed(0)
    patient = torch.arange(400) % 10
    y = torch.randint(0, 2, (400,), generator=g)
    logits = (
        y.float() + 0.5 * torch.randn(400, generator=g) + 2 * torch.randn(10, generator=g)[patient]
    )
    fns = {"auroc": task("binary").metric_fns()["auroc"]}
    probs = torch.sigmoid(logits)
    per_image = bootstrap(fns, probs, y, [str(i) for i in range(400)], 200, 0.95)["auroc"]
    per_patient = bootstrap(fns, probs, y, [str(int(p)) for p in patient], 200, 0.95)["auroc"]
    assert per_image["value"] == per_patient["value"]
    assert per_patient["ci_low"] <= per_patient["value"] <= per_patient["ci_high"]
    width = per_patient["ci_high"] - per_patient["ci_low"]
    assert width > 1.5 * (per_image["ci_high"] - per_image["ci_low"])


@pytest.mark.parametrize("kind", ["binary", "multiclass", "multilabel", "regression"])
def test_every_task_reports_metrics_with_intervals(kind):
    g = torch.Generator().manual_seed(0)
    n, c = 120, 3
    if kind == "binary":
        y = torch.randint(0, 2, (n,), generator=g)
        out = 2 * y.float() - 1 + torch.randn(n, generator=g)
    elif kind == "multiclass":
        y = torch.randint(0, c, (n,), generator=g)
        out = 2 * torch.nn.functional.one_hot(y, c).float() + torch.randn(n, c, generator=g)
    elif kind == "multilabel":
        y = torch.randint(0, 2, (n, c), generator=g)
        out = 2 * y.float() - 1 + torch.randn(n, c, generator=g)
    else:
        y = torch.randn(n, generator=g)
        out = y + 0.3 * torch.randn(n, generator=g)
    labels = ["a", "b"] if kind == "binary" else ["a", "b", "c"]
    m = task(kind, labels).evaluate(out, y, [f"p{i // 2}" for i in range(n)], 50, 0.95)
    classification = {"auroc", "accuracy", "balanced_accuracy", "f1", "sensitivity",
                      "specificity", "ece", "brier"}  # fmt: skip
    names = {"mae", "rmse", "r2", "pearson"} if kind == "regression" else classification
    assert set(m) == names
    for name, v in m.items():
        assert v["ci_low"] <= v["ci_high"] and v["n_boot"] == 50
        if name != "ece":  # ECE is biased upwards on resamples: its point may sit below the CI
            assert v["ci_low"] <= v["value"] <= v["ci_high"], name
    key, good = ("r2", 0.7) if kind == "regression" else ("auroc", 0.8)
    assert m[key]["value"] > good


@pytest.mark.parametrize("spatial", [2, 3])
def test_unetr_decoder_maps_vit_features_to_full_resolution(spatial):
    if spatial == 2:
        enc = build_encoder(TINY2D)
        x = torch.randn(2, 1, 32, 32)
    else:
        spec = {"name": "vit3d", "size": "tiny", "embed_dim": 32, "depth": 2, "num_heads": 2,
                "img_size": [16, 16, 8], "patch_size": [4, 4, 4]}  # fmt: skip
        enc = build_encoder(spec)
        x = torch.randn(2, 1, 16, 16, 8)
    seg = task("segmentation", ["bg", "a", "b"])
    head = seg.build_head(enc)
    assert isinstance(head, UNETRDecoder)
    model = FinetuneModel(enc, head, seg)
    out = model(x)
    assert out.shape == (2, 3, *x.shape[2:])
    out.mean().backward()  # gradients reach the encoder through the skip connections
    assert enc.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_segmentation_head_refuses_anisotropic_patches():
    spec = {"name": "vit3d", "size": "tiny", "embed_dim": 32, "depth": 1, "num_heads": 2,
            "img_size": [16, 16, 8], "patch_size": [4, 4, 2]}  # fmt: skip
    enc = build_encoder(spec)
    with pytest.raises(ConfigError, match="isotropic"):
        task("segmentation", ["bg", "fg"]).build_head(enc)


def test_lora_wraps_fused_qkv_and_mlp_and_freezes_the_base():
    enc = build_encoder(TINY2D)
    peft_model = apply_lora(enc, LoraConfig(rank=4, alpha=8), "test-encoder")
    names = [n for n, _ in peft_model.named_parameters() if "lora_A" in n]
    for target in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert sum(f".{target}.lora_A" in n for n in names) == 3  # one per block
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_full_finetune_layer_decay_lowers_lr_towards_the_input():
    enc = build_encoder(TINY2D)
    binary = task("binary")
    model = FinetuneModel(enc, binary.build_head(enc), binary)
    groups = param_groups(model, "full", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    depth = len(enc.blocks)
    assert scale_of[id(enc.patch_embed.proj.weight)] == 0.5 ** (depth + 1)
    assert scale_of[id(enc.blocks[0].attn.qkv.weight)] == 0.5**depth
    assert scale_of[id(enc.blocks[-1].mlp.fc2.weight)] == 0.5
    assert scale_of[id(model.head.fc.weight)] == 1.0
    assert all(g["weight_decay"] == 0.0 for g in groups for p in g["params"] if p.ndim == 1)


def test_targets_from_labels_tables():
    mc = task("multiclass", ["a", "b", "c"])
    assert mc.target({"label": "b"}, "k") == 1
    assert mc.target({"label": 2}, "k") == 2
    with pytest.raises(LabelError, match="k: label 'd' is not in the labels table"):
        mc.target({"label": "d"}, "k")
    with pytest.raises(LabelError, match="no label 'label'"):
        mc.target({"other": 1}, "k")
    ml = task("multilabel", ["a", "b", "c"])
    assert ml.target({"label": ["a", "c"]}, "k").tolist() == [1, 0, 1]
    assert ml.target({"label": {"b": 1, "c": 0}}, "k").tolist() == [0, 1, 0]


def test_config_errors_name_the_key():
    base = {"name": "x", "out_dir": "o", "encoder": "e", "data": {"shards": "s"},
            "task": {"type": "binary", "label_names": ["a", "b"]}}  # fmt: skip
    load_config(None, base=base)
    with pytest.raises(ConfigError, match="task.label_names: binary tasks have 2 names"):
        load_config(None, base={**base, "task": {"type": "binary", "label_names": ["a"]}})
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        load_config(None, base=base, overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match="data.synthetic.ratio"):
        load_config(None, base=base, overrides=["data.synthetic={shards: s, ratio: 1.5}"])


def test_an_epochs_last_batch_of_one_is_skipped_not_fatal():
    """BatchNorm in the heads cannot train on one sample (the demo's 4,673 train X-rays in
    batches of 64 end with one): fit_epochs skips that batch and trains on the rest."""
    base = {"name": "x", "out_dir": "o", "encoder": "e", "data": {"shards": "s"},
            "task": {"type": "binary", "label_names": ["a", "b"]}}  # fmt: skip
    cfg = load_config(None, base=base, overrides=["train.epochs=2", "train.warmup_epochs=0"])
    enc = build_encoder(TINY2D)
    binary = task_for(cfg.task)
    model = FinetuneModel(enc, binary.build_head(enc), binary)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 1, 32, 32, generator=g), torch.randint(0, 2, (9,), generator=g)
    before = model.head.fc.weight.detach().clone()
    out = fit_epochs(model, model, lambda: iter([(x[:8], y[:8]), (x[8:], y[8:])]), lambda: 0.5,
                     cfg, torch.device("cpu"), steps_per_epoch=2)  # fmt: skip
    assert [h["epoch"] for h in out["history"]] == [1, 2]
    assert not torch.equal(model.head.fc.weight, before)  # the batch of 8 trained the head
