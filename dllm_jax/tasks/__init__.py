"""Tasks with strong token dependencies (after ParallelBench, arXiv 2510.04767).

Each task is a frozen :class:`Task` with a seeded generator and an exact scorer::

    from dllm_jax.tasks import get_task
    task = get_task("shuffle")
    inst = task.generate(0, 100, split="test")              # seed 0 -> list[Instance]
    task.score(inst[0], "Zoe Eve Bob")                     # -> Score(valid, exact, partial)

``TASKS`` maps names to tasks; ``dependency`` is 'low' | 'medium' | 'high'. The task
tokenizer lives in :mod:`dllm_jax.tasks.vocab` (``build_task_tokenizer(out_dir)``).

``TASKS_V2`` (``get_task_v2``) holds the v2 tasks: answers of 64-256 tokens at the default
difficulty, in four categories (lists, reasoning, puzzles, text), and a held-out split that is
disjoint from training by prompt AND by answer text (:mod:`dllm_jax.tasks.v2_base`). A v2
instance drawn with ``task._sample`` belongs to ``task.split_of_instance(inst)`` ('train',
'test' or None); :func:`split_of_any` answers for either kind of task.
"""

from __future__ import annotations

from .arithmetic import ADD, AdditionTask
from .base import DEPENDENCY_LEVELS, Instance, Score, Task, split_of
from .lists import LIST_TASKS, NAMES, ListTask
from .puzzles import LATIN, SUDOKU, GridTask
from .text import WORDS_TO_SENTENCE, WordsToSentenceTask, is_sentence
from .v2_base import CATEGORIES, TaskV2, answer_split, split_of_v2
from .v2_lists import LIST_TASKS_V2
from .v2_puzzles import PUZZLE_TASKS_V2
from .v2_reasoning import REASONING_TASKS
from .v2_text import TEXT_TASKS_V2

TASKS: dict[str, Task] = {
    **LIST_TASKS,
    LATIN.name: LATIN,
    SUDOKU.name: SUDOKU,
    ADD.name: ADD,
    WORDS_TO_SENTENCE.name: WORDS_TO_SENTENCE,
}


#: The v2 tasks (long answers); kept apart from ``TASKS``, which the bundled model was trained on.
TASKS_V2: dict[str, TaskV2] = {
    **LIST_TASKS_V2,
    **REASONING_TASKS,
    **PUZZLE_TASKS_V2,
    **TEXT_TASKS_V2,
}
assert not set(TASKS) & set(TASKS_V2), "v1 and v2 task names must differ"

#: The task sets by name (`TrainConfig.task_set`, `dllm-jax bench quality --task-set`).
TASK_SETS: dict[str, dict[str, Task]] = {"v1": TASKS, "v2": TASKS_V2}


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown task {name!r}; valid tasks: {', '.join(TASKS)}.") from None


def get_task_v2(name: str) -> TaskV2:
    """The v2 task called ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    try:
        return TASKS_V2[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown v2 task {name!r}; valid v2 tasks: {', '.join(TASKS_V2)}.") from None


def split_of_any(task: Task, instance: Instance) -> str | None:
    """The split of an instance of a v1 or v2 task: 'train', 'test' or None (v2 only: in no
    split). v1 tasks split by prompt (:func:`split_of`), v2 tasks by
    :meth:`TaskV2.split_of_instance`."""
    return task.split_of_instance(instance)


def tasks_v2_by_dependency(level: str) -> list[TaskV2]:
    """The v2 tasks tagged with dependency ``level`` ('low', 'medium' or 'high')."""
    if level not in DEPENDENCY_LEVELS:
        raise ValueError(f"level must be one of {DEPENDENCY_LEVELS}, got {level!r}.")
    return [t for t in TASKS_V2.values() if t.dependency == level]


def tasks_by_dependency(level: str) -> list[Task]:
    """The tasks tagged with dependency ``level`` ('low', 'medium' or 'high')."""
    if level not in DEPENDENCY_LEVELS:
        raise ValueError(f"level must be one of {DEPENDENCY_LEVELS}, got {level!r}.")
    return [t for t in TASKS.values() if t.dependency == level]


__all__ = [
    "TASKS", "get_task", "tasks_by_dependency", "Task", "Instance", "Score", "split_of", "DEPENDENCY_LEVELS",
    "ListTask", "GridTask", "AdditionTask", "WordsToSentenceTask", "is_sentence", "NAMES",
    "LIST_TASKS", "LATIN", "SUDOKU", "ADD", "WORDS_TO_SENTENCE",
    "TASKS_V2", "get_task_v2", "tasks_v2_by_dependency", "split_of_any", "split_of_v2", "answer_split", "TaskV2",
    "CATEGORIES", "TASK_SETS",
]
