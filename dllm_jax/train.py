"""Masked-diffusion training of small models on the dependency tasks (`dllm_jax.tasks`).

Objective (LLaDA, SFT form). A training sequence is `[prompt | answer]`: the prompt left-padded
with `<pad>` (invisible as a key) to `prompt_length`, the answer padded with `<eos>` to
`answer_length` (the padding is part of the answer, as in LLaDA's SFT). For each sequence draw
`t ~ U(eps, 1)`, replace each answer token by `<mask>` with probability `t` (the prompt is never
masked), and minimise

    loss = sum_{b, i in answer, masked} CE(logits[b, i], answer[b, i]) / t_b  /  (B * answer_length)

(the 1/t-weighted cross-entropy on the masked answer positions, normalised by the number of
answer tokens).

Block diffusion (`TrainConfig.block_diffusion`, SDAR / BD3-LM style). The model attends
block-causally (`ModelConfig.block_causal`, blocks of `block_size` positions counted from each
row's first real token, as `attention.attention_mask` counts them). Each block draws its own
`t ~ U(eps, 1)` and its answer tokens are masked with that probability and weighted 1/t. The
forward runs on the concatenation `[x_t | x_0]` (noisy copy, clean copy; same RoPE positions),
with this mask (q = query, k = key, b(.) = block):

    noisy q -> noisy k : b(k) == b(q)     (its own block, bidirectional)
    noisy q -> clean k : b(k) <  b(q)     (the clean context, as block-wise decoding sees it)
    clean q -> clean k : b(k) <= b(q)     (block-causal, builds the clean context)
    clean q -> noisy k : never

so every block is denoised from the clean blocks before it in one forward, which is exactly
what block-by-block decoding with a KV cache of finished blocks sees.

Data. For each task family a pool of `pool_size` distinct *train-split* instances is drawn
(difficulties mixed as in `TRAIN_MIX`, deterministic from the seed), tokenized and kept on the
device. Batch `s` is a pure function of `(seed, s)`: tasks are drawn uniformly, then an instance
of the task's pool, and the noise from the same key. So a run restarted from a checkpoint sees
the same batches and the same noise as one that was never interrupted.

Optimiser: `optax.adamw` (wrapped by `optax.inject_hyperparams`, so the compiled step takes
the learning rate as an input) after global-norm clipping; the learning rate follows
`optax.warmup_cosine_decay_schedule(0, lr, warmup, steps, lr * end_lr_ratio)`, evaluated per
step on the host. Several steps run in one compiled `lax.scan` (a chunk); chunks end at
every multiple of `log_every` and `ckpt_every`.

Checkpoints: `orbax.checkpoint.CheckpointManager` in `ckpt_dir` (one step folder per save,
`keep_checkpoints` kept) with `ocp.args.Composite(state=StandardSave({params, opt_state, step,
data_key}), meta=JsonSave(...))`; `train_config.json` beside them records the run, and a
resume refuses a different configuration. At the end `save_model(out_dir, ...)` writes a model
folder with the task tokenizer (`tokenizer.json`, `tokenizer_config.json`) and
`train_config.json`: `load_model(out_dir)` and `Tokenizer.from_dir(out_dir)` read it.

Usage:

    from dllm_jax.train import TrainConfig, train, bundled_model_config
    result = train(TrainConfig(steps=2000, batch_size=128), bundled_model_config(), "out/model")
    # or: dllm-jax train --out out/model --steps 2000 --batch-size 128
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dllm_jax import model as M
from dllm_jax.attention import dot_product_attention
from dllm_jax.checkpoint import CheckpointError, save_model
from dllm_jax.config import ConfigError, ModelConfig

TRAIN_CONFIG_FILE = "train_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

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


class TrainError(ConfigError):
    """A training request that cannot run as given; the message says how to fix it."""


# ----------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run (frozen; stored as JSON beside the checkpoints).

    Attributes:
      steps: optimiser steps of the whole run (the schedule's length).
      batch_size: sequences per step.
      lr: peak learning rate; warmup: linear warm-up steps from 0; end_lr_ratio: final
        learning rate as a fraction of `lr` (cosine decay in between).
      weight_decay, b1, b2: AdamW settings; grad_clip: global-norm clip (0: none).
      seed: everything random (init, data pools, batches, noise) derives from it.
      eps: t ~ U(eps, 1).
      ckpt_every: save a checkpoint every this many steps (and at the end); keep_checkpoints:
        how many the manager keeps.
      log_every: progress line every this many steps.
      block_diffusion: SDAR-style block diffusion (block-causal model, per-block t); needs a
        model config with `block_causal` and `block_size`.
      prompt_length, answer_length: fixed layout of a training sequence.
      pool_size: distinct train instances per task family kept on the device.
      tasks: task families to mix (empty: all of `dllm_jax.tasks.TASKS`).
      compute_dtype: 'float32' or 'bfloat16' activations (params and optimiser stay float32).
      attn_impl: attention kernel of the training forward ('xla' is portable and differentiable
        with a mask everywhere).
      init_std: normal(0, init_std) initial weights.
    """

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0
    seed: int = 0
    eps: float = 1e-3
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 50
    block_diffusion: bool = False
    prompt_length: int = 32
    answer_length: int = 32
    pool_size: int = 20000
    tasks: tuple[str, ...] = ()
    compute_dtype: str = "float32"
    attn_impl: str = "xla"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "prompt_length",
                     "answer_length", "pool_size", "keep_checkpoints"):
            if int(getattr(self, name)) <= 0:
                raise TrainError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.warmup < 0 or self.warmup >= self.steps:
            raise TrainError(f"warmup ({self.warmup}) must be in [0, steps={self.steps}); e.g. "
                             f"--warmup {max(0, self.steps // 10)}.")
        if not 0.0 < self.eps < 1.0:
            raise TrainError(f"eps must be in (0, 1), got {self.eps}.")
        if not self.lr > 0:
            raise TrainError(f"lr must be > 0, got {self.lr}.")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise TrainError(f"compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}.")
        if self.attn_impl not in ("xla", "cudnn", "auto"):
            raise TrainError(f"attn_impl must be 'xla', 'cudnn' or 'auto', got {self.attn_impl!r}.")
        object.__setattr__(self, "tasks", tuple(self.tasks))

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise TrainError(f"unknown TrainConfig fields {unknown}.")
        d = dict(d)
        if "tasks" in d:
            d["tasks"] = tuple(d["tasks"])
        return cls(**d)

    @property
    def task_names(self) -> tuple[str, ...]:
        from dllm_jax.tasks import TASKS

        names = self.tasks or tuple(TASKS)
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise TrainError(f"unknown tasks {unknown}; valid tasks: {', '.join(TASKS)}.")
        return names

    @property
    def seq_length(self) -> int:
        return self.prompt_length + self.answer_length


