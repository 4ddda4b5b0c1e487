"""The model card: a Hugging Face README.md with YAML front matter, written from medfm.json."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from .tasks import Task


def _fmt(m: dict[str, Any]) -> str:
    return f"{m['value']:.4f} ({m['ci_low']:.4f} - {m['ci_high']:.4f})"


def _source_line(name: str, src: dict[str, Any]) -> str:
    """One bullet per shard set: manifest hash, size, datasets and their licences."""
    datasets = src.get("datasets", {})
    described = ", ".join(
        f"{d} ({info.get('licence', 'licence not recorded') if isinstance(info, dict) else info})"
        for d, info in datasets.items()
    )
    return (
        f"- `{name}`: manifest sha256 `{src['manifest_sha256']}`, {src['num_samples']} samples;"
        f" datasets: {described or 'not recorded'}"
    )


def base_model(uri: str) -> dict[str, str]:
    """The card's `base_model`: a hub reference only. A path (relative to the export, never
    absolute) means nothing to a reader of the card, so it is named in the text alone."""
    return {"base_model": uri.removeprefix("hub://")} if "://" in uri else {}


def model_card(meta: dict[str, Any], task: Task) -> str:
    """The card of an export's `meta` (medfm.json); `task` (its Task) gives the task fields."""
    metrics = meta["metrics"]
    values = metrics["values"]
    licences = sorted(
        {
            str(d.get("licence", ""))
            for src in meta["data"].values()
            for d in src.get("datasets", {}).values()
            if isinstance(d, dict)
        }
        - {""}
    )
    front = {
        "library_name": "peft" if meta["mode"] == "lora" else "medfm",
        **base_model(meta["base_encoder"]["uri"]),
        "tags": ["medfm", "medical-imaging", meta["mode"], task.name],
        "pipeline_tag": task.pipeline_tag,
        "license": licences[0] if len(licences) == 1 else "other",
        "model-index": [
            {
                "name": meta["name"],
                "results": [
                    {
                        "task": {"type": task.name},
                        "dataset": {
                            "name": ", ".join(meta["data"]),
                            "type": "medfm-shards",
                            "split": "test",
                        },
                        "metrics": [
                            {"type": k, "value": round(v["value"], 6)} for k, v in values.items()
                        ],
                    }
                ],
            }
        ],
    }
    ci = int(round(100 * metrics["ci"]))
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in values.items())
    sources = "\n".join(_source_line(name, src) for name, src in meta["data"].items())
    pre = meta["preprocessing"]
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {meta["name"]}

A {task.name} model fine-tuned with medfm ({meta["mode"].replace("_", " ")}) on base encoder
`{meta["base_encoder"]["uri"]}` (weights sha256 `{meta["base_encoder"]["sha256"]}`).
Labels: {", ".join(meta["label_names"]) or "n/a"}.

## Intended use and limits

For research and for validation by qualified staff on data like the training data below. It is
not a medical device and must not be used for diagnosis without local clinical validation. Its
figures hold only for the input distribution it was evaluated on; scanners, sites, populations and
preprocessing other than the contract below may degrade it without warning.

## Preprocessing contract

Kind `{pre.get("kind")}`, intensity `{pre.get("intensity")}` (window {pre.get("window")}),
{pre.get("channels")} channel(s), input size {pre.get("image_size") or pre.get("patch_size")}.
Load with `medfm.finetune.load(DIR)`, which applies the adapter to the base encoder above and
refuses any other base encoder.

## Training data provenance and licences

{sources}

De-identification: training data entered medfm as shard sets, whose ingest removes direct
identifiers and replaces patient ids with pseudonyms; no PHI is stored in the shards, manifests or
this export.

Splits are patient-level: the train, validation and test splits come from the shard manifest,
where every patient belongs to exactly one split. The model was selected on validation only; the
test split was evaluated once, at the end.

## Evaluation (test split)

Point estimates with {ci}% confidence intervals from a patient-level bootstrap
({metrics["bootstrap"]} resamples of patients).

| metric | value ({ci}% CI) |
|---|---|
{rows}
"""
