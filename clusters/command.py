"""The medfm command a launcher runs: `medfm pretrain ...` or just `pretrain ...` after `--`."""

from __future__ import annotations

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
    """Ingest and synthetic generation spread their work as Ray tasks; the rest is Lightning."""
    args = normalize_command(command)[1:]
    return args[:1] == ["ingest"] or args[:2] == ["synth", "generate"]


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
