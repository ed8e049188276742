"""Training data: per-task pools of tokenized train-split instances, and the batch of a step.

For each task family a pool of `pool_size` distinct *train-split* instances is drawn
(difficulties mixed as in `TRAIN_MIX`, deterministic from the seed), tokenized and kept on the
device. Batch `s` is a pure function of `(seed, s)`: tasks are drawn uniformly, then an instance
of the task's pool, and the noise from the same key. So a run restarted from a checkpoint sees
the same batches and the same noise as one that was never interrupted.

A training sequence is `[prompt | answer]`: the prompt left-padded with `<pad>` (invisible as a
key) to `prompt_length`, the answer padded with `<eos>` to `answer_length` (the padding is part
of the answer, as in LLaDA's SFT).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dllm_jax.train.config import TrainConfig, TrainError

# Difficulty mixture of the training pools: (weight, knobs) per task; weight 2 on the default
# difficulty (where the held-out evaluation runs), 1 on easier and harder variants.
_LIST_MIX: tuple[tuple[float, dict[str, Any]], ...] = (
    (2.0, {}), (1.0, {"items": "numbers"}), (1.0, {"max_len": 8}),
)
TRAIN_MIX: dict[str, tuple[tuple[float, dict[str, Any]], ...]] = {
    **{name: _LIST_MIX for name in ("copy", "reverse", "sort", "insert", "insert_random", "remove",
                                    "remove_random", "replace", "replace_random", "shuffle")},
    "latin": ((2.0, {}), (1.0, {"blanks": 6}), (1.0, {"blanks": 8}), (1.0, {"blanks": 12})),
    "sudoku": ((2.0, {}), (1.0, {"blanks": 8}), (1.0, {"blanks": 10})),
    "add": ((2.0, {}), (1.0, {"digits": 2, "min_digits": 1}), (1.0, {"digits": 4})),
    "words_to_sentence": ((2.0, {}), (1.0, {"level": "easy"}), (1.0, {"level": "hard"})),
}


@struct.dataclass
class DataPool:
    """Tokenized train instances on the device, one row per task family.

    prompts: int32 `[T, N, P]` left-padded with `<pad>`; answers: int32 `[T, N, A]` padded with
    `<eos>`; counts: int32 `[T]` instances of each task (rows beyond are padding).
    """

    prompts: jax.Array
    answers: jax.Array
    counts: jax.Array


def _task_seed(seed: int, task: str, part: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), int.from_bytes(task.encode(), "little") % (2**63),
                                   int(part)])


def _mix_shares(task_name: str, n: int) -> list[tuple[dict[str, Any], int]]:
    mix = TRAIN_MIX.get(task_name, ((1.0, {}),))
    total = sum(w for w, _ in mix)
    shares = [int(round(n * w / total)) for w, _ in mix]
    shares[0] += n - sum(shares)
    return [(knobs, share) for (_, knobs), share in zip(mix, shares)]


def part_instances(task_name: str, seed: int, part: int, n: int, task_set: str = "v1"
                   ) -> list[Any]:
    """Up to `n` distinct train-split instances of one difficulty part of `TRAIN_MIX` (a pure
    function of its arguments). A small prompt space (e.g. two-digit addition) yields fewer:
    drawing stops after `4 n + 100` tries. v2 tasks split by prompt and answer
    (`tasks.split_of_any`), so no held-out answer is ever trained on."""
    from dllm_jax.tasks import TASK_SETS, split_of_any

    task = TASK_SETS[task_set][task_name]
    knobs = task.difficulty(**_mix_shares(task_name, 1)[part][0])
    rng = np.random.default_rng(_task_seed(seed, task_name, part))
    out: list[Any] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n and tries < 4 * n + 100:
        tries += 1
        inst = task._sample(rng, **knobs)  # the family's generator; the split is filtered here
        if inst.prompt in seen or split_of_any(task, inst) != "train":
            continue
        seen.add(inst.prompt)
        out.append(inst)
    return out


def task_instances(task_name: str, seed: int, n: int, task_set: str = "v1") -> list[Any]:
    """About `n` train-split instances of one task, its difficulty parts in the proportions of
    `TRAIN_MIX` (distinct within a part; deterministic in `(task_name, seed, n)`)."""
    out: list[Any] = []
    for part, (_, share) in enumerate(_mix_shares(task_name, n)):
        out += part_instances(task_name, seed, part, share, task_set)
    return out


def encode_instances(instances: Sequence[Any], prompt_length: int, answer_length: int,
                     backend: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """`(prompts [n, P], answers [n, A])` int32: prompts left-padded with `<pad>`, answers padded
    with `<eos>`; an instance that does not fit raises TrainError."""
    from dllm_jax.tasks.vocab import EOS_ID, PAD_ID, build_backend

    backend = backend or build_backend()
    n = len(instances)
    prompts = np.full((n, prompt_length), PAD_ID, np.int32)
    answers = np.full((n, answer_length), EOS_ID, np.int32)
    enc_p = backend.encode_batch([i.prompt for i in instances], add_special_tokens=False)
    enc_a = backend.encode_batch([i.answer for i in instances], add_special_tokens=False)
    for k, (ep, ea) in enumerate(zip(enc_p, enc_a)):
        p, a = ep.ids, ea.ids
        if len(p) > prompt_length or len(a) > answer_length:
            raise TrainError(
                f"instance {instances[k].prompt!r} -> {instances[k].answer!r} needs {len(p)} prompt "
                f"and {len(a)} answer tokens; raise prompt_length ({prompt_length}) / answer_length "
                f"({answer_length}).")
        prompts[k, prompt_length - len(p):] = p
        answers[k, :len(a)] = a
    return prompts, answers


def _pool_part(args: tuple[str, int, int, int, int, int, str]) -> tuple[np.ndarray, np.ndarray]:
    name, seed, part, n, p, a, task_set = args
    return encode_instances(part_instances(name, seed, part, n, task_set), p, a)


def build_pool(cfg: TrainConfig, workers: int | None = None) -> tuple[DataPool, tuple[str, ...]]:
    """The data pool of a run (deterministic from `cfg.seed`), and its task names in row order.

    `workers` > 1 builds the (task, difficulty part) pieces in that many processes (same
    result); default: up to the CPU count when the pool is large, else in this process.
    """
    names = cfg.task_names
    jobs = [(name, cfg.seed, part, share, cfg.prompt_length, cfg.answer_length, cfg.task_set)
            for name in names for part, (_, share) in enumerate(_mix_shares(name, cfg.pool_size))]
    if workers is None:
        workers = min(len(jobs), os.cpu_count() or 1) if cfg.pool_size >= 5000 else 1
    if workers > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            pieces = list(ex.map(_pool_part, jobs))
    else:
        pieces = [_pool_part(j) for j in jobs]
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for name in names:
        mine = [pc for job, pc in zip(jobs, pieces) if job[0] == name]
        parts.append((np.concatenate([p for p, _ in mine]), np.concatenate([a for _, a in mine])))
    n = max(len(p) for p, _ in parts)
    t = len(parts)
    prompts = np.zeros((t, n, cfg.prompt_length), np.int32)
    answers = np.zeros((t, n, cfg.answer_length), np.int32)
    counts = np.zeros((t,), np.int32)
    for k, (p, a) in enumerate(parts):
        prompts[k, :len(p)], answers[k, :len(a)], counts[k] = p, a, len(p)
    if counts.min() == 0:
        raise TrainError(f"task {names[int(counts.argmin())]} produced no train instance.")
    pool = DataPool(jnp.asarray(prompts), jnp.asarray(answers), jnp.asarray(counts))
    return pool, names


def save_pool(path: str | os.PathLike, pool: tuple[DataPool, tuple[str, ...]],
              cfg: TrainConfig) -> None:
    """Write a built pool (and the fields of `cfg` it depends on) to one `.npz` file."""
    data, names = pool
    arrays = {k: np.asarray(getattr(data, k)) for k in ("prompts", "answers", "counts")}
    small = max(int(arrays["prompts"].max()), int(arrays["answers"].max())) < 256
    for k in ("prompts", "answers"):
        arrays[k] = arrays[k].astype(np.uint8 if small else np.int32)
    key = {"seed": cfg.seed, "pool_size": cfg.pool_size, "tasks": list(names),
           "prompt_length": cfg.prompt_length, "answer_length": cfg.answer_length,
           "task_set": cfg.task_set}
    np.savez_compressed(path, meta=np.asarray(json.dumps(key)), **arrays)


def load_pool(path: str | os.PathLike, cfg: TrainConfig) -> tuple[DataPool, tuple[str, ...]]:
    """Read a pool written by `save_pool`; refuses one built for other settings than `cfg`."""
    with np.load(path) as z:
        key = json.loads(str(z["meta"]))
        want = {"seed": cfg.seed, "pool_size": cfg.pool_size, "tasks": list(cfg.task_names),
                "prompt_length": cfg.prompt_length, "answer_length": cfg.answer_length,
                "task_set": cfg.task_set}
        if key != want:
            raise TrainError(f"pool file {path} was built for {key}, not {want}; rebuild it.")
        data = DataPool(*(jnp.asarray(z[k].astype(np.int32)) for k in ("prompts", "answers")),
                        jnp.asarray(z["counts"].astype(np.int32)))
    return data, tuple(key["tasks"])


def sample_batch(pool: DataPool, key: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """`(prompt [B, P], answer [B, A])`: a uniform task per row, then a uniform instance of it."""
    kt, ki = jax.random.split(key)
    task = jax.random.randint(kt, (batch_size,), 0, pool.prompts.shape[0])
    n = pool.counts[task]
    idx = jnp.minimum((jax.random.uniform(ki, (batch_size,)) * n).astype(jnp.int32), n - 1)
    return pool.prompts[task, idx], pool.answers[task, idx]


def data_key(seed: int) -> jax.Array:
    """The run's data key (typed PRNG key) for a seed; batches use `fold_in(key, step)`."""
    return jax.random.fold_in(jax.random.key(seed), 1)


def batch_at(pool: DataPool, key: jax.Array, step: int | jax.Array, batch_size: int
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch and noise key of step `step`: `(prompt, answer, noise_key)`."""
    kb, kn = jax.random.split(jax.random.fold_in(key, step))
    prompt, answer = sample_batch(pool, kb, batch_size)
    return prompt, answer, kn



__all__ = ["DataPool", "TRAIN_MIX", "batch_at", "build_pool", "data_key", "encode_instances",
           "load_pool", "part_instances", "sample_batch", "save_pool", "task_instances"]
