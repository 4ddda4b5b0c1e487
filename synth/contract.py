"""The preprocessing contract of shard sets, as the audit compares them.

Synthetic shards record the contract of their generator's training data in the header
(`attributes.synthetic.contract`). Auditing them against real shards prepared differently
(another size, dtype, spacing, modality, or declared preprocessing) would compare apples with
pears, so the audit refuses and names every field that differs.
"""

from __future__ import annotations

import json
import math
from typing import Any

from medfm.shards import Manifest

# Fields whose mismatch makes real and synthetic samples incomparable. 3D synthetic samples are
# patches of the training volumes, so `shape` is compared for 2D only.
FIELDS_2D = ("kind", "modality", "shape", "dtype", "spacing", "channels", "declared")
FIELDS_3D = ("kind", "modality", "dtype", "spacing", "channels", "declared")


class ContractMismatchError(ValueError):
    """Synthetic and real shards were prepared under different preprocessing contracts."""


def synthetic_contract(manifest: Manifest) -> dict[str, Any]:
    """The contract a synthetic shard set declares (refuses sets that declare none)."""
    info = manifest.header.get("attributes", {}).get("synthetic")
    if not isinstance(info, dict) or "contract" not in info:
        raise ContractMismatchError(
            f"{manifest.root}: not a synthetic shard set written by `medfm synth generate` "
            "(its header has no attributes.synthetic.contract)"
        )
    return info["contract"]


def observed_contract(manifest: Manifest, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The storage facts of real rows, in the same fields as a recorded contract."""

    def one(col: str) -> Any:
        values = {json.dumps(r[col]) for r in rows}
        return json.loads(values.pop()) if len(values) == 1 else sorted(values)

    return {
        "kind": one("kind"),
        "modality": one("modality"),
        "shape": one("shape"),
        "dtype": one("dtype"),
        "spacing": one("spacing") or [],
        "channels": one("channels") or [],
        "declared": manifest.header.get("attributes", {}).get("preprocessing", {}),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-4)
        except (TypeError, ValueError):
            return False
    return a == b


def check_compatible(synthetic: dict[str, Any], real: dict[str, Any], where: str) -> None:
    """Raise ContractMismatchError naming each differing field, or return."""
    fields = FIELDS_3D if synthetic.get("kind") == "volume3d" else FIELDS_2D
    diffs = [
        f"{f}: synthetic {synthetic.get(f)!r} vs real {real.get(f)!r}"
        for f in fields
        if not _same(synthetic.get(f), real.get(f))
    ]
    if diffs:
        raise ContractMismatchError(
            f"{where}: synthetic and real shards have different preprocessing contracts, so "
            f"their samples are not comparable; refusing to audit. Differences: " + "; ".join(diffs)
        )
