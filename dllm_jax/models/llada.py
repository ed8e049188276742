"""LLaDA (GSAI-ML/LLaDA-8B-Base/Instruct, LLaDA-1.5): a bidirectional pre-norm SwiGLU decoder.

Hugging Face names as in the published `modeling_llada.py` (`LLaDAModelLM.model = LLaDAModel`,
whose `transformer` ModuleDict holds `wte`, `blocks`, `ln_f` and, without weight tying,
`ff_out`). In `LLaDALlamaBlock` the MLP is `ff_out(act(ff_proj(x)) * up_proj(x))`: `ff_proj`
is the gate, `up_proj` the up projection, the block's `ff_out` the down projection;
`attn_out` is the attention output projection. Norms are `attn_norm` (before attention) and
`ff_norm` (before the MLP). q/k/v carry biases when `include_qkv_bias` (our `qkv_bias`).
Rotary tables live in a non-persistent buffer cache, so no buffers appear in the checkpoint.
Not supported: `include_bias` (biases on every Linear and norm; `ModelConfig` refuses it),
`block_group_size > 1` (`block_groups.*` names) and the fused `att_proj` of the sequential
block type: such tensors are reported as unknown by the converter.
"""

from dllm_jax.models.params import Family, dense_decoder

_B = "model.transformer.blocks.{i}."

FAMILY = Family(arch="llada", weights=dense_decoder({
    "embed": "model.transformer.wte.weight",
    "attn_norm": _B + "attn_norm.weight",
    "q_proj": _B + "q_proj.weight", "k_proj": _B + "k_proj.weight",
    "v_proj": _B + "v_proj.weight",
    "q_bias": _B + "q_proj.bias", "k_bias": _B + "k_proj.bias", "v_bias": _B + "v_proj.bias",
    "o_proj": _B + "attn_out.weight",
    "mlp_norm": _B + "ff_norm.weight",
    "gate_proj": _B + "ff_proj.weight", "up_proj": _B + "up_proj.weight",
    "down_proj": _B + "ff_out.weight",
    "final_norm": "model.transformer.ln_f.weight",
    "lm_head": "model.transformer.ff_out.weight",
}))
