"""DiffusionGemma's part of `ModelConfig`: reading its Hugging Face `config.json` and checking
its fields (kept out of `config.py`, which holds the dataclass; this module imports nothing
from the library, so `config.py` can call it).

What is read (transformers' `DiffusionGemmaConfig` / `DiffusionGemmaTextConfig`, text part;
the vision tower is not ported): the shapes, `layer_types` (sliding / full attention; by
default 5 sliding then 1 full, the last layer forced to full as transformers does), the
per-type overrides of the full-attention layers (`per_layer_config`, or `global_head_dim`
(default 512) and `num_global_key_value_heads` gated by `attention_k_eq_v`), the RoPE of
each type (`default` on sliding layers; `proportional` with `partial_rotary_factor` on full
ones), the MoE sizes, `final_logit_softcapping` (30) and the top-level `canvas_length` (256).
Refused with a sentence: `use_bidirectional_attention="all"` (a bidirectional encoder with a
halved window), an activation other than GELU-tanh, attention biases, untied embeddings,
RoPE scaling factors, no MoE.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

ARCH = "diffusion_gemma"
SLIDING, FULL = "sliding", "full"
_HF_TYPES = {"sliding_attention": SLIDING, "full_attention": FULL}

#: `ModelConfig.tiny("diffusion_gemma")`: 4 layers (sliding, full, sliding, full).
TINY: dict[str, Any] = dict(
    num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
    rms_norm_eps=1e-6, qk_norm=True, tie_embeddings=True, mask_token_id=0,
    layer_types=(SLIDING, FULL, SLIDING, FULL), sliding_window=6, global_head_dim=16,
    global_num_kv_heads=1, global_rope_theta=1e6, global_rope_fraction=0.25, num_experts=4,
    top_k_experts=2, moe_intermediate_size=16, logit_softcap=30.0, canvas_length=8,
)


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """transformers' default: every sixth layer full, the last one full."""
    types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(num_layers)]
    types[-1] = FULL
    return tuple(types)


def check(cfg: Any) -> str | None:
    """The first problem of a diffusion_gemma ModelConfig as one sentence, or None."""
    types = cfg.layer_types
    if len(types) != cfg.num_layers or any(t not in (SLIDING, FULL) for t in types):
        return (f"layer_types must name each of the {cfg.num_layers} layers 'sliding' or "
                f"'full', got {list(types)}.")
    if SLIDING not in types or FULL not in types:
        return "a diffusion_gemma model needs both sliding and full attention layers."
    for name in ("sliding_window", "global_head_dim", "global_num_kv_heads", "num_experts",
                 "top_k_experts", "moe_intermediate_size", "canvas_length"):
        if int(getattr(cfg, name)) <= 0:
            return f"{name} must be a positive integer for diffusion_gemma, got {getattr(cfg, name)!r}."
    if cfg.head_dim % 2 or cfg.global_head_dim % 2:
        return f"head dims must be even for RoPE, got {cfg.head_dim} and {cfg.global_head_dim}."
    if cfg.num_heads % cfg.global_num_kv_heads:
        return (f"num_heads ({cfg.num_heads}) must be a multiple of global_num_kv_heads "
                f"({cfg.global_num_kv_heads}).")
    if cfg.top_k_experts > cfg.num_experts:
        return f"top_k_experts ({cfg.top_k_experts}) exceeds num_experts ({cfg.num_experts})."
    if not 0.0 < cfg.global_rope_fraction <= 1.0 or cfg.global_rope_theta <= 0:
        return ("global_rope_fraction must be in (0, 1] and global_rope_theta positive, got "
                f"{cfg.global_rope_fraction} and {cfg.global_rope_theta}.")
    if cfg.logit_softcap < 0:
        return f"logit_softcap must be >= 0 (0: none), got {cfg.logit_softcap}."
    if not (cfg.tie_embeddings and cfg.qk_norm) or cfg.qkv_bias or cfg.logits_shift or cfg.block_causal:
        return ("diffusion_gemma has tied embeddings and q/k norms, no biases, no logit shift "
                "and no block-causal mask: set tie_embeddings and qk_norm, clear the others.")
    return None


def _rope(params: Mapping[str, Any] | None, kind: str, error: Callable[[str], Exception]
          ) -> tuple[float, float]:
    """(theta, rotary fraction) of one layer type's `rope_parameters` entry."""
    defaults = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                       "rope_theta": 1_000_000.0}}
    p = dict(params or defaults[kind])
    rope_type = p.get("rope_type", "default")
    fraction = float(p.get("partial_rotary_factor", 1.0))
    if float(p.get("factor", 1.0)) != 1.0:
        raise error(f"RoPE scaling factor {p['factor']} on {kind} layers is not supported.")
    if rope_type not in ("default", "proportional") or (rope_type == "default" and fraction != 1.0):
        raise error(f"RoPE {rope_type!r} with partial_rotary_factor {fraction} on {kind} layers "
                    f"is not supported; DiffusionGemma uses 'default' (sliding) and "
                    f"'proportional' (full).")
    if kind == SLIDING and fraction != 1.0:
        raise error("partial rotary RoPE on sliding layers is not supported.")
    return float(p.get("rope_theta", defaults[kind]["rope_theta"])), fraction


