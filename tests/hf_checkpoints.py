"""Tiny Hugging Face-layout checkpoints for tests: real config.json field names, real tensor names.

    cfg = hf_config("llada")                          # config.json dict of a tiny LLaDA
    sd = random_state_dict("llada", cfg, seed=0)      # {HF name: numpy array, torch [out, in] layout}
    write_hf_checkpoint(tmp_path / "hf", sd, cfg, fmt="sharded")

`write_hf_checkpoint` also takes a torch `state_dict()` (e.g. of a transformers model built from
the same config) so that logits-parity tests can convert exactly the weights they run.
Formats: "safetensors" (model.safetensors), "sharded" (model-0000k-of-0000n.safetensors + index),
"bin" (pytorch_model.bin), "sharded_bin" (pytorch_model-0000k-of-0000n.bin + index).
The names below are written from the public modeling files, independently of the converter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

FORMATS = ("safetensors", "sharded", "bin", "sharded_bin")


# ----------------------------------------------------------------------------- configs
def llada_config(**overrides: Any) -> dict[str, Any]:
    """config.json of a tiny LLaDA (field names of GSAI-ML/LLaDA-8B-*'s config)."""
    cfg: dict[str, Any] = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada",
        "d_model": 32, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2, "mlp_hidden_size": 48,
        "mlp_ratio": 4, "vocab_size": 64, "embedding_size": 64, "max_sequence_length": 128,
        "rope": True, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "alibi": False,
        "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu",
        "attention_layer_norm": False, "include_bias": False, "include_qkv_bias": False,
        "weight_tying": False, "scale_logits": False, "input_emb_norm": False,
        "mask_token_id": 63, "eos_token_id": 1, "pad_token_id": 1,
    }
    cfg.update(overrides)
    return cfg


def dream_config(**overrides: Any) -> dict[str, Any]:
    """config.json of a tiny Dream (Qwen2 field names, model_type "Dream")."""
    cfg: dict[str, Any] = {
        "architectures": ["DreamModel"], "model_type": "Dream",
        "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64,
        "max_position_embeddings": 128, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "tie_word_embeddings": False, "rope_scaling": None,
        "mask_token_id": 63, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 1,
    }
    cfg.update(overrides)
    return cfg


def sdar_config(**overrides: Any) -> dict[str, Any]:
    """config.json of a tiny SDAR (Qwen3 field names; head_dim != hidden/heads on purpose)."""
    cfg: dict[str, Any] = {
        "architectures": ["SDARForCausalLM"], "model_type": "sdar",
        "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": 2, "vocab_size": 64,
        "max_position_embeddings": 128, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
        "rope_scaling": None, "block_size": 4,
        "mask_token_id": 63, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 1,
    }
    cfg.update(overrides)
    return cfg


def hf_config(arch: str, **overrides: Any) -> dict[str, Any]:
    """Tiny config.json dict for "llada" | "dream" | "sdar"."""
    return {"llada": llada_config, "dream": dream_config, "sdar": sdar_config}[arch](**overrides)


