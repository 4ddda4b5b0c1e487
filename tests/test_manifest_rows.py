"""The manifest's rows are converted to Arrow batch by batch (shards/manifest.py): a set of more
rows than one batch holds reads back every row once, in key order, as a single conversion gives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from medfm.shards import Manifest, Sample, ShardSetWriter
from medfm.shards.manifest import ROWS_PER_BATCH, rows_to_table
from medfm.shards.schema import MANIFEST_SCHEMA


def test_rows_of_several_batches_read_back_in_key_order(tmp_path):
    n = ROWS_PER_BATCH + 5
    order = np.random.default_rng(0).permutation(n)  # written out of key order
    with ShardSetWriter(str(tmp_path / "set")) as w:
        for i in order:
            w.write(Sample(
                key=f"s-{i:06d}", kind="image2d", modality="DX", dataset="tiny",
                patient_id=f"p{i % 97}", split="train", data=np.full((2, 2), i % 256, np.uint8),
                labels={"label": int(i % 2)},
            ))  # fmt: skip
        w.close()
    m = Manifest.open(str(tmp_path / "set"))
    rows = m.table.to_pylist()
    assert [r["key"] for r in rows] == [f"s-{i:06d}" for i in range(n)]
    assert rows_to_table(rows).equals(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
    assert rows_to_table([]).num_rows == 0