def _overrides(t: Mapping[str, Any], types: tuple[str, ...], error: Callable[[str], Exception]
               ) -> tuple[int, int, int, int]:
    """(head_dim, kv heads) of the sliding and of the full layers, as transformers resolves
    them (`per_layer_config` as saved, else `global_head_dim` / `num_global_key_value_heads`)."""
    head_dim, kv = int(t.get("head_dim", 256)), int(t.get("num_key_value_heads", 4))
    plc = t.get("per_layer_config")
    if plc is None:
        gkv = t.get("num_global_key_value_heads") if t.get("attention_k_eq_v", True) else None
        plc = {i: {"head_dim": t.get("global_head_dim", 512),
                   **({"num_key_value_heads": gkv} if gkv is not None else {})}
               for i, kind in enumerate(types) if kind == FULL}
    plc = {int(k): v for k, v in dict(plc).items()}
    found: dict[str, set[tuple[int, int]]] = {SLIDING: set(), FULL: set()}
    for i, kind in enumerate(types):
        o = plc.get(i, {})
        found[kind].add((int(o.get("head_dim", head_dim)), int(o.get("num_key_value_heads", kv))))
    if len(found[SLIDING]) != 1 or len(found[FULL]) != 1:
        raise error("per_layer_config gives layers of one attention type different head dims or "
                    "key/value heads; only one shape per type (sliding / full) is supported.")
    (s_hd, s_kv), (f_hd, f_kv) = found[SLIDING].pop(), found[FULL].pop()
    return s_hd, s_kv, f_hd, f_kv


def from_hf(hf: Mapping[str, Any], error: Callable[[str], Exception]) -> dict[str, Any]:
    """ModelConfig fields from a DiffusionGemma `config.json` (`diffusion_gemma`, or its bare
    `diffusion_gemma_text` part). Raises `error(sentence)` on what the port does not cover;
    a missing required field raises KeyError."""
    t = hf if hf.get("model_type") == "diffusion_gemma_text" else hf["text_config"]
    n = int(t["num_hidden_layers"])
    raw = t.get("layer_types")
    if raw is None:
        types = default_layer_types(n)
    else:
        if any(x not in _HF_TYPES for x in raw):
            raise error(f"layer_types {list(raw)} holds types other than sliding_attention / "
                        f"full_attention.")
        types = tuple(_HF_TYPES[x] for x in raw[:-1]) + (FULL,)  # transformers forces the last
    if t.get("use_bidirectional_attention") == "all":
        raise error("use_bidirectional_attention='all' (a bidirectional encoder) is not "
                    "supported; the released DiffusionGemma encoder is causal.")
    if t.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise error(f"hidden_activation {t.get('hidden_activation')!r} is not supported; only "
                    f"GELU-tanh.")
    if t.get("attention_bias", False):
        raise error("attention_bias=true is not supported; DiffusionGemma has no attention biases.")
    if not (hf.get("tie_word_embeddings", True) and t.get("tie_word_embeddings", True)):
        raise error("tie_word_embeddings=false (untied encoder, decoder and head) is not supported.")
    if not t.get("num_experts"):
        raise error("config.json has no num_experts; DiffusionGemma layers always have a MoE block.")
    rope = t.get("rope_parameters") or {}
    theta, _ = _rope(rope.get("sliding_attention"), SLIDING, error)
    g_theta, g_fraction = _rope(rope.get("full_attention"), FULL, error)
    s_hd, s_kv, f_hd, f_kv = _overrides(t, types, error)
    cap = t.get("final_logit_softcapping", 30.0)
    pad = t.get("pad_token_id", 0)
    eos = t.get("eos_token_id", 1)
    return dict(
        arch=ARCH, vocab_size=int(t["vocab_size"]), hidden_size=int(t["hidden_size"]),
        num_layers=n, num_heads=int(t["num_attention_heads"]), num_kv_heads=s_kv, head_dim=s_hd,
        intermediate_size=int(t["intermediate_size"]), rope_theta=theta,
        rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)), qk_norm=True, tie_embeddings=True,
        max_position=int(t.get("max_position_embeddings", 131_072)),
        mask_token_id=0 if pad is None else int(pad),
        eos_token_id=int(eos[0] if isinstance(eos, (list, tuple)) else eos),
        pad_token_id=0 if pad is None else int(pad),
        layer_types=types, sliding_window=int(t.get("sliding_window", 512)),
        global_head_dim=f_hd, global_num_kv_heads=f_kv, global_rope_theta=g_theta,
        global_rope_fraction=g_fraction, num_experts=int(t["num_experts"]),
        top_k_experts=int(t["top_k_experts"]), moe_intermediate_size=int(t["moe_intermediate_size"]),
        logit_softcap=0.0 if cap is None else float(cap),
        canvas_length=int(hf.get("canvas_length") or 256),
    )
