"""medfm: a data-centric pretraining pipeline for medical foundation models.

The repository root is this package; each stage folder (`ingest/`, `shards/`, `pretrain/`,
`synth/`, `finetune/`, `clusters/`) installs as `medfm.<stage>`. See docs/architecture.md.
"""

__version__ = "0.1.0"
