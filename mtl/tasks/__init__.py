from mtl.tasks.base import TASKS, Task, create_task  # noqa: F401
