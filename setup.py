"""Map the stage folders at the repository root onto the `medfm.*` namespace.

The repository root is the `medfm` package itself (its `__init__.py` and `cli.py` sit at the top),
so `ingest/` installs as `medfm.ingest`, `shards/` as `medfm.shards`, and so on. No top-level
`ingest`, `shards`, `synth` or `finetune` package is ever installed: those names belong to others
on PyPI. Sub-packages are found automatically so that a new `models/` folder needs no edit here.
"""

from setuptools import find_packages, setup

STAGES = ["ingest", "shards", "pretrain", "synth", "finetune", "clusters"]

packages = ["medfm"]
for stage in STAGES:
    packages.append(f"medfm.{stage}")
    packages += [f"medfm.{stage}.{sub}" for sub in find_packages(stage)]

setup(
    packages=packages,
    package_dir={"medfm": "."},
    package_data={
        "medfm.clusters": ["**/*.yaml", "**/*.sh", "**/*.sbatch", "**/*.j2"],
        "medfm.ingest": ["specs/*.yaml"],
        "medfm.pretrain": ["configs/*.yaml"],
        "medfm.finetune": ["configs/*.yaml"],
        "medfm.synth": ["configs/*.yaml"],
    },
)
