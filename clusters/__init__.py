"""Launch configs and the `medfm launch` command for Ray, KubeRay, SLURM and torchrun."""
