"""DiffusionGemma's canvas decoding (transformers' `DiffusionGemmaGenerationMixin.generate`
with its `EntropyBoundSampler`, `LinearTemperatureScheduleLogitsProcessor` and
`StableAndConfidentStoppingCriteria`), as one jit-compiled function.

Per canvas (block of `canvas_length` tokens, `ceil(max_new_tokens / canvas_length)` of them):
the encoder has written the KV cache of everything before it; the canvas starts as uniformly
random tokens; each of at most `max_denoising_steps` steps (step n counts down N..1):
  1. the denoiser's logits of the canvas, self-conditioned on the previous step's processed
     logits (none on the first step), divided by the temperature
     `t_min + (t_max - t_min) * n / N`;
  2. a sample of every position (`noise.gumbel`: Gumbel-max) and the argmax canvas;
  3. entropy-bound acceptance: positions sorted by entropy, ascending; the first k accepted
     while `sum(entropy of the first k) - max of them <= entropy_bound` (at least one);
     accepted positions take the sample, the others are re-randomised uniformly;
  4. adaptive stop (both thresholds set): a row stops once its argmax canvas equals the
     previous `stability_threshold` ones and its mean entropy is below
     `confidence_threshold`; a stopped row is frozen (canvas, argmax, logits) and not counted.
The canvas's output is its argmax canvas; a row that produced an EOS is finished: tokens
after its first EOS become PAD, later canvases all PAD. The output canvas (PADs included) is
then encoded, extending the cache. All canvases run in one compiled call, each canvas's steps
in a `lax.while_loop` (the canvases are unrolled; each extends the cache).

Randomness: `key` (each draw folded in by canvas and step), or `noise`, a `CanvasNoise` of
precomputed draws (tests feed the same stream to transformers' generate).

Differences from Google's JAX sampler (`gemma/diffusion/_sampler.py`), which follows the
same entropy-bound rule: there, a sliding layer's canvas sees `sliding_window` (not
`sliding_window - 1`) context tokens, the canvas kept is the last sampled one (not the argmax
one), and temperature anneals with the noise proportion; we follow transformers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from controllers.entropy_bound import entropy_bound_accept
from dllm_jax.config import ConfigError, ModelConfig
from dllm_jax.models import diffusion_gemma as DG

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CanvasConfig:
    """DiffusionGemma's generation options (transformers' defaults). `stability_threshold` or
    `confidence_threshold` None disables the adaptive stop."""

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int | None = 1
    confidence_threshold: float | None = 0.005

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0 or self.max_denoising_steps <= 0:
            raise ConfigError("max_new_tokens and max_denoising_steps must be positive.")
        if self.entropy_bound <= 0:
            raise ConfigError(f"entropy_bound must be > 0, got {self.entropy_bound}.")
        if not 0 <= self.t_min < self.t_max:
            raise ConfigError(f"need 0 <= t_min < t_max, got {self.t_min} and {self.t_max}.")
        if self.stability_threshold is not None and self.stability_threshold < 0:
            raise ConfigError(f"stability_threshold must be >= 0, got {self.stability_threshold}.")
        if self.confidence_threshold is not None and self.confidence_threshold <= 0:
            raise ConfigError(f"confidence_threshold must be > 0, got {self.confidence_threshold}.")

    @property
    def adaptive_stop(self) -> bool:
        return self.stability_threshold is not None and self.confidence_threshold is not None

    def num_canvases(self, canvas_length: int) -> int:
        return math.ceil(self.max_new_tokens / canvas_length)


class CanvasNoise(NamedTuple):
    """Precomputed randomness for K canvases of N steps: `init [K, B, C]` starting canvases,
    `renoise [K, N, B, C]` replacement tokens, `gumbel [K, N, B, C, V]` Gumbel noise."""

    init: jax.Array
    renoise: jax.Array
    gumbel: jax.Array


class CanvasOutput(NamedTuple):
    """tokens `[B, K*C]` (PAD after EOS); nfe `[B]` denoiser passes that counted; steps
    `[K, B]` denoising steps each row ran per canvas; accepted `[K, N, B, C]` the acceptance
    mask of every step (False after the loop stopped); tokens_per_forward `[B]`."""

    tokens: jax.Array
    nfe: jax.Array
    steps: jax.Array
    accepted: jax.Array
    tokens_per_forward: jax.Array


def entropy(logits: jax.Array) -> jax.Array:
    """Entropy (nats) of the softmax of float32 logits `[..., V]`."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def adaptive_stop(hist: jax.Array, argmax: jax.Array, ent: jax.Array, stability: int,
                  confidence: float) -> tuple[jax.Array, jax.Array]:
    """Stable-and-confident stop: `[B]` bool, and the history updated.

    hist `[max(stability, 1), B, C]`: the previous argmax canvases (-1 before any); stable
    when all `stability` of them equal `argmax [B, C]` (always, with stability 0); confident
    when the mean of the per-position entropies `ent [B, C]` is below `confidence`.
    """
    if stability == 0:
        stable = jnp.ones(argmax.shape[:1], bool)
    else:
        stable = jnp.all(hist == argmax[None], axis=(0, 2))
        hist = jnp.concatenate([hist[1:], argmax[None]], axis=0)
    return stable & (jnp.mean(ent, axis=-1) < confidence), hist


