"""ShardDataModule in real Lightning fits: an interrupted run resumed with fit(ckpt_path=...) sees
exactly the samples, in the same order, that an uninterrupted run sees."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from readers_helpers import write_2d_set

from medfm.shards import ShardDataConfig, ShardDataModule, SourceConfig

torch.set_num_threads(1)


class KeyRecorder(L.LightningModule):
    """A one-weight regression on the mean intensity; records the keys each step trains on."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen += batch["key"]
        x = torch.stack([d.mean() for d in batch["data"]]) / 1000.0
        return ((self.weight * x - 1.0) ** 2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_n", float(len(batch["key"])))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(config, *, ckpt_path=None, **trainer_kw) -> list[str]:
    model = KeyRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kw,
    )
    trainer.fit(model, datamodule=ShardDataModule(config), ckpt_path=ckpt_path)
    return model.seen


@pytest.mark.slow
def test_fit_resume_from_mid_epoch_checkpoint(tmp_path):
    real = write_2d_set(tmp_path / "real")
    write_2d_set(tmp_path / "synth", synthetic=True, prefix="syn-")
    config = ShardDataConfig(
        train=[
            SourceConfig(str(tmp_path / "real"), 0.75, name="real"),
            SourceConfig(str(tmp_path / "synth"), 0.25, name="synth"),
        ],
        val=str(tmp_path / "real"),
        batch_size=4,
        num_workers=2,
        samples_per_epoch=48,
        seed=9,
    )
    reference = fit(config, max_epochs=2, enable_checkpointing=False)
    assert len(reference) == 96 and reference[:48] != reference[48:]
    assert {k for k in reference if not k.startswith("syn-")} <= set(real)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=17, save_top_k=-1
    )
    head = fit(config, max_steps=17, callbacks=[ckpt])  # stops 5 batches into epoch 1
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    state = torch.load(path, weights_only=True)["ShardDataModule"]["train"]
    assert state["epoch"] == 1 and state["consumed"] == 5 * 4
    tail = fit(config, max_epochs=2, ckpt_path=str(path), enable_checkpointing=False)
    assert head == reference[:68] and head + tail == reference
