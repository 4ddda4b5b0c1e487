"""`medfm pretrain`."""

from medfm.shards.stub import stub_app

app = stub_app("pretrain", "Pretrain foundation models (MAE, contrastive, diffusion) on shard sets")