def _draws(key: jax.Array | None, noise: CanvasNoise | None, k: int, s: jax.Array | int,
           shape: tuple[int, int], vocab: int, what: str) -> jax.Array:
    if noise is not None:
        if what == "init":
            return noise.init[k]
        return (noise.renoise if what == "renoise" else noise.gumbel)[k, s]
    sub = jax.random.fold_in(jax.random.fold_in(key, k), s)
    if what == "gumbel":
        return jax.random.gumbel(jax.random.fold_in(sub, 1), (*shape, vocab), jnp.float32)
    return jax.random.randint(jax.random.fold_in(sub, 2), shape, 0, vocab, jnp.int32)


class StepState(NamedTuple):
    """The carry of one canvas's denoising loop.

    step: int32, 0-based (transformers' `cur_step` counts down: N - step); canvas, argmax
    `[B, C]`: the current canvas and the last argmax canvas; sc_logits `[B, C, V]` float32:
    the previous step's processed logits (ignored at step 0); finished `[B]`: stopped rows;
    history `[max(stability_threshold, 1), B, C]` past argmax canvases (-1 before any);
    nfe `[B]` forward passes counted in this canvas; accepted `[N, B, C]` acceptance masks.
    """

    step: jax.Array
    canvas: jax.Array
    argmax: jax.Array
    sc_logits: jax.Array
    finished: jax.Array
    history: jax.Array
    nfe: jax.Array
    accepted: jax.Array


def init_state(gen: CanvasConfig, canvas: jax.Array, vocab: int) -> StepState:
    """The state before the first step of a canvas starting as `canvas [B, C]`."""
    b, c = canvas.shape
    canvas = canvas.astype(jnp.int32)
    return StepState(jnp.int32(0), canvas, canvas, jnp.zeros((b, c, vocab), jnp.float32),
                     jnp.zeros((b,), bool),
                     jnp.full((max(gen.stability_threshold or 0, 1), b, c), -1, jnp.int32),
                     jnp.zeros((b,), jnp.int32), jnp.zeros((gen.max_denoising_steps, b, c), bool))


def denoise_step(params: Params, cfg: ModelConfig, gen: CanvasConfig, cache: DG.EncoderCache,
                 st: StepState, gumbel: jax.Array, renoise: jax.Array, done_seq: jax.Array,
                 **kw: Any) -> StepState:
    """One denoising step (module docstring, steps 1-4) with this step's draws: Gumbel noise
    `[B, C, V]` and re-noise tokens `[B, C]`; `done_seq [B]`: rows finished by an earlier
    canvas (not counted)."""
    b, n = st.canvas.shape[0], gen.max_denoising_steps
    counted = ~(st.finished | done_seq)
    logits = DG.denoise(params, cfg, st.canvas, cache, st.sc_logits,
                        sc_mask=jnp.full((b,), st.step > 0), **kw)
    temp = gen.t_min + (gen.t_max - gen.t_min) * ((n - st.step) / n)  # transformers' order
    proc = logits / jnp.asarray(temp, jnp.float32)
    sample = jnp.argmax(jax.nn.log_softmax(proc, axis=-1) + gumbel, axis=-1).astype(jnp.int32)
    argmax = jnp.argmax(proc, axis=-1).astype(jnp.int32)
    ent = entropy(proc)
    acc = entropy_bound_accept(ent, gen.entropy_bound)
    canvas = jnp.where(acc, sample, renoise.astype(jnp.int32))
    fin, hist = st.finished, st.history
    if gen.adaptive_stop:
        argmax = jnp.where(fin[:, None], st.argmax, argmax)
        canvas = jnp.where(fin[:, None], st.canvas, canvas)
        proc = jnp.where(fin[:, None, None], st.sc_logits, proc)  # (ent of frozen rows: unused)
        stop, hist = adaptive_stop(hist, argmax, ent, gen.stability_threshold,
                                   gen.confidence_threshold)
        fin = fin | stop
    return StepState(st.step + 1, canvas, argmax, proc, fin, hist, st.nfe + counted,
                     st.accepted.at[st.step].set(acc))