# ----------------------------------------------------------------------------- state dicts
def hf_shapes(arch: str, cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor names and PyTorch shapes ([out, in] for Linear) of a config."""
    shapes: dict[str, tuple[int, ...]] = {}
    if arch == "llada":
        d, h, L, f = cfg["d_model"], cfg["n_heads"], cfg["n_layers"], cfg["mlp_hidden_size"]
        kv = (cfg.get("n_kv_heads") or h) * (d // h)
        v = cfg.get("embedding_size") or cfg["vocab_size"]
        bias = cfg.get("include_qkv_bias")  # include_bias (biases everywhere) is not supported
        shapes["model.transformer.wte.weight"] = (v, d)
        for i in range(L):
            b = f"model.transformer.blocks.{i}."
            shapes.update({
                b + "attn_norm.weight": (d,), b + "ff_norm.weight": (d,),
                b + "q_proj.weight": (d, d), b + "k_proj.weight": (kv, d),
                b + "v_proj.weight": (kv, d), b + "attn_out.weight": (d, d),
                b + "ff_proj.weight": (f, d), b + "up_proj.weight": (f, d),
                b + "ff_out.weight": (d, f),
            })
            if bias:
                shapes.update({b + "q_proj.bias": (d,), b + "k_proj.bias": (kv,),
                               b + "v_proj.bias": (kv,)})
        shapes["model.transformer.ln_f.weight"] = (d,)
        if not cfg.get("weight_tying"):
            shapes["model.transformer.ff_out.weight"] = (v, d)
        return shapes
    d, h, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    f, v = cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or d // h
    kv = cfg.get("num_key_value_heads", h) * hd
    bias = arch == "dream" or cfg.get("attention_bias")
    shapes["model.embed_tokens.weight"] = (v, d)
    for i in range(L):
        b = f"model.layers.{i}."
        shapes.update({
            b + "input_layernorm.weight": (d,), b + "post_attention_layernorm.weight": (d,),
            b + "self_attn.q_proj.weight": (h * hd, d), b + "self_attn.k_proj.weight": (kv, d),
            b + "self_attn.v_proj.weight": (kv, d), b + "self_attn.o_proj.weight": (d, h * hd),
            b + "mlp.gate_proj.weight": (f, d), b + "mlp.up_proj.weight": (f, d),
            b + "mlp.down_proj.weight": (d, f),
        })
        if bias:
            shapes.update({b + "self_attn.q_proj.bias": (h * hd,),
                           b + "self_attn.k_proj.bias": (kv,), b + "self_attn.v_proj.bias": (kv,)})
        if arch == "sdar":
            shapes.update({b + "self_attn.q_norm.weight": (hd,), b + "self_attn.k_norm.weight": (hd,)})
    shapes["model.norm.weight"] = (d,)
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, d)
    return shapes


def random_state_dict(arch: str, cfg: Mapping[str, Any], seed: int = 0,
                      dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Random weights with HF names and PyTorch layouts (norm weights around 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_shapes(arch, cfg).items():
        x = rng.standard_normal(shape, dtype=np.float32)
        x = 1.0 + 0.1 * x if "norm" in name else 0.1 * x
        out[name] = x.astype(dtype)
    return out


# ----------------------------------------------------------------------------- writing
def _to_torch(sd: Mapping[str, Any]) -> dict[str, Any]:
    import ml_dtypes
    import torch

    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().cpu().contiguous()
        elif np.asarray(v).dtype == ml_dtypes.bfloat16:
            out[k] = torch.from_numpy(np.ascontiguousarray(v).view(np.int16)).view(torch.bfloat16)
        else:
            out[k] = torch.from_numpy(np.ascontiguousarray(v))
    return out


def _is_torch(sd: Mapping[str, Any]) -> bool:
    return any(type(v).__module__.startswith("torch") for v in sd.values())


def _save_safetensors(tensors: Mapping[str, Any], path: Path, torch_values: bool) -> None:
    if torch_values:
        from safetensors.torch import save_file

        save_file(dict(tensors), str(path), metadata={"format": "pt"})
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt"})


def write_hf_checkpoint(
    folder: str | Path,
    state_dict: Mapping[str, Any],
    config: Mapping[str, Any],
    fmt: str = "safetensors",
    num_shards: int = 2,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write `state_dict` (numpy arrays or torch tensors) + `config` as a HF model folder.

    Args:
      folder: created if missing.
      state_dict: `{HF name: tensor}` in PyTorch layout.
      config: the config.json dict.
      fmt: "safetensors" | "sharded" | "bin" | "sharded_bin".
      num_shards: shard count of the sharded formats.
      extra_files: `{file name: text}` written verbatim (e.g. tokenizer files).
    Returns:
      The folder.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.json", "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text, encoding="utf-8")
    names = list(state_dict)
    torch_values = _is_torch(state_dict)
    if fmt in ("bin", "sharded_bin"):
        import torch

        tensors = _to_torch(state_dict)
        if fmt == "bin":
            torch.save(tensors, folder / "pytorch_model.bin")
            return folder
        ext, prefix, index_name = "bin", "pytorch_model", "pytorch_model.bin.index.json"
    else:
        tensors = dict(state_dict)
        if fmt == "safetensors":
            _save_safetensors(tensors, folder / "model.safetensors", torch_values)
            return folder
        ext, prefix, index_name = "safetensors", "model", "model.safetensors.index.json"
    groups = [g for g in np.array_split(np.arange(len(names)), num_shards) if len(g)]
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        fname = f"{prefix}-{k:05d}-of-{len(groups):05d}.{ext}"
        part = {names[j]: tensors[names[j]] for j in group}
        if ext == "bin":
            import torch

            torch.save(part, folder / fname)
        else:
            _save_safetensors(part, folder / fname, torch_values)
        for name, t in part.items():
            weight_map[name] = fname
            total += int(np.prod(tuple(t.shape))) * (t.element_size() if hasattr(t, "element_size")
                                                     else np.asarray(t).dtype.itemsize)
    with open(folder / index_name, "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return folder
