"""medfm: a data-centric pretraining pipeline for medical foundation models.

This folder holds the package root and the shared core (configs, registries, I/O, models, the
demo); each stage folder at the repository root (`ingest/`, `shards/`, `pretrain/`, `synth/`,
`finetune/`, `clusters/`) installs as `medfm.<stage>`. See docs/architecture.md.
"""

__version__ = "0.1.0"
