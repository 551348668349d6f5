"""Tasks: what each head predicts, its loss and its split-level metrics. See docs/tasks.md."""
from mtl.tasks.base import TASKS, Task, create_task, task_from_config
from mtl.tasks import dense, image  # noqa: F401  (registers the built-in tasks)
from mtl.tasks.dense import DepthTask, EdgesTask, NormalsTask, SemSegTask
from mtl.tasks.image import ClassificationTask, RegressionTask

__all__ = ["TASKS", "Task", "create_task", "task_from_config", "ClassificationTask", "RegressionTask", "SemSegTask",
           "DepthTask", "NormalsTask", "EdgesTask"]
