"""The two-node Ray fixture's port plan (tests/clusters_helpers.py), checked without starting
Ray: the exact `ray start` arguments of both nodes, parsed by Ray's own `ray start` command, set
every port option Ray has, and no port or worker range overlaps any other on either node."""

from __future__ import annotations

import random
from itertools import pairwise
from pathlib import Path

from click.core import ParameterSource
from clusters_helpers import allocate_ports, ray_start_args
from ray.scripts.scripts import start as ray_start

# Not ports a node opens: Redis shards are gone from Ray, and a worker port list is the other
# spelling of --min/--max-worker-port.
NOT_OPENED = {"redis_shard_ports", "worker_port_list"}
HEAD_ONLY = {"port"}  # the GCS; Ray refuses it on a worker node


def parsed(args: list[str]):
    """`ray start ARGS` parsed by Ray's click command (nothing is started)."""
    return ray_start.make_context("start", list(args))


def port_options() -> set[str]:
    return {p.name for p in ray_start.params if "port" in p.name} - NOT_OPENED


def cluster_args(seed: int) -> tuple[list[str], list[str]]:
    head, worker = allocate_ports(2, random.Random(seed))
    return ray_start_args(head, worker, Path("/tmp/mray-test"))


def occupied(args: list[str]) -> list[tuple[int, int, str]]:
    """(first, last, what) for every port and the worker range in one node's arguments."""
    ctx = parsed(args)
    params = ctx.params
    spans = [(params["min_worker_port"], params["max_worker_port"], "worker range")]
    singles = port_options() - {"min_worker_port", "max_worker_port"}
    set_here = [n for n in singles if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]
    return spans + [(params[n], params[n], n) for n in set_here]


def test_every_ray_port_option_is_set_explicitly_on_both_nodes():
    head_args, worker_args = cluster_args(0)
    for args, wanted in [(head_args, port_options()), (worker_args, port_options() - HEAD_ONLY)]:
        ctx = parsed(args)
        left_to_ray = {
            n for n in wanted if ctx.get_parameter_source(n) != ParameterSource.COMMANDLINE
        }
        assert not left_to_ray, f"ray start picks these itself: {sorted(left_to_ray)}"
    assert parsed(head_args).params["head"] and not parsed(worker_args).params["head"]


def test_no_port_or_worker_range_overlaps_another_on_either_node():
    for seed in range(200):
        head_args, worker_args = cluster_args(seed)
        spans = sorted(
            [(*s, "head") for s in occupied(head_args)]
            + [(*s, "worker") for s in occupied(worker_args)]
        )
        assert len(spans) == 9 + 8 + 2  # head and worker single ports, two worker ranges
        for before, after in pairwise(spans):
            assert before[1] < after[0], f"seed {seed}: {before} overlaps {after}"
