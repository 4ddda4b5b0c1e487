"""ShardDataModule in real Lightning fits: an interrupted run resumed with fit(ckpt_path=...) sees
exactly the samples, in the same order, that an uninterrupted run sees; and what a stage passes
in (row filter, batch transform, drop_last, the trained-sample count) reaches its batches and
state."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
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


def test_stage_inputs_reach_batches_and_state(tmp_path):
    write_2d_set(tmp_path / "real")
    config = ShardDataConfig(
        train=[
            SourceConfig(str(tmp_path / "real"), labels=lambda row: row["labels"]["class"] == 1)
        ],
        batch_size=3,
        num_workers=0,
        drop_last=True,
        seed=3,
        batch_transform=lambda batch: {**batch, "size": len(batch["key"])},
    )
    dm = ShardDataModule(config)
    assert not is_overridden("val_dataloader", dm)  # no val source: Lightning skips validation
    (ds,) = dm.train_datasets()
    loader = dm.train_dataloader()
    batches = [dm.on_after_batch_transfer(b, 0) for b in loader]
    assert len(batches) == len(loader) == ds.rank_length() // 3 and ds.rank_length() % 3
    assert all(b["size"] == 3 and b["label"].eq(1).all() for b in batches)  # filtered rows only
    # a run that trained on 3 batches: `used` and the position ride in the state
    dm = ShardDataModule(config)
    it = iter(dm.train_dataloader())
    for _ in range(3):
        dm.count(len(next(it)["key"]))
    state = dm.state_dict()
    assert state["used"] == 9 and state["train"]["consumed"] == 9
    resumed = ShardDataModule(config)
    resumed.load_state_dict(state)
    assert resumed.used == 9
    rest = [b["key"] for b in resumed.train_dataloader()]
    assert rest == [b["key"] for b in batches[3:]]
