"""`medfm finetune`."""

from medfm.shards.stub import stub_app

app = stub_app("finetune", "Fine-tune adapters and heads, evaluate and export")
