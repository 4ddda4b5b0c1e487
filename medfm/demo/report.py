"""The demo's summary table (stdout) and `report.html`, which links the PNGs the stages wrote.

The HTML is one self-contained page with relative links, so the output folder can be copied or
served as it is. Only pseudonymous keys and aggregate figures appear in it.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medfm.io import write_text

COLUMNS = ("stage", "wall s", "items", "key metric")


def table_lines(rows: Sequence[Any], total_s: float) -> list[str]:
    """Fixed-width lines: stage, wall time, items, key metric; the total last."""
    w = max(len(r.stage) for r in rows) + 2
    lines = [f"{COLUMNS[0]:<{w}}{COLUMNS[1]:>8}  {COLUMNS[2]:<22}{COLUMNS[3]}"]
    for r in rows:
        wall = "-" if r.status == "skipped" else f"{r.wall_s:.1f}"
        lines.append(f"{r.stage:<{w}}{wall:>8}  {r.items:<22}{r.metric}")
    lines.append(f"{'total':<{w}}{total_s:>8.1f}")
    return lines


def print_table(rows: Sequence[Any], total_s: float) -> None:
    print("\n" + "\n".join(table_lines(rows, total_s)))


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _stages_html(stages: list[dict[str, Any]], total_s: float) -> str:
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = []
    for s in stages:
        wall = "-" if s["status"] == "skipped" else f"{s['wall_s']:.1f}"
        cls = ' class="skipped"' if s["status"] == "skipped" else ""
        body.append(
            f"<tr{cls}><td>{_esc(s['stage'])}</td><td class=num>{wall}</td>"
            f"<td>{_esc(s['items'])}</td><td>{_esc(s['metric'])}</td></tr>"
        )
    body.append(f"<tr><th>total</th><td class=num>{total_s:.1f}</td><td></td><td></td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _audit_html(audit: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_esc(c['name'])}</td><td class=num>{c['value']:.4g}</td>"
        f"<td>{'pass' if c['pass'] else 'FAIL'}</td></tr>"
        for c in audit["checks"]
    )
    return (
        f"<p>Audit verdict: <b>{_esc(audit['verdict'])}</b>, with the shipped thresholds "
        "(<code>configs/synth_audit.yaml</code>). The diffusion model trained for minutes on a "
        "CPU: a failed check means its samples are not fit to mix into training yet.</p>"
        f"<table><tr><th>check</th><th>value</th><th>result</th></tr>{rows}</table>"
    )


def _ci(m: dict[str, float]) -> str:
    return f"<b>{m['value']:.3f}</b> (95% CI {m['ci_low']:.3f} to {m['ci_high']:.3f})"


def _ecg_html(m: dict[str, Any]) -> str:
    c = m["counts"]
    return (
        "<p>Normal vs non-normal beats of MIT-BIH record 100 (its beat annotations, stored with "
        "each 10 s window), a logistic-regression probe on the frozen 1D MAE's tokens around "
        "each beat. Split in time: windows starting in the record's last 40% are the test set, "
        f"those within 30 s of the cut are left out. Test AUROC {_ci(m['auroc'])}, balanced "
        f"accuracy {_ci(m['balanced_accuracy'])}, on {c['test']} beats ({c['test_positive']} "
        f"non-normal) in {c['test_clusters']} windows; the bootstrap resamples windows. Trained "
        f"on {c['train']} beats ({c['train_positive']} non-normal). The MAE itself saw the whole "
        "record without labels (one record, one patient).</p>"
    )


def _ehr_html(m: dict[str, Any]) -> str:
    c = m["counts"]
    return (
        "<p>30-day readmission, computed from the tokens themselves: for each discharge alive, "
        "does another admission follow within 30 days? A logistic-regression probe on the "
        "frozen masked-code encoder's mean output over the last 256 tokens up to the discharge. "
        f"Patient-level split: the ingest's train patients train the probe ({c['train']} "
        f"discharges, {c['train_positive']} readmitted); its val and test patients, never seen "
        f"in pretraining, test it. Test AUROC {_ci(m['auroc'])} on {c['test']} discharges of "
        f"{c['test_clusters']} patients ({c['test_positive']} readmitted); the bootstrap "
        "resamples patients. <b>With about 100 patients in the MIMIC-IV demo the interval is "
        "wide: this shows the pipeline end to end, not a usable readmission model.</b></p>"
    )


def _seg_html(m: dict[str, Any]) -> str:
    s = m["slabs"]
    order = sorted(("train", "val", "test"), key=lambda k: s[k][0])
    where = ", ".join(f"{k} j {s[k][0]}&ndash;{s[k][1] - 1}" for k in order)
    return (
        "<p>Liver vs background on the TotalSegmentator CT (122 &times; 101 &times; 30 voxels of "
        "3 mm), a UNETR head on the 3D MAE's encoder, every weight trained, sliding-window "
        f"inference. The one labelled CT is cut into slabs along axis {s['axis']} ({where}; "
        f"{s['gap']} voxels, a patch's extent, left out between neighbours): every training "
        "patch lies inside the train slab, every scored window inside the test slab. The "
        "export was pushed to the demo's hub, pulled back (sha256-verified) and scored there: "
        f"test-slab Dice {_ci(m['dice'])}, NSD (2 mm) {m['nsd']['value']:.3f}, HD95 "
        f"{m['hd95']['value']:.1f} mm. <b>One CT: the interval resamples {m['n_blocks']} axial "
        "blocks of its test slab, so it shows how the figure varies across the slab, not "
        "across patients.</b> The 3D MAE saw the whole CT (and the MR) without labels.</p>"
    )


SECTION_TEXT = {
    "ECG": ("ecg_beats", _ecg_html),
    "EHR": ("ehr_readmission", _ehr_html),
    "3D segmentation": ("segmentation", _seg_html),
}


def _section_text(section: str, summary: dict[str, Any]) -> str:
    if section == "Synthetic data":
        return _audit_html(summary["audit"])
    key, fn = SECTION_TEXT.get(section, ("", None))
    return fn(summary[key]) if fn and key in summary else ""


def write_report(path: Path, summary: dict[str, Any], figures: list[tuple[str, str, Path]]):
    """report.html beside the outputs; figures are (section, caption, png) with png under it."""
    root = path.parent
    sections: dict[str, list[str]] = {}
    for section, caption, png in figures:
        rel = _esc(png.relative_to(root).as_posix())
        sections.setdefault(section, []).append(
            f'<figure><a href="{rel}"><img src="{rel}" alt="{_esc(caption)}"></a>'
            f"<figcaption>{_esc(caption)}<br><code>{rel}</code></figcaption></figure>"
        )
    parts = []
    for section, items in sections.items():
        extra = _section_text(section, summary)
        parts.append(f"<h2>{_esc(section)}</h2>{extra}<div class=figs>{''.join(items)}</div>")
    commands = "\n".join(_esc(c) for c in summary["commands"])
    data = summary["sample_data"] or "unset (pip-shipped files only)"
    mode = "quick (reduced step counts)" if summary["quick"] else "full"
    write_text(
        path,
        f"""<!doctype html>
<html><head><meta charset="utf-8"><title>medfm demo report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 75em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
td.num {{ text-align: right; }} tr.skipped {{ color: #888; }}
.figs {{ display: flex; flex-wrap: wrap; gap: 1.5em; }}
figure {{ margin: 0; }} img {{ max-width: 36em; border: 1px solid #ddd; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
</style></head><body>
<h1>medfm demo</h1>
<p>Mode: {mode}. MEDFM_SAMPLE_DATA: <code>{_esc(data)}</code>.
Output: <code>{_esc(summary["out"])}</code>.</p>
<h2>Stages</h2>
{_stages_html(summary["stages"], summary["total_s"])}
{"".join(parts)}
<h2>Each stage alone</h2>
<p>The demo ran exactly the specs and configs in <code>configs/</code>; edit one and rerun:</p>
<pre>{commands}</pre>
</body></html>
""",
    )
