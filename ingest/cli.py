"""`medfm ingest`."""

from medfm.shards.stub import stub_app

app = stub_app("ingest", "Convert DICOM, NIfTI, images, signals and EHR tables into shard sets")
