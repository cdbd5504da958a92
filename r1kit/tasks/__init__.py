"""Verifiable problem sources. `make_task(name, **kwargs)` builds one from the registry."""
from r1kit.tasks.base import TASKS, Task, make_task, register_task

__all__ = ["TASKS", "Task", "make_task", "register_task"]
