"""The `.json` member beside a tar sample is spliced from the row's encoded JSON columns: it
must be, byte for byte, the canonical JSON of the row's metadata decoded, whatever the fields
hold (unicode, escapes, a field that holds the splice's own marker text)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medfm.shards.schema import (
    JSON_COLUMNS,
    LOCATION_FIELDS,
    JSONText,
    Sample,
    row_metadata_json,
    sample_row,
    to_json,
)


def _decoded_metadata(row: dict) -> str:
    """What the member held before the splice: the row minus locations, JSON decoded."""
    out = {k: v for k, v in row.items() if k not in LOCATION_FIELDS}
    for col in JSON_COLUMNS:
        if col in out:
            out[col] = json.loads(out[col])
    return to_json(out)


def _sample(**over) -> Sample:
    base = dict(key="k1", kind="signal", modality="ECG", dataset="d", patient_id="p",
                split="train", data=np.zeros((2, 8), np.float32), sampling_rate=500.0,
                channels=("I", "II"), labels={"beats": [1, 2]}, meta={"x": "\t\"q\""},
                provenance={"settings": {"a": [1, 2.5], "é": "ü\n"}})  # fmt: skip
    base.update(over)
    return Sample(**base)


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"meta": {"ü": "\u2028 \\ /"}, "labels": {}},
        {"patient_id": "\0meta\0"},  # a plain field holding the marker: the splice backs off
        {"meta": {"note": "\0provenance\0"}},  # an encoded column holding another's marker
        {"provenance": JSONText(to_json({"z": 1, "a": {"b": None}}))},
    ],
)
def test_spliced_member_equals_canonical_json_of_the_decoded_row(over):
    row = sample_row(_sample(**over), storage="tar", shard="", member="", members={},
                     sha256="", nbytes=0)  # fmt: skip
    assert row_metadata_json(row) == _decoded_metadata(row)


def test_jsontext_is_stored_as_it_is():
    text = JSONText(to_json({"b": 1, "a": [1, 2]}))
    assert to_json(text) == '{"a":[1,2],"b":1}'
    assert to_json(str(text)) == json.dumps(str(text))  # a plain str is a JSON string
