"""`medfm shards stats` and `ls`: what a shard set holds, read from the manifest alone."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from .manifest import Manifest


def label_names(labels_json: str) -> list[str]:
    """Flatten a row's labels into `name=value` strings for counting (lists count each item)."""
    out = []
    for name, value in json.loads(labels_json).items():
        values = value if isinstance(value, list) else [value]
        out += [f"{name}={v}" for v in values if isinstance(v, (str, int, float, bool))]
    return out


def stats(m: Manifest) -> dict[str, Any]:
    """Counts per dataset, kind, modality, split and label, plus stored bytes."""
    rows = list(m.rows())
    count = {col: Counter(r[col] for r in rows) for col in ("dataset", "kind", "modality", "split")}
    labels = Counter(name for r in rows for name in label_names(r["labels"]))
    return {
        "samples": len(rows),
        "patients": len({r["patient_id"] for r in rows}),
        "synthetic": sum(r["synthetic"] for r in rows),
        "payload_bytes": sum(r["nbytes"] for r in rows),
        "file_bytes": sum(f["bytes"] for f in m.header["files"].values()),
        **{f"by_{col}": dict(sorted(c.items())) for col, c in count.items()},
        "by_label": dict(sorted(labels.items())),
        "schema_version": m.schema_version,
        "medfm_version": m.header.get("medfm_version"),
    }


LS_COLUMNS = ("key", "dataset", "kind", "modality", "split", "shape", "dtype", "shard")


def ls_rows(
    m: Manifest,
    *,
    split: str | None = None,
    kind: str | None = None,
    dataset: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    out = []
    for r in m.rows():
        if (
            (split and r["split"] != split)
            or (kind and r["kind"] != kind)
            or (dataset and r["dataset"] != dataset)
        ):
            continue
        out.append({c: r[c] for c in LS_COLUMNS})
        if limit and len(out) >= limit:
            break
    return out
