"""Training on the v2 tasks: pools hold train-split instances only (by prompt and answer),
the task set is validated and recorded, the v2 sequence layout defaults are derived."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dllm_jax.cli import main
from dllm_jax.tasks import TASKS_V2, split_of_any
from dllm_jax.train import TrainConfig, TrainError
from dllm_jax.train.cli import v2_lengths
from dllm_jax.train.data import part_instances


def test_v2_pool_instances_are_train_split_and_disjoint_from_test() -> None:
    for name in ("riffle", "add_steps", "record"):
        task = TASKS_V2[name]
        train = part_instances(name, 0, 0, 60, task_set="v2")
        assert len(train) == 60
        assert all(split_of_any(task, i) == "train" for i in train)
        test = task.generate(7, 60, split="test")
        assert not {i.answer for i in train} & {i.answer for i in test}
        assert not {i.prompt for i in train} & {i.prompt for i in test}


def test_task_set_is_validated_and_selects_the_registry() -> None:
    with pytest.raises(TrainError, match="--task-set v2"):
        TrainConfig(task_set="v3")
    assert TrainConfig(task_set="v2").task_names == tuple(TASKS_V2)
    with pytest.raises(TrainError, match="unknown v2 tasks"):
        TrainConfig(task_set="v2", tasks=("sort",)).task_names  # a v1 task


def test_v2_lengths_cover_every_task() -> None:
    prompt, answer = v2_lengths()
    assert answer % 32 == 0
    assert prompt >= max(t.max_prompt_tokens() for t in TASKS_V2.values())
    assert answer >= 1 + max(t.max_answer_tokens() for t in TASKS_V2.values())
    assert v2_lengths(("record",))[1] <= answer


def test_train_cli_v2_records_the_task_set(tmp_path: Path) -> None:
    out = tmp_path / "m"
    rc = main(["train", "--out", str(out), "--model-size", "tiny", "--task-set", "v2",
               "--tasks", "record,add_steps", "--steps", "4", "--batch-size", "4",
               "--pool-size", "16", "--log-every", "2", "--ckpt-every", "4", "--warmup", "1"])
    assert rc == 0
    record = json.loads((out / "train_config.json").read_text())
    assert record["train"]["task_set"] == "v2"
    assert record["train"]["answer_length"] % 32 == 0
    assert record["model"]["max_position"] == (record["train"]["prompt_length"]
                                               + record["train"]["answer_length"])
