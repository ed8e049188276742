"""Tasks with strong token dependencies (after ParallelBench, arXiv 2510.04767).

Each task is a frozen :class:`Task` with a seeded generator and an exact scorer::

    from dllm_jax.tasks import get_task
    task = get_task("shuffle")
    inst = task.generate(0, 100, split="test")              # seed 0 -> list[Instance]
    task.score(inst[0], "Zoe Eve Bob")                     # -> Score(valid, exact, partial)

``TASKS`` maps names to tasks; ``dependency`` is 'low' | 'medium' | 'high'. The task
tokenizer lives in :mod:`dllm_jax.tasks.vocab` (``build_task_tokenizer(out_dir)``).
"""

from __future__ import annotations

from .arithmetic import ADD, AdditionTask
from .base import DEPENDENCY_LEVELS, Instance, Score, Task, split_of
from .lists import LIST_TASKS, NAMES, ListTask
from .puzzles import LATIN, SUDOKU, GridTask
from .text import WORDS_TO_SENTENCE, WordsToSentenceTask, is_sentence

TASKS: dict[str, Task] = {
    **LIST_TASKS,
    LATIN.name: LATIN,
    SUDOKU.name: SUDOKU,
    ADD.name: ADD,
    WORDS_TO_SENTENCE.name: WORDS_TO_SENTENCE,
}


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown task {name!r}; valid tasks: {', '.join(TASKS)}.") from None


def tasks_by_dependency(level: str) -> list[Task]:
    """The tasks tagged with dependency ``level`` ('low', 'medium' or 'high')."""
    if level not in DEPENDENCY_LEVELS:
        raise ValueError(f"level must be one of {DEPENDENCY_LEVELS}, got {level!r}.")
    return [t for t in TASKS.values() if t.dependency == level]


__all__ = [
    "TASKS", "get_task", "tasks_by_dependency", "Task", "Instance", "Score", "split_of", "DEPENDENCY_LEVELS",
    "ListTask", "GridTask", "AdditionTask", "WordsToSentenceTask", "is_sentence", "NAMES",
    "LIST_TASKS", "LATIN", "SUDOKU", "ADD", "WORDS_TO_SENTENCE",
]
