"""`medfm synth`."""

from medfm.shards.stub import stub_app

app = stub_app("synth", "Generate and audit synthetic data")
