"""The Task protocol and the task registry.

A Task is a source of `Problem`s with a fixed held-out split that never overlaps its training
problems. How a problem is graded travels with the problem itself (`Problem.answer_style`), so
rewards stay pure functions of (completion, problem).
"""
from __future__ import annotations

import importlib
import random
from typing import Any, Callable, Protocol, runtime_checkable

from r1kit.types import Problem, R1KitError


@runtime_checkable
class Task(Protocol):
    name: str

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        """`n` training problems drawn with `rng` (never one of `test_problems()`)."""
        ...

    def test_problems(self) -> list[Problem]:
        """The fixed held-out problems, in a stable order."""
        ...


TASKS: dict[str, Callable[..., Task]] = {}

# Modules that register tasks when imported; imported lazily so `import r1kit` stays light.
_TASK_MODULES = ("r1kit.tasks.arithmetic", "r1kit.tasks.countdown", "r1kit.tasks.files", "r1kit.tasks.humaneval",
                 "r1kit.tasks.code_synth")


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    def deco(factory: Callable[..., Task]) -> Callable[..., Task]:
        TASKS[name] = factory
        return factory

    return deco


def make_task(name: str, /, **kwargs: Any) -> Task:
    for mod in _TASK_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a task module not written yet must not break the others
            if e.name != mod:
                raise
    if name not in TASKS:
        raise R1KitError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    try:
        return TASKS[name](**kwargs)
    except TypeError as e:
        raise R1KitError(f"task {name!r}: bad options {kwargs}: {e}") from e


def distinct_train_problems(task: Task, n: int, rng: random.Random, max_rounds: int = 20) -> list[Problem]:
    """`n` training problems with distinct ids (an evaluation scores each problem once).

    Tasks draw with replacement, so a draw can repeat a problem (a small task's train split makes it
    likely: `code_synth` has ~600 functions). Repeats are dropped and the draw topped up from the same
    `rng`; a first draw without repeats is returned as is (same problems as `task.train_problems`).
    Fewer than `n` come back only when the train split has fewer distinct problems.
    """
    out: list[Problem] = []
    seen: set[str] = set()
    for _ in range(max_rounds):
        for p in task.train_problems(n - len(out), rng):
            if p.id not in seen:
                seen.add(p.id)
                out.append(p)
        if len(out) >= n:
            break
    return out
