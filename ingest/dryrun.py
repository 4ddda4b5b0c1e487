"""`medfm ingest SPEC --out DEST --dry-run`: what a job would do, with nothing written.

Discovery, header scans and grouping run exactly as in a job (scans as Ray tasks: grouping a
DICOM series needs its headers), then the plan is reported: items per source, format and
modality, the inputs that would be quarantined and why, and the conversion tasks. No pixel is
decoded, and neither the destination nor its bookkeeping is touched, so a spec can be tried on
a PACS export before anything is committed to disk.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .job import discover, needs_stats_pass, plan_tasks, ray_runtime
from .privacy import Keyring
from .spec import IngestSpec


def dry_run(
    spec: IngestSpec,
    *,
    address: str | None = None,
    workers: int | None = None,
    keyring: Keyring | None = None,
) -> dict[str, Any]:
    """The plan of a job for `spec`, as a JSON-ready dict."""
    keyring = keyring or Keyring.load(spec.deid.key_file or None)
    with ray_runtime(address, workers) as ray:
        items, bad, n_files = discover(spec, keyring, ray)
    tasks = plan_tasks(items, spec)
    groups: Counter[tuple[str, str, str, str]] = Counter()
    for it in items:
        modality = it.info.get("modality") or spec.source(it.source).modality or "auto"
        groups[it.source, it.format, str(it.info.get("kind", "item")), modality] += 1
    reasons = Counter((q["source"], q["reason"]) for q in bad)
    return {
        "files": n_files,
        "items": len(items),
        "groups": [
            {"source": s, "format": f, "kind": k, "modality": m, "items": n}
            for (s, f, k, m), n in sorted(groups.items())
        ],
        "quarantine": [
            {"source": s, "reason": r, "files": n} for (s, r), n in sorted(reasons.items())
        ],
        "tasks": len(tasks),
        "input_bytes": sum(t.nbytes for t in tasks),
        "ct_statistics_pass": needs_stats_pass(spec),
        "limits": {s.name: s.limit for s in spec.sources if s.limit is not None},
    }


def describe(plan: dict[str, Any]) -> str:
    """The plan as the lines `--dry-run` prints."""
    lines = [f"[dry-run] {plan['files']} files -> {plan['items']} items"]
    for g in plan["groups"]:
        lines.append(f"  {g['source']}: {g['items']} x {g['format']} {g['kind']} ({g['modality']})")
    n_bad = sum(q["files"] for q in plan["quarantine"])
    lines.append(f"[dry-run] {n_bad} inputs would be quarantined")
    for q in plan["quarantine"]:
        lines.append(f"  {q['source']}: {q['files']} x {q['reason']}")
    stats = ", then a CT statistics pass" if plan["ct_statistics_pass"] else ""
    lines.append(
        f"[dry-run] plan: {plan['tasks']} conversion tasks over "
        f"{plan['input_bytes'] / 1e6:.1f} MB of input{stats}; nothing was written"
    )
    for source, n in plan["limits"].items():
        lines.append(f"  {source}: limited to its first {n} items")
    return "\n".join(lines)