def bundled_model_config(vocab_size: int | None = None, prompt_length: int = 32,
                         answer_length: int = 32, block_size: int = 0) -> ModelConfig:
    """The shapes of the bundled model: LLaDA architecture, ~4.6M params (hidden 256, 6 layers,
    8 heads of 32, SwiGLU 640), the task tokenizer's vocabulary and special ids; with
    `block_size` > 0 a block-causal variant for block diffusion."""
    from dllm_jax.tasks.vocab import EOS_ID, MASK_ID, PAD_ID, task_vocabulary

    return ModelConfig(
        arch="llada", vocab_size=vocab_size or len(task_vocabulary()), hidden_size=256,
        num_layers=6, num_heads=8, num_kv_heads=8, head_dim=32, intermediate_size=640,
        rope_theta=10000.0, rms_norm_eps=1e-5, max_position=prompt_length + answer_length,
        mask_token_id=MASK_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        block_causal=block_size > 0, block_size=block_size)


def tiny_model_config(vocab_size: int | None = None, prompt_length: int = 32,
                      answer_length: int = 32, block_size: int = 0) -> ModelConfig:
    """A test-sized LLaDA config over the task tokenizer (hidden 64, 2 layers)."""
    return bundled_model_config(vocab_size, prompt_length, answer_length, block_size).replace(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
        intermediate_size=128)


