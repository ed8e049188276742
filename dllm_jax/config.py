"""Model configuration: one frozen dataclass that expresses LLaDA, Dream, SDAR, DiffusionGemma and
tiny test models.

`ModelConfig.from_hf_config(d)` reads a Hugging Face `config.json` (as downloaded) and detects
the architecture from its `model_type` (DiffusionGemma's reading and checks: `config_gemma.py`).
Everything here is hashable so that a config can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal, Mapping

from dllm_jax import config_gemma

Arch = Literal["llada", "dream", "sdar", "diffusion_gemma"]
ARCHITECTURES: tuple[str, ...] = ("llada", "dream", "sdar", "diffusion_gemma")

# model_type strings found in the published config.json files, mapped to our architectures.
_MODEL_TYPES: dict[str, str] = {
    "llada": "llada",
    "dream": "dream",
    "sdar": "sdar",
    "diffusion_gemma": "diffusion_gemma",
    "diffusion_gemma_text": "diffusion_gemma",
}

# Public defaults of the released checkpoints (used when config.json omits them).
LLADA_MASK_ID = 126336
DREAM_MASK_ID = 151666
SDAR_MASK_ID = 151669  # SDAR (Qwen3 tokenizer): <|MASK|> comes after Qwen3's extra specials


class ConfigError(ValueError):
    """A configuration that cannot describe a supported model; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and flavour of a bidirectional (or block-causal) transformer denoiser.

    Attributes:
      arch: "llada" | "dream" | "sdar"; chooses the checkpoint key map.
      vocab_size: rows of the embedding and columns of the LM head.
      hidden_size: model width D.
      num_layers: transformer blocks L.
      num_heads: query heads H.
      num_kv_heads: key/value heads (GQA when < num_heads).
      head_dim: width of one head (may differ from hidden_size // num_heads, as in Qwen3/SDAR).
      intermediate_size: SwiGLU hidden width F.
      rope_theta: RoPE base.
      rms_norm_eps: epsilon of every RMSNorm.
      qkv_bias: q/k/v projections carry a bias (Dream / Qwen2).
      qk_norm: per-head RMSNorm on q and k before RoPE (SDAR / Qwen3).
      tie_embeddings: the LM head is the transposed embedding.
      logits_shift: the prediction for position i is read at i - 1 (Dream).
      block_causal: attention is causal across blocks of `block_size` positions and
        bidirectional inside one (SDAR).
      block_size: block length of block-causal attention (ignored otherwise).
      max_position: longest sequence (prompt + answer) the model accepts.
      mask_token_id, eos_token_id, pad_token_id: special token ids.
      eot_token_id: end-of-turn id (LLaDA-Instruct's <|eot_id|>), or -1.
    DiffusionGemma only (`config_gemma.py`; 0 / () elsewhere): layer_types ("sliding" |
      "full" per layer; num_kv_heads, head_dim and rope_theta are the sliding layers'),
      sliding_window (keys a sliding layer sees, itself included), global_head_dim,
      global_num_kv_heads, global_rope_theta, global_rope_fraction (the full layers';
      their keys double as values), num_experts, top_k_experts, moe_intermediate_size,
      logit_softcap (cap * tanh(logits / cap); 0: none), canvas_length.
    """

    arch: str = "llada"
    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    intermediate_size: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    logits_shift: bool = False
    block_causal: bool = False
    block_size: int = 0
    max_position: int = 4096
    mask_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 1
    eot_token_id: int = -1
    layer_types: tuple[str, ...] = ()
    sliding_window: int = 0
    global_head_dim: int = 0
    global_num_kv_heads: int = 0
    global_rope_theta: float = 0.0
    global_rope_fraction: float = 1.0
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
    logit_softcap: float = 0.0
    canvas_length: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {self.arch!r}; use one of {', '.join(ARCHITECTURES)}."
            )
        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # JSON gives lists
        if self.arch == config_gemma.ARCH:
            if (problem := config_gemma.check(self)) is not None:
                raise ConfigError(problem)
        elif self.layer_types or self.num_experts or self.logit_softcap or self.canvas_length:
            raise ConfigError("layer_types, num_experts, logit_softcap and canvas_length are "
                              "DiffusionGemma fields; leave them unset for " + self.arch + ".")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention."
            )
        if self.block_causal and self.block_size <= 0:
            raise ConfigError("block_causal attention needs a positive block_size.")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary (size {self.vocab_size})."
            )

    # ------------------------------------------------------------------ presets
    @property
    def q_size(self) -> int:
        """Width of the concatenated query heads, H * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the concatenated key (or value) heads."""
        return self.num_kv_heads * self.head_dim

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}; remove them.")
        return cls(**d)

    @classmethod
    def tiny(cls, arch: str = "llada", **overrides: Any) -> "ModelConfig":
        """A test-sized config of the given architecture (random weights run in milliseconds)."""
        base: dict[str, Any] = dict(arch=arch, vocab_size=128, hidden_size=64, num_layers=2,
                                    num_heads=4, num_kv_heads=4, head_dim=16,
                                    intermediate_size=96, max_position=512,
                                    mask_token_id=127, eos_token_id=1, pad_token_id=0)
        if arch == "dream":
            base.update(qkv_bias=True, logits_shift=True, num_kv_heads=2, rms_norm_eps=1e-6)
        elif arch == "sdar":
            base.update(qk_norm=True, block_causal=True, block_size=4, num_kv_heads=2,
                        rms_norm_eps=1e-6)
        elif arch == config_gemma.ARCH:
            base.update(config_gemma.TINY)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def llada_8b(cls) -> "ModelConfig":
        """LLaDA-8B-Base/Instruct shapes."""
        return cls(arch="llada", vocab_size=126464, hidden_size=4096, num_layers=32,
                   num_heads=32, num_kv_heads=32, head_dim=128, intermediate_size=12288,
                   rope_theta=500000.0, rms_norm_eps=1e-5, max_position=4096,
                   mask_token_id=LLADA_MASK_ID, eos_token_id=126081, pad_token_id=126081,
                   eot_token_id=126348)

    @classmethod
    def dream_7b(cls) -> "ModelConfig":
        """Dream-v0-7B shapes (Qwen2.5-7B backbone)."""
        return cls(arch="dream", vocab_size=152064, hidden_size=3584, num_layers=28,
                   num_heads=28, num_kv_heads=4, head_dim=128, intermediate_size=18944,
                   rope_theta=1000000.0, rms_norm_eps=1e-6, qkv_bias=True, logits_shift=True,
                   max_position=131072, mask_token_id=DREAM_MASK_ID, eos_token_id=151643,
                   pad_token_id=151643)

    @classmethod
    def sdar_8b(cls, block_size: int = 4) -> "ModelConfig":
        """SDAR-8B shapes (the Qwen3-8B backbone, block-causal with `block_size`)."""
        return cls(arch="sdar", vocab_size=151936, hidden_size=4096, num_layers=36,
                   num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=12288,
                   rope_theta=1000000.0, rms_norm_eps=1e-6, qk_norm=True, block_causal=True,
                   block_size=block_size, max_position=40960, mask_token_id=151669,
                   eos_token_id=151645, pad_token_id=151643)

    # ------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Build from the dict of a Hugging Face `config.json`, detecting the architecture."""
        model_type = str(hf.get("model_type", "")).lower()
        arch = _MODEL_TYPES.get(model_type)
        if arch is None:
            raise ConfigError(
                f"unknown model_type {hf.get('model_type')!r} in config.json; supported: "
                f"{', '.join(sorted(_MODEL_TYPES))} (LLaDA, Dream, SDAR checkpoints)."
            )
        try:
            if arch == config_gemma.ARCH:
                return cls(**config_gemma.from_hf(hf, ConfigError))
            if arch == "llada":
                return _from_llada(hf)
            return _from_qwen_like(hf, arch)
        except KeyError as e:
            raise ConfigError(
                f"config.json of a {arch} model lacks the field {e.args[0]!r}; use the "
                f"config.json that came with the checkpoint."
            ) from None

    @classmethod
    def from_hf_file(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path, encoding="utf-8") as f:
            try:
                hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON ({e}); re-download config.json.") from None
        return cls.from_hf_config(hf)


def _first_id(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else default
    return int(value)


def _rope_theta(hf: Mapping[str, Any], default: float) -> float:
    """RoPE base from `rope_theta` or transformers-5 style `rope_parameters`; plain RoPE only."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        raise ConfigError(f"RoPE scaling {kind!r} is not supported; only plain RoPE.")
    return float(hf.get("rope_theta") or params.get("rope_theta") or default)


def _from_llada(hf: Mapping[str, Any]) -> ModelConfig:
    unsupported = {
        "block_type": ("llama", None),
        "layer_norm_type": ("rms", None),
        # LLaDALlamaBlock computes act(ff_proj(x)) * up_proj(x); with "swiglu" the act would
        # itself split ff_proj's output in two, a different (upstream: shape-broken) block.
        "activation_type": ("silu", None),
        # include_bias adds biases to attn_out, ff_proj, up_proj, ff_out, the norms and the
        # head, which the params layout has no slot for (q/k/v biases: include_qkv_bias).
        "include_bias": (False, None),
        "bias_for_layer_norm": (False, None),
        "layer_norm_with_affine": (True, None),
        "alibi": (False, None),
        "rope": (True, None),
        "attention_layer_norm": (False, None),
        "scale_logits": (False, None),
        "input_emb_norm": (False, None),
    }
    for key, allowed in unsupported.items():
        if hf.get(key) not in allowed:
            raise ConfigError(
                f"LLaDA config field {key}={hf.get(key)!r} is not supported (supported: "
                f"{[a for a in allowed if a is not None]}); only the released LLaDA "
                f"architecture can be converted."
            )
    d_model = int(hf["d_model"])
    n_heads = int(hf["n_heads"])
    n_kv = hf.get("n_kv_heads") or (1 if hf.get("multi_query_attention") else n_heads)
    vocab = int(hf.get("embedding_size") or hf["vocab_size"])
    eos = _first_id(hf.get("eos_token_id"), 126081)
    return ModelConfig(
        arch="llada",
        vocab_size=vocab,
        hidden_size=d_model,
        num_layers=int(hf["n_layers"]),
        num_heads=n_heads,
        num_kv_heads=int(n_kv),
        head_dim=d_model // n_heads,
        intermediate_size=int(hf["mlp_hidden_size"]),
        rope_theta=_rope_theta(hf, 10000.0),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        qkv_bias=bool(hf.get("include_qkv_bias", False)),
        tie_embeddings=bool(hf.get("weight_tying", False)),
        max_position=int(hf.get("max_sequence_length", 4096)),
        mask_token_id=_first_id(hf.get("mask_token_id"), LLADA_MASK_ID),
        eos_token_id=eos,
        pad_token_id=_first_id(hf.get("pad_token_id"), eos),
        eot_token_id=_first_id(hf.get("eot_token_id"), 126348 if vocab > 126348 else -1),
    )


def _from_qwen_like(hf: Mapping[str, Any], arch: str) -> ModelConfig:
    hidden = int(hf["hidden_size"])
    n_heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hidden // n_heads)
    eos = _first_id(hf.get("eos_token_id"), 151643)
    if arch == "dream":
        qkv_bias, qk_norm, shift, block_causal, block = True, False, True, False, 0
        mask_default = DREAM_MASK_ID
    else:
        if hf.get("attention_bias", False):
            # Qwen3 / SDAR: attention_bias puts a bias on o_proj as well as on q/k/v.
            raise ConfigError("SDAR with attention_bias=true (q/k/v and o_proj biases) is not "
                              "supported; the released SDAR checkpoints have no attention bias.")
        qkv_bias = False
        qk_norm, shift, block_causal = True, False, True
        block = int(hf.get("block_size") or 4)
        mask_default = SDAR_MASK_ID
    if hf.get("use_sliding_window", False):
        raise ConfigError("use_sliding_window=true is not supported; only full attention.")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={hf.get('hidden_act')!r} is not supported; only silu (SwiGLU).")
    return ModelConfig(
        arch=arch,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=n_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        intermediate_size=int(hf["intermediate_size"]),
        rope_theta=_rope_theta(hf, 10000.0),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        logits_shift=shift,
        block_causal=block_causal,
        block_size=block,
        max_position=int(hf.get("max_position_embeddings", 32768)),
        mask_token_id=_first_id(hf.get("mask_token_id"), mask_default),
        eos_token_id=eos,
        pad_token_id=_first_id(hf.get("pad_token_id"), eos),
    )


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Static settings of one decode (hashable: a static argument of the compiled loop).

    gen_length: answer tokens G, decoded as G / block_length semi-autoregressive blocks.
    block_length: tokens per block Lb (gen_length for Dream's whole-answer decoding).
    steps: step budget of the fixed schedules (LLaDA's transfer counts, Dream's time grid),
      split evenly across blocks as the originals do. Adaptive controllers may use fewer.
      Every controller but Dream's orders commits at least one token per step, so a decode
      of those runs at most gen_length steps: a larger budget is allowed here (LLaDA's
      reference code accepts it and the parity tests use it) but has no effect, and the
      command line refuses it (`cli_options.decode_settings`); Dream's orders run every step
      of their time grid, committing nothing in some.
    temperature: 0 is greedy; see `features.observe` for the two sampling conventions.
    cfg_scale: classifier-free guidance (LLaDA): logits = u + (cfg + 1) * (c - u), where u
      comes from a second forward with the prompt masked.
    logits_eos_inf: EOS logit set to -inf (LLaDA option).
    confidence_eos_eot_inf: EOS / end-of-turn candidates get confidence -inf (LLaDA option).
    stop_at_eos: once a row commits an EOS, its masked positions after it become EOS, so the
      row finishes early (the LLaDA-Instruct convention of padding the answer with EOS).
    trace: record per-step features of the active block in DecodeStats.trace.
    momentum_beta: smoothing of the confidence momentum in the trajectory.
    attn_impl: "auto" | "xla" | "cudnn".
    cache: "none" | "prefix" | "dual" block-wise KV cache (see `cache.py`).
    refresh_every: with a cache, also refresh every this many steps inside a block (0: only
      at block starts; 1: every step, which equals the uncached decode).
    refresh_scope: what a block-start refresh recomputes (bidirectional models with a cache):
      "full" (Fast-dLLM: one forward over prompt + answer, the default) or "answer" (after
      the decode's first refresh the prompt's keys/values are kept and only the answer is
      recomputed, attending to them: G instead of P + G query positions).
    refresh_blocks: refresh at the start of every this many-th block only (1: every block,
      Fast-dLLM; k > 1: the other blocks start with a cached step on the stale entries).
    """

    gen_length: int = 64
    block_length: int = 32
    steps: int = 64
    temperature: float = 0.0
    cfg_scale: float = 0.0
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    stop_at_eos: bool = False
    trace: bool = False
    momentum_beta: float = 0.5
    attn_impl: str = "auto"
    cache: str = "none"
    refresh_every: int = 0
    refresh_scope: str = "full"
    refresh_blocks: int = 1

    def __post_init__(self) -> None:
        if self.gen_length <= 0 or self.block_length <= 0:
            raise ConfigError(
                f"gen_length ({self.gen_length}) and block_length ({self.block_length}) must be "
                f"positive.")
        if self.gen_length % self.block_length:
            raise ConfigError(
                f"gen_length ({self.gen_length}) must be a multiple of block_length "
                f"({self.block_length}); e.g. --gen-length "
                f"{-(-self.gen_length // self.block_length) * self.block_length}.")
        if self.steps <= 0 or self.steps % self.num_blocks:
            raise ConfigError(
                f"steps ({self.steps}) must be a positive multiple of the number of blocks "
                f"({self.num_blocks} = gen_length / block_length), as in LLaDA's generate; "
                f"e.g. --steps {max(1, round(self.steps / self.num_blocks)) * self.num_blocks}.")
        if self.temperature < 0 or self.cfg_scale < 0:
            raise ConfigError("temperature and cfg_scale must be >= 0.")
        if self.cache not in ("none", "prefix", "dual"):
            raise ConfigError(f"cache must be 'none', 'prefix' or 'dual', got {self.cache!r}.")
        if self.refresh_every < 0:
            raise ConfigError(f"refresh_every must be >= 0, got {self.refresh_every}.")
        if self.refresh_scope not in ("full", "answer"):
            raise ConfigError(f"refresh_scope must be 'full' or 'answer', got "
                              f"{self.refresh_scope!r}.")
        if self.refresh_blocks < 1:
            raise ConfigError(f"refresh_blocks must be >= 1 (1: every block), got "
                              f"{self.refresh_blocks}.")
        if (self.refresh_scope != "full" or self.refresh_blocks != 1) and self.cache == "none":
            raise ConfigError("refresh_scope and refresh_blocks set how a KV cache is "
                              "refreshed; they need cache 'prefix' or 'dual'.")
        if self.refresh_blocks > 1 and self.refresh_every > 0:
            raise ConfigError("refresh_blocks > 1 skips block-start refreshes and "
                              "refresh_every > 0 adds refreshes inside blocks: use one of them.")
        if self.attn_impl not in ("auto", "xla", "cudnn"):
            raise ConfigError(f"attn_impl must be 'auto', 'xla' or 'cudnn', got {self.attn_impl!r}.")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def max_steps(self) -> int:
        """Bound of the loop: every step commits >= 1 token, or follows a schedule of `steps`."""
        return max(self.gen_length, self.steps)
