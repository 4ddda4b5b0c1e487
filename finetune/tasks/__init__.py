"""Fine-tuning tasks behind one registry (`TASKS`, plug-in group `medfm.tasks`).

`task.type` in a fine-tuning config names the task; `task_for(cfg.task)` returns it. To add
one: write a module here with a `Task` subclass (`SampleTask` for one target per sample) and
`@TASKS.register("name")` on it, and import it below; see docs/finetune.md, "Adding a task".
"""

from . import classification, multilabel, regression, segmentation  # noqa: F401  (registers)
from .base import TASKS, LabelError, SampleTask, Task, task_for

__all__ = ["TASKS", "LabelError", "SampleTask", "Task", "task_for"]