def check_configs(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """Refuse model / training configs that do not fit together (plain sentences)."""
    if cfg.seq_length > model_cfg.max_position:
        raise TrainError(
            f"prompt_length + answer_length = {cfg.seq_length} exceeds the model's max_position "
            f"{model_cfg.max_position}.")
    if cfg.block_diffusion and not model_cfg.block_causal:
        raise TrainError("block_diffusion needs a block-causal model (block_causal=True and a "
                         "block_size); e.g. --block-size 8.")
    if model_cfg.block_causal and not cfg.block_diffusion:
        raise TrainError("the model is block-causal: train it with block_diffusion=True "
                         "(--block-diffusion).")
    from dllm_jax.tasks.vocab import MASK_ID, task_vocabulary

    if model_cfg.vocab_size < len(task_vocabulary()):
        raise TrainError(f"vocab_size {model_cfg.vocab_size} is smaller than the task tokenizer "
                         f"({len(task_vocabulary())} tokens).")
    if model_cfg.mask_token_id != MASK_ID:
        raise TrainError(f"mask_token_id must be the task tokenizer's <mask> ({MASK_ID}).")


# ----------------------------------------------------------------------------- data
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


def part_instances(task_name: str, seed: int, part: int, n: int) -> list[Any]:
    """Up to `n` distinct train-split instances of one difficulty part of `TRAIN_MIX` (a pure
    function of its arguments). A small prompt space (e.g. two-digit addition) yields fewer:
    drawing stops after `4 n + 100` tries."""
    from dllm_jax.tasks import get_task, split_of

    task = get_task(task_name)
    knobs = task.difficulty(**_mix_shares(task_name, 1)[part][0])
    rng = np.random.default_rng(_task_seed(seed, task_name, part))
    out: list[Any] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n and tries < 4 * n + 100:
        tries += 1
        inst = task._sample(rng, **knobs)  # the family's generator; the split is filtered here
        if inst.prompt in seen or split_of(task_name, inst.prompt) != "train":
            continue
        seen.add(inst.prompt)
        out.append(inst)
    return out


def task_instances(task_name: str, seed: int, n: int) -> list[Any]:
    """About `n` train-split instances of one task, its difficulty parts in the proportions of
    `TRAIN_MIX` (distinct within a part; deterministic in `(task_name, seed, n)`)."""
    out: list[Any] = []
    for part, (_, share) in enumerate(_mix_shares(task_name, n)):
        out += part_instances(task_name, seed, part, share)
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


def _pool_part(args: tuple[str, int, int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    name, seed, part, n, p, a = args
    return encode_instances(part_instances(name, seed, part, n), p, a)


def build_pool(cfg: TrainConfig, workers: int | None = None) -> tuple[DataPool, tuple[str, ...]]:
    """The data pool of a run (deterministic from `cfg.seed`), and its task names in row order.

    `workers` > 1 builds the (task, difficulty part) pieces in that many processes (same
    result); default: up to the CPU count when the pool is large, else in this process.
    """
    names = cfg.task_names
    jobs = [(name, cfg.seed, part, share, cfg.prompt_length, cfg.answer_length)
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
           "prompt_length": cfg.prompt_length, "answer_length": cfg.answer_length}
    np.savez_compressed(path, meta=np.asarray(json.dumps(key)), **arrays)


def load_pool(path: str | os.PathLike, cfg: TrainConfig) -> tuple[DataPool, tuple[str, ...]]:
    """Read a pool written by `save_pool`; refuses one built for other settings than `cfg`."""
    with np.load(path) as z:
        key = json.loads(str(z["meta"]))
        want = {"seed": cfg.seed, "pool_size": cfg.pool_size, "tasks": list(cfg.task_names),
                "prompt_length": cfg.prompt_length, "answer_length": cfg.answer_length}
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


# ----------------------------------------------------------------------------- objective
def sample_noise(key: jax.Array, answer_positions: jax.Array, eps: float, block_size: int = 0,
                 max_position: int = 0) -> tuple[jax.Array, jax.Array]:
    """Per-token mask ratio and mask of the answer.

    Args:
      key: PRNG key.
      answer_positions: int `[B, A]` RoPE positions of the answer tokens (block ids derive
        from them in block diffusion).
      eps: t ~ U(eps, 1).
      block_size: 0 -> one t per sequence (LLaDA); > 0 -> one t per block of positions (SDAR).
      max_position: the model's longest sequence (bounds the number of blocks).
    Returns:
      `(t [B, A] float32, masked [B, A] bool)`: each answer token is masked with probability
      its t.
    """
    kt, km = jax.random.split(key)
    b, a = answer_positions.shape
    if block_size > 0:
        nb = max(max_position, 1) // block_size + 1
        t_blocks = jax.random.uniform(kt, (b, nb), jnp.float32, eps, 1.0)
        t = jnp.take_along_axis(t_blocks, answer_positions // block_size, axis=1)
    else:
        t = jnp.broadcast_to(jax.random.uniform(kt, (b, 1), jnp.float32, eps, 1.0), (b, a))
    masked = jax.random.uniform(km, (b, a), jnp.float32) < t
    return t, masked


def masked_diffusion_loss(logits: jax.Array, answer: jax.Array, masked: jax.Array,
                          t: jax.Array) -> jax.Array:
    """`sum(CE on masked answer tokens / t) / (B * A)` for logits `[B, A, V]` of the answer."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, answer[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(masked, ce / t, 0.0)) / answer.size


def block_diffusion_logits(params: M.Params, cfg: ModelConfig, noisy: jax.Array,
                           clean: jax.Array, valid: jax.Array, query_idx: jax.Array,
                           attn_impl: str = "xla") -> jax.Array:
    """Logits at `query_idx` of the noisy copy from one forward over `[noisy | clean]` with the
    block-diffusion mask of the module docstring. Shapes: tokens `[B, T]`, query `[B, Q]`."""
    t = noisy.shape[1]
    pos = M.default_positions(valid)
    tokens2 = jnp.concatenate([noisy, clean], axis=1)
    pos2 = jnp.concatenate([pos, pos], axis=1)
    valid2 = jnp.concatenate([valid, valid], axis=1)
    blk = pos2 // cfg.block_size
    is_noisy = jnp.arange(2 * t) < t
    qb, kb = blk[:, :, None], blk[:, None, :]
    qn, kn = is_noisy[None, :, None], is_noisy[None, None, :]
    allowed = jnp.where(qn, jnp.where(kn, kb == qb, kb < qb), (~kn) & (kb <= qb))
    mask = allowed & valid2[:, None, :]
    cos, sin = M.rope_tables(pos2, cfg.head_dim, cfg.rope_theta)

    def attend(q: jax.Array, k: jax.Array, v: jax.Array, ck: Any, cv: Any) -> jax.Array:
        return dot_product_attention(q, k, v, mask, attn_impl)

    x, _ = M._run_layers(cfg, params, M._embed(params, tokens2), cos, sin, attend)
    return M._query_logits(cfg, params, x, query_idx)


def loss_fn(params: M.Params, model_cfg: ModelConfig, prompt: jax.Array, answer: jax.Array,
            key: jax.Array, *, eps: float, block_diffusion: bool = False,
            compute_dtype: Any = jnp.float32, attn_impl: str = "xla"
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training loss of one batch and what it was computed from.

    Args:
      params: float32 params (cast to `compute_dtype` for the forward).
      prompt: int `[B, P]` left-padded with `pad_token_id`; answer: int `[B, A]`.
      key: noise key.
    Returns:
      `(loss, aux)` with aux: `tokens [B, P+A]` (the model input: prompt unchanged, masked answer
      tokens replaced by `<mask>`), `t [B, A]`, `masked [B, A]`, `logits [B, A, V]`.
    """
    b, p = prompt.shape
    a = answer.shape[1]
    valid = jnp.concatenate([prompt != model_cfg.pad_token_id, jnp.ones((b, a), bool)], axis=1)
    positions = M.default_positions(valid)
    bs = model_cfg.block_size if block_diffusion else 0
    t, masked = sample_noise(key, positions[:, p:], eps, bs, model_cfg.max_position)
    noisy_answer = jnp.where(masked, model_cfg.mask_token_id, answer)
    tokens = jnp.concatenate([prompt, noisy_answer], axis=1)
    query = jnp.broadcast_to(jnp.arange(p, p + a, dtype=jnp.int32), (b, a))
    pc = jax.tree.map(lambda x: x.astype(compute_dtype), params)
    if block_diffusion:
        clean = jnp.concatenate([prompt, answer], axis=1)
        logits = block_diffusion_logits(pc, model_cfg, tokens, clean, valid, query, attn_impl)
    else:
        logits = M.apply(pc, model_cfg, tokens, positions=positions, key_valid=valid,
                         query_idx=query, attn_impl=attn_impl)
    loss = masked_diffusion_loss(logits, answer, masked, t)
    return loss, {"tokens": tokens, "t": t, "masked": masked, "logits": logits}


# ----------------------------------------------------------------------------- optimiser
def lr_schedule(cfg: TrainConfig) -> Callable[[Any], Any]:
    """optax warm-up + cosine decay over the whole run."""
    import optax

    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, cfg.steps,
                                              cfg.lr * cfg.end_lr_ratio)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static part of the compiled training step (a jit static argument): everything but
    the learning rate, so runs that differ only in lr / warmup / steps share one compile."""

    model_cfg: ModelConfig
    batch_size: int
    eps: float
    block_diffusion: bool
    compute_dtype: str
    attn_impl: str
    b1: float
    b2: float
    weight_decay: float
    grad_clip: float

    @classmethod
    def of(cls, cfg: TrainConfig, model_cfg: ModelConfig) -> "StepSpec":
        return cls(model_cfg, cfg.batch_size, cfg.eps, cfg.block_diffusion, cfg.compute_dtype,
                   cfg.attn_impl, cfg.b1, cfg.b2, cfg.weight_decay, cfg.grad_clip)


def make_optimizer(spec: StepSpec) -> Any:
    """clip_by_global_norm -> adamw (learning rate injected per step)."""
    import optax

    adamw = optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=spec.b1, b2=spec.b2,
                                                  weight_decay=spec.weight_decay)
    if spec.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(spec.grad_clip), adamw)
    return optax.chain(optax.identity(), adamw)


def _set_lr(opt_state: Any, lr: jax.Array) -> Any:
    first, inject = opt_state
    hp = dict(inject.hyperparams)
    hp["learning_rate"] = jnp.asarray(lr, jnp.asarray(hp["learning_rate"]).dtype)
    return (first, inject._replace(hyperparams=hp))


def init_state(cfg: TrainConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    """Step-0 train state: `{params, opt_state, step, data_key}` (params float32)."""
    params = M.init_params(model_cfg, jax.random.fold_in(jax.random.key(cfg.seed), 0),
                           jnp.float32, cfg.init_std)
    opt_state = make_optimizer(StepSpec.of(cfg, model_cfg)).init(params)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(0),
            "data_key": jax.random.key_data(data_key(cfg.seed))}


def _train_step(state: dict[str, Any], pool: DataPool, lr: jax.Array, spec: StepSpec
                ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    import optax

    key = jax.random.wrap_key_data(state["data_key"])
    prompt, answer, noise_key = batch_at(pool, key, state["step"], spec.batch_size)

    def objective(params: M.Params) -> tuple[jax.Array, Any]:
        loss, aux = loss_fn(params, spec.model_cfg, prompt, answer, noise_key, eps=spec.eps,
                            block_diffusion=spec.block_diffusion,
                            compute_dtype=jnp.dtype(spec.compute_dtype), attn_impl=spec.attn_impl)
        return loss, jnp.sum(aux["masked"])

    (loss, n_masked), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    opt = make_optimizer(spec)
    opt_state = _set_lr(state["opt_state"], lr)
    updates, opt_state = opt.update(grads, opt_state, state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
           "data_key": state["data_key"]}
    return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "masked": n_masked}


def _train_chunk_impl(state: dict[str, Any], pool: DataPool, lrs: jax.Array, spec: StepSpec
                      ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    return jax.lax.scan(lambda s, lr: _train_step(s, pool, lr, spec), state, lrs)


_train_chunk = jax.jit(_train_chunk_impl, static_argnames=("spec",), donate_argnums=(0,))


def train_chunk(state: dict[str, Any], pool: DataPool, lrs: Any, spec: StepSpec
                ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """`len(lrs)` training steps in one compiled scan (the input state is donated).

    Returns the new state and per-step metrics `{loss, grad_norm, masked}` `[n]`.
    """
    return _train_chunk(state, pool, jnp.asarray(lrs, jnp.float32), spec=spec)


# ----------------------------------------------------------------------------- checkpoints
def _manager(ckpt_dir: Path, cfg: TrainConfig) -> Any:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True)
    return ocp.CheckpointManager(ckpt_dir, options=options)


def _save_checkpoint(mngr: Any, state: dict[str, Any], meta: dict[str, Any]) -> None:
    import orbax.checkpoint as ocp

    step = int(state["step"])
    host = jax.device_get(state)  # a host copy: the device buffers are donated to the next chunk
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host),
                                            meta=ocp.args.JsonSave(meta)), force=True)


def _restore_checkpoint(mngr: Any, step: int, cfg: TrainConfig, model_cfg: ModelConfig
                        ) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        jax.eval_shape(lambda: init_state(cfg, model_cfg)))
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    return restored["state"]


def _run_record(cfg: TrainConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    return {"train": cfg.to_dict(), "model": model_cfg.to_dict()}


def _prepare_ckpt_dir(ckpt_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig, resume: bool
                      ) -> None:
    record = _run_record(cfg, model_cfg)
    path = ckpt_dir / TRAIN_CONFIG_FILE
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        if not resume:
            raise TrainError(
                f"{ckpt_dir} already holds checkpoints of a run; pass --resume (resume=True) to "
                f"continue it, or choose another --ckpt-dir / remove it.")
        if stored != record:
            diff = sorted(
                f"{part}.{k}" for part in ("train", "model")
                for k in set(stored.get(part, {})) | set(record[part])
                if stored.get(part, {}).get(k) != record[part].get(k))
            raise TrainError(
                f"cannot resume: the run in {ckpt_dir} was configured differently ({', '.join(diff)}); "
                f"resume with the same settings or start a new --ckpt-dir.")
        return
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise TrainError(f"{ckpt_dir} exists and is not a dllm-jax training folder (no "
                         f"{TRAIN_CONFIG_FILE}); choose another --ckpt-dir.")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------- progress
class Progress:
    """A one-line progress report (rewritten in place on a terminal, one line per report
    otherwise): step, loss, tokens/s (all prompt + answer tokens), steps/s, lr, ETA."""

    def __init__(self, total: int, stream: Any = None, tokens_per_step: int = 0) -> None:
        self.total, self.stream, self.tokens_per_step = total, stream or sys.stderr, tokens_per_step
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._t, self._s = None, None

    def start(self, step: int) -> None:
        self._t, self._s = time.perf_counter(), step

    def update(self, step: int, loss: float, lr: float) -> dict[str, float]:
        now = time.perf_counter()
        last_t = now if self._t is None else self._t
        last_s = step if self._s is None else self._s
        dt = max(now - last_t, 1e-9)
        rate = (step - last_s) / dt
        self._t, self._s = now, step
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        tok = rate * self.tokens_per_step
        line = (f"step {step}/{self.total} | loss {loss:.4f} | {tok / 1e3:.1f}k tok/s | "
                f"{rate:.1f} steps/s | lr {lr:.2e} | eta {_fmt_seconds(eta)}")
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return {"step": step, "loss": loss, "steps_per_s": rate, "tokens_per_s": tok}

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# ----------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainResult:
    """params: float32 params at the end of this call; losses: per-step losses of the steps
    run by this call (`first_step` is the step of losses[0]); step: steps done in the run;
    seconds: wall time of the training loop; out_dir: the model folder (None if not written)."""

    params: M.Params
    losses: np.ndarray
    first_step: int
    step: int
    seconds: float
    out_dir: Path | None


def _chunk_ends(start: int, cfg: TrainConfig, stop: int) -> list[int]:
    ends = sorted({s for s in range(start + 1, stop + 1)
                   if s % cfg.log_every == 0 or s % cfg.ckpt_every == 0 or s == stop})
    return ends


def train(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    out_dir: str | os.PathLike | None,
    *,
    ckpt_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    time_limit: float | None = None,
    pool: tuple[DataPool, tuple[str, ...]] | None = None,
    save_dtype: str = "float32",
    overwrite: bool = False,
    stream: Any = None,
    quiet: bool = False,
) -> TrainResult:
    """Train (or continue training) a model with the masked-diffusion objective.

    Args:
      cfg, model_cfg: the run (see `TrainConfig`, `bundled_model_config`).
      out_dir: model folder written at the end of the run (None: do not write one).
      ckpt_dir: checkpoint folder (default `<out_dir>-ckpt`); None with out_dir None: no
        checkpoints.
      resume: continue from the latest checkpoint in `ckpt_dir` (same configs required).
      stop_at: stop after this step (a checkpoint is written), as if interrupted; resume later.
      time_limit: stop (with a checkpoint) at the first chunk end after this many seconds.
      pool: a prebuilt `build_pool(cfg)` to reuse.
      save_dtype: dtype of the saved model params ('float32' or 'bfloat16').
      overwrite: replace an existing model folder at `out_dir`.
      stream: where progress goes (default stderr); quiet: no progress.
    """
    check_configs(cfg, model_cfg)
    if ckpt_dir is None and out_dir is not None:
        ckpt_dir = f"{os.fspath(out_dir).rstrip(os.sep)}-ckpt"
    if out_dir is not None and Path(out_dir).exists() and not overwrite:
        raise TrainError(f"{out_dir} already exists; pass --overwrite or choose another --out.")
    spec = StepSpec.of(cfg, model_cfg)
    pool_, _ = pool if pool is not None else build_pool(cfg)
    mngr = None
    state = None
    if ckpt_dir is not None:
        ckpt_path = Path(ckpt_dir).absolute()
        _prepare_ckpt_dir(ckpt_path, cfg, model_cfg, resume)
        mngr = _manager(ckpt_path, cfg)
        latest = mngr.latest_step()
        if resume and latest is not None:
            state = _restore_checkpoint(mngr, latest, cfg, model_cfg)
    elif resume:
        raise TrainError("resume needs a checkpoint folder (ckpt_dir).")
    if state is None:
        state = init_state(cfg, model_cfg)
    start = int(state["step"])
    stop = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    schedule = lr_schedule(cfg)
    meta = {"run": _run_record(cfg, model_cfg)}
    progress = None if quiet else Progress(cfg.steps, stream, cfg.batch_size * cfg.seq_length)
    losses: list[np.ndarray] = []
    t0 = time.perf_counter()
    if progress:
        progress.start(start)
    step = start
    for end in _chunk_ends(start, cfg, stop):
        lrs = np.asarray(schedule(np.arange(step, end)), np.float32)
        state, metrics = train_chunk(state, pool_, lrs, spec)
        chunk_losses = np.asarray(metrics["loss"])
        losses.append(chunk_losses)
        step = end
        if not np.isfinite(chunk_losses).all():
            raise TrainError(f"the loss became {chunk_losses[-1]} by step {step}; lower --lr.")
        if progress and (step % cfg.log_every == 0 or step == stop):
            progress.update(step, float(chunk_losses[-1]), float(lrs[-1]))
        timed_out = time_limit is not None and time.perf_counter() - t0 > time_limit
        if mngr is not None and (step % cfg.ckpt_every == 0 or step == stop or timed_out):
            _save_checkpoint(mngr, state, meta)
        if timed_out:
            break
    if progress:
        progress.close()
    if mngr is not None:
        mngr.wait_until_finished()
        mngr.close()
    seconds = time.perf_counter() - t0
    params = jax.device_get(state["params"])
    written = None
    if out_dir is not None and step >= cfg.steps:
        written = save_trained_model(out_dir, cfg, model_cfg, params, save_dtype=save_dtype,
                                     overwrite=overwrite, extra={"steps_done": step})
    return TrainResult(params=params, losses=np.concatenate(losses) if losses else np.zeros(0),
                       first_step=start, step=step, seconds=seconds, out_dir=written)


def save_trained_model(out_dir: str | os.PathLike, cfg: TrainConfig, model_cfg: ModelConfig,
                       params: M.Params, *, save_dtype: str = "float32", overwrite: bool = False,
                       extra: Mapping[str, Any] | None = None) -> Path:
    """Write a complete model folder: params (as `save_dtype`), config, the task tokenizer and
    `train_config.json` (the run, plus `extra`)."""
    from dllm_jax.tasks.vocab import build_task_tokenizer

    dtype = jnp.dtype(save_dtype)
    host = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, dtype)), params)
    with tempfile.TemporaryDirectory() as tmp:
        build_task_tokenizer(tmp)
        record = {**_run_record(cfg, model_cfg), **dict(extra or {})}
        rec_path = os.path.join(tmp, TRAIN_CONFIG_FILE)
        with open(rec_path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        files = {name: os.path.join(tmp, name) for name in (*TOKENIZER_FILES, TRAIN_CONFIG_FILE)}
        return save_model(out_dir, model_cfg, host, overwrite=overwrite, extra_files=files)


# ----------------------------------------------------------------------------- evaluation
def evaluate(
    params: M.Params,
    model_cfg: ModelConfig,
    *,
    tasks: Sequence[str] | None = None,
    n: int = 100,
    seed: int = 12345,
    prompt_length: int = 32,
    gen_length: int = 32,
    block_length: int | None = None,
    steps: int | None = None,
    controller: str = "low_confidence",
    batch_size: int = 100,
) -> dict[str, dict[str, float]]:
    """Score decodes of held-out (split='test') instances at the default difficulty.

    Defaults decode one token per step (`steps = gen_length`, one block, low-confidence
    remasking), as `dllm-jax generate` does. Returns `{task: {valid, exact, partial, n}}`
    (fractions over the n instances).
    """
    from controllers import make_controller
    from dllm_jax.config import GenerateConfig
    from dllm_jax.decode import generate
    from dllm_jax.tasks import TASKS, get_task
    from dllm_jax.tasks.vocab import PAD_ID, build_backend, decode_answer
    from dllm_jax.tokenizer import Tokenizer

    backend = build_backend()
    tok = Tokenizer(backend=backend, special_tokens={"eos_token": "<eos>", "pad_token": "<pad>"})
    gen = GenerateConfig(gen_length=gen_length, block_length=block_length or gen_length,
                         steps=steps or gen_length)
    ctl = make_controller(controller)
    results: dict[str, dict[str, float]] = {}
    for name in tasks or tuple(TASKS):
        task = get_task(name)
        insts = task.generate(seed, n, split="test")
        prompts, _ = encode_instances(insts, prompt_length, 1 + task.max_answer_tokens())
        outs: list[str] = []
        for s in range(0, n, batch_size):
            p = prompts[s:s + batch_size]
            rows = p.shape[0]
            if rows < batch_size:  # pad the batch so that every call has the same shape
                p = np.concatenate([p, np.repeat(p[:1], batch_size - rows, 0)])
            out = generate(params, model_cfg, p, gen, ctl, prompt_valid=p != PAD_ID)
            ids = np.asarray(out.tokens)[:rows]
            outs += [decode_answer(tok, row) for row in ids]
        scores = [task.score(i, o) for i, o in zip(insts, outs)]
        results[name] = {"valid": float(np.mean([s.valid for s in scores])),
                         "exact": float(np.mean([s.exact for s in scores])),
                         "partial": float(np.mean([s.partial for s in scores])), "n": n}
    return results


def format_results(results: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of `evaluate` results (percentages)."""
    from dllm_jax.tasks import TASKS

    lines = ["| task | dependency | valid % | exact % | partial % | n |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        dep = TASKS[name].dependency if name in TASKS else "?"
        lines.append(f"| {name} | {dep} | {100 * r['valid']:.1f} | {100 * r['exact']:.1f} | "
                     f"{100 * r['partial']:.1f} | {int(r['n'])} |")
    mean = np.mean([r["valid"] for r in results.values()]) if results else float("nan")
    lines.append(f"| **mean** | | **{100 * mean:.1f}** | | | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: Any) -> None:
    d = TrainConfig()
    p.add_argument("--out", required=True, help="model folder written at the end")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default: OUT-ckpt)")
    p.add_argument("--resume", action="store_true", help="continue the run in --ckpt-dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model at --out")
    p.add_argument("--model-size", choices=("bundled", "tiny"), default="bundled",
                   help="bundled: hidden 256 x 6 layers (~4.6M params); tiny: hidden 64 x 2")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps/20)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eps", type=float, default=d.eps)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--pool-size", type=int, default=d.pool_size,
                   help="distinct train instances per task family")
    p.add_argument("--tasks", default="", help="comma-separated task families (default: all)")
    p.add_argument("--prompt-length", type=int, default=d.prompt_length)
    p.add_argument("--answer-length", type=int, default=d.answer_length)
    p.add_argument("--block-diffusion", action="store_true",
                   help="SDAR-style block diffusion (block-causal attention, per-block masks)")
    p.add_argument("--block-size", type=int, default=8, help="block size of --block-diffusion")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=d.compute_dtype)
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop with a checkpoint after this many seconds (resume later)")
    p.add_argument("--eval", type=int, default=0, metavar="N",
                   help="after training, score N held-out instances per task (one token per step)")


def run(args: Any) -> int:
    tasks = tuple(t for t in args.tasks.replace(" ", "").split(",") if t)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 20)
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed, eps=args.eps,
        ckpt_every=args.ckpt_every, log_every=args.log_every, pool_size=args.pool_size,
        tasks=tasks, prompt_length=args.prompt_length, answer_length=args.answer_length,
        block_diffusion=args.block_diffusion, compute_dtype=args.compute_dtype)
    make = bundled_model_config if args.model_size == "bundled" else tiny_model_config
    model_cfg = make(prompt_length=cfg.prompt_length, answer_length=cfg.answer_length,
                     block_size=args.block_size if args.block_diffusion else 0)
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(M.param_shapes(model_cfg)))
    print(f"model: {model_cfg.arch} {n_params / 1e6:.2f}M params; {cfg.steps} steps of "
          f"{cfg.batch_size} x {cfg.seq_length} tokens; tasks: {', '.join(cfg.task_names)}",
          file=sys.stderr)
    try:
        res = train(cfg, model_cfg, args.out, ckpt_dir=args.ckpt_dir, resume=args.resume,
                    time_limit=args.time_limit, save_dtype=args.save_dtype,
                    overwrite=args.overwrite)
    except CheckpointError:
        raise
    if res.out_dir is None:
        print(f"stopped at step {res.step}/{cfg.steps}; continue with the same command and "
              f"--resume.", file=sys.stderr)
        return 0
    print(f"saved {res.out_dir} ({res.step} steps, {res.seconds:.0f} s)", file=sys.stderr)
    if args.eval > 0:
        results = evaluate(res.params, model_cfg, tasks=cfg.task_names, n=args.eval,
                           prompt_length=cfg.prompt_length, gen_length=cfg.answer_length)
        print(format_results(results))
    return 0


__all__ = [
    "TrainConfig", "TrainError", "TrainResult", "DataPool", "StepSpec", "TRAIN_MIX",
    "bundled_model_config", "tiny_model_config", "build_pool", "task_instances",
    "encode_instances", "save_pool", "load_pool", "sample_batch", "batch_at", "data_key", "sample_noise",
    "masked_diffusion_loss", "block_diffusion_logits", "loss_fn", "lr_schedule",
    "make_optimizer", "init_state", "train_chunk", "train", "save_trained_model", "evaluate",
    "format_results", "add_arguments", "run",
]
