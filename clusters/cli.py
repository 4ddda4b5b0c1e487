"""`medfm launch`."""

from medfm.shards.stub import stub_app

app = stub_app("launch", "Launch any medfm command on Ray, SLURM or Kubernetes")
