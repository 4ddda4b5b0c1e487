"""`generate --audit`: generate into a staging set, audit it, publish only unflagged samples.

Flagged samples never reach the output's tar shards (not merely its manifest): the staging
folder, named with the temporary marker so a killed run's leftovers are cleaned up, is deleted
after the unflagged samples are copied. The output header records what was withheld and why.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Any

from medfm.io import TMP_MARKER, get_fs, write_json
from medfm.shards import SampleWriter, ShardSet, write_manifest

from .audit import AuditConfig, audit
from .generate import (
    GenerateOptions,
    generate_samples,
    load_generator,
    prepare_out,
    synthetic_attributes,
)


def training_shards(model: str) -> str:
    """The real shard set a model was trained on, from its sidecar."""
    manifests = load_generator(model).sidecar.get("data_manifests", [])
    if not manifests or not manifests[0].get("root"):
        raise ValueError(f"{model}: its sidecar names no training shards; pass --real")
    return manifests[0]["root"]


def generate_audited(
    model: str, out: str, opts: GenerateOptions, real: str | None, cfg: AuditConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Generate, audit, withhold flagged samples; returns (output header, audit report)."""
    real = real or training_shards(model)
    prepare_out(out, opts.overwrite)
    staging = f"{out.rstrip('/')}/staging{TMP_MARKER}{uuid.uuid4().hex[:8]}"
    fs, staging_path = get_fs(staging)
    try:
        loaded, rows, files = generate_samples(model, staging, replace(opts, overwrite=False))
        attributes = synthetic_attributes(loaded, opts)
        write_manifest(staging, rows, files, attributes=attributes)
        # Every sample must be judged: none may pass unaudited because of a subsample cap.
        cfg = replace(cfg, max_synthetic=max(cfg.max_synthetic, len(rows)))
        report = audit(staging, real, f"{out.rstrip('/')}/audit", cfg)
        flagged = set(report["memorization"]["flagged_keys"])
        src = ShardSet(staging)
        writer = SampleWriter(out, f"synth-{uuid.uuid4().hex[:6]}")
        withheld = []
        for row in src.rows():
            if row["key"] in flagged:
                withheld.append({"key": row["key"], "seed": json.loads(row["meta"])["seed"]})
            else:
                writer.write(src.read_sample(row))
        kept_rows, kept_files = writer.close()
    finally:
        if fs.exists(staging_path):
            fs.rm(staging_path, recursive=True)
    attributes["synthetic"]["audit"] = {
        "verdict": report["verdict"],
        "withheld": len(withheld),
        "withheld_samples": withheld,
        "report": "audit/report.json",
        "feature_space": report["fidelity"]["feature_space"],
    }
    report["synthetic"] = out
    report["withheld"] = withheld
    write_json(f"{out.rstrip('/')}/audit/report.json", report, indent=1, default=float)
    c = loaded.contract
    datasets = {f"{c['dataset']}-synthetic": {"synthetic": True, "generator": loaded.sha256}}
    header = write_manifest(out, kept_rows, kept_files, datasets=datasets, attributes=attributes)
    return header, report
