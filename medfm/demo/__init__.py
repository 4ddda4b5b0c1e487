"""`medfm demo`: the main job end to end on embedded defaults; see `job.py` for the stages."""

from .job import run_demo

__all__ = ["run_demo"]
