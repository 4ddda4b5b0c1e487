"""One DDP rank for tests/test_readers_dataset.py: a real gloo process group, a real DataLoader
with workers, over each shard set given. Every batch is followed by an all_reduce, so a rank
with fewer batches than the other would hang (and the test's timeout would fail it)."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from medfm.shards import ShardDataLoader, ShardDataset


def epoch_batches(root: str, batch_size: int, num_workers: int) -> dict:
    loader = ShardDataLoader(
        ShardDataset(root, seed=3, buffer_size=8), batch_size, num_workers=num_workers
    )
    batches = []
    for batch in loader:
        n = torch.tensor([len(batch["key"])])
        dist.all_reduce(n)
        batches.append(batch["key"])
    return {"len": len(loader), "batches": batches}


def main(out: str, batch_size: int, num_workers: int, roots: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = {root: epoch_batches(root, batch_size, num_workers) for root in roots}
    dist.barrier()
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
