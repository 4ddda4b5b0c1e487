"""The medfm command a launcher runs: `medfm pretrain ...` or just `pretrain ...` after `--`."""

from __future__ import annotations

import shlex
from pathlib import Path


def normalize_command(command: list[str]) -> list[str]:
    """Accept `medfm pretrain ...` or `pretrain ...`; always return `["medfm", ...]`."""
    if not command:
        raise ValueError("no command given: put the medfm command after `--`")
    if Path(command[0]).name == "medfm":
        return ["medfm", *command[1:]]
    return ["medfm", *command]


def stage_of(command: list[str]) -> str:
    """The medfm sub-command (`ingest`, `pretrain`, ...) of a command."""
    args = normalize_command(command)[1:]
    if not args:
        raise ValueError("no medfm sub-command given (e.g. `-- medfm ingest spec.yaml ...`)")
    return args[0]


def runs_on_ray(command: list[str]) -> bool:
    """Ingest and synthetic generation spread their work as Ray tasks, and the demo drives its
    stages on a Ray cluster (medfm/demo/cluster.py); the rest is Lightning."""
    args = normalize_command(command)[1:]
    return args[:1] in (["ingest"], ["demo"]) or args[:2] == ["synth", "generate"]


def needs_ray_address(command: list[str]) -> bool:
    """Ray stages must join the launcher's cluster rather than start a private local Ray."""
    args = normalize_command(command)[1:]
    has_address = any(a == "--address" or a.startswith("--address=") for a in args)
    return runs_on_ray(command) and not has_address


def with_layout(
    command: list[str], nodes: int, tasks_per_node: int, gpus_per_node: int
) -> list[str]:
    """Tell `medfm pretrain` the node/device layout SLURM gives it (Lightning refuses a mismatch).

    Only what the config defaults (`num_nodes=1`, `devices=auto`: every visible GPU, or 1 on
    CPU) would get wrong is added, and nothing the command already sets."""
    command = normalize_command(command)
    if stage_of(command) != "pretrain":
        return command
    wanted = {
        "num_nodes": nodes if nodes > 1 else None,
        "devices": tasks_per_node if tasks_per_node != max(gpus_per_node, 1) else None,
    }
    extra = [
        f"train.{key}={value}"
        for key, value in wanted.items()
        if value is not None and not any(a.startswith(f"train.{key}=") for a in command)
    ]
    return command + extra


# Sub-commands whose copies cooperate when a launcher starts several: Lightning reads the ranks
# from the launcher (srun, torchrun), splits the data between them and only rank 0 writes the
# run's outputs. Every other command is a single writer: run N times, N processes write the same
# outputs (16 `medfm demo`s into one folder). `finetune` is one plain process per run: it has no
# ranks, so its copies would overwrite each other's checkpoint and metrics.
MULTI_PROCESS_SAFE = {"pretrain"}
COMMAND_GROUPS = {"synth", "shards", "hub", "finetune"}  # named with their sub-command


class SingleWriterRefused(ValueError):
    """A launch that would start several independent copies of a single-writer command."""


def check_copies(command: list[str], copies: int, layout: str) -> None:
    """Refuse `copies` > 1 processes of a single-writer `command`; `layout` says where the
    copies come from (e.g. "4 node(s) x 8 task(s)") for the message."""
    stage = stage_of(command)
    if copies <= 1 or stage in MULTI_PROCESS_SAFE:
        return
    words = normalize_command(command)[:3]
    if len(words) == 3 and (stage not in COMMAND_GROUPS or words[2].startswith("-")):
        words = words[:2]
    name = shlex.join(words)
    if runs_on_ray(command):
        instead = (
            "run it once as the driver of a Ray cluster: `medfm launch slurm --template ray` "
            "(the default for this command) starts Ray on every node and runs one "
            f"`{name} ... --address HEAD`; on a running Ray cluster use `medfm launch ray`"
        )
    else:
        instead = "launch one copy (`--nodes 1 --tasks-per-node 1`)"
    raise SingleWriterRefused(
        f"`{name}` would start {copies} independent copies ({layout}), each writing the same "
        f"outputs; it is a single-writer command (only `medfm pretrain` runs as cooperating "
        f"ranks). Instead, {instead}."
    )