def _denoise_canvas(params: Params, cfg: ModelConfig, gen: CanvasConfig, cache: DG.EncoderCache,
                    done_seq: jax.Array, key: Any, noise: Any, k: int, kw: dict[str, Any]
                    ) -> StepState:
    """One canvas's denoising loop: the final state."""
    b, c, v = done_seq.shape[0], cfg.canvas_length, cfg.vocab_size

    def step(st: StepState) -> StepState:
        return denoise_step(params, cfg, gen, cache, st,
                            _draws(key, noise, k, st.step, (b, c), v, "gumbel"),
                            _draws(key, noise, k, st.step, (b, c), v, "renoise"), done_seq, **kw)

    def cond(st: StepState) -> jax.Array:
        return (st.step < gen.max_denoising_steps) & ~jnp.all(st.finished)

    start = init_state(gen, _draws(key, noise, k, 0, (b, c), v, "init"), v)
    return jax.lax.while_loop(cond, step, start)


def _finalize(tokens: jax.Array, done_seq: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """PAD after the first EOS of a canvas and over rows finished before it."""
    is_eos = tokens == cfg.eos_token_id
    csum = jnp.cumsum(is_eos.astype(jnp.int32), axis=-1)
    after = (csum > 0) & ~((csum == 1) & is_eos)
    tokens = jnp.where(done_seq[:, None] | after, cfg.pad_token_id, tokens)
    return tokens, done_seq | jnp.any(is_eos, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "gen", "attn_impl", "mesh", "moe_impl"))
def generate(params: Params, cfg: ModelConfig, prompt: jax.Array, prompt_valid: jax.Array,
             gen: CanvasConfig, key: jax.Array | None = None, noise: CanvasNoise | None = None,
             *, attn_impl: str = "auto", mesh: Any = None, moe_impl: str = "ragged"
             ) -> CanvasOutput:
    """Decode `gen.num_canvases` canvases after left-padded prompts `[B, P]` (valid False on
    padding); `key` or `noise` supplies the randomness (see the module docstring)."""
    if (key is None) == (noise is None):
        raise ValueError("pass exactly one of key (random draws) and noise (precomputed draws).")
    kw = dict(attn_impl=attn_impl, mesh=mesh, moe_impl=moe_impl)
    b = prompt.shape[0]
    _, cache = DG.encode(params, cfg, prompt, prompt_valid, **kw)
    done_seq = jnp.zeros((b,), bool)
    nfe = jnp.zeros((b,), jnp.int32)
    outs, steps, traces = [], [], []
    num = gen.num_canvases(cfg.canvas_length)
    for k in range(num):
        st = _denoise_canvas(params, cfg, gen, cache, done_seq, key, noise, k, kw)
        nfe = nfe + st.nfe
        tokens, done_seq = _finalize(st.argmax, done_seq, cfg)
        outs.append(tokens)
        steps.append(st.nfe)
        traces.append(st.accepted)
        if k + 1 < num:
            _, cache = DG.encode(params, cfg, tokens, cache=cache, **kw)
    out = jnp.concatenate(outs, axis=1)
    real = jnp.sum(out != cfg.pad_token_id, axis=-1)
    return CanvasOutput(out, nfe, jnp.stack(steps), jnp.stack(traces),
                        real / jnp.maximum(nfe, 1))
