"""`medfm hub`."""

from medfm.shards.stub import stub_app

app = stub_app("hub", "Push and pull checkpoints and adapters")
