"""LLaDA (GSAI-ML/LLaDA-8B-Base/Instruct, LLaDA-1.5) key map.

Names as in the published `modeling_llada.py` (`LLaDAModelLM.model = LLaDAModel`, whose
`transformer` ModuleDict holds `wte`, `blocks`, `ln_f` and, without weight tying, `ff_out`).
In `LLaDALlamaBlock` the MLP is `ff_out(act(ff_proj(x)) * up_proj(x))`: `ff_proj` is the gate,
`up_proj` the up projection, the block's `ff_out` the down projection; `attn_out` is the
attention output projection. Norms are `attn_norm` (before attention) and `ff_norm` (before
the MLP). q/k/v carry biases when `include_qkv_bias` (our `qkv_bias`).
Rotary tables live in a non-persistent buffer cache, so no buffers appear in the checkpoint.
Not supported: `include_bias` (biases on every Linear and norm; `ModelConfig` refuses it),
`block_group_size > 1` (`block_groups.*` names) and the fused `att_proj` of the sequential
block type: such tensors are reported as unknown.
"""

from checkpoints_convert.keymap import KeyMap, Rule

_B = "model.transformer.blocks.{i}."
T = ("transpose",)

KEYMAP = KeyMap(
    arch="llada",
    rules=(
        Rule("model.transformer.wte.weight", "embed"),
        Rule(_B + "attn_norm.weight", "layers/attn_norm"),
        Rule(_B + "q_proj.weight", "layers/q_proj", T),
        Rule(_B + "k_proj.weight", "layers/k_proj", T),
        Rule(_B + "v_proj.weight", "layers/v_proj", T),
        Rule(_B + "q_proj.bias", "layers/q_bias", when="qkv_bias"),
        Rule(_B + "k_proj.bias", "layers/k_bias", when="qkv_bias"),
        Rule(_B + "v_proj.bias", "layers/v_bias", when="qkv_bias"),
        Rule(_B + "attn_out.weight", "layers/o_proj", T),
        Rule(_B + "ff_norm.weight", "layers/mlp_norm"),
        Rule(_B + "ff_proj.weight", "layers/gate_proj", T),
        Rule(_B + "up_proj.weight", "layers/up_proj", T),
        Rule(_B + "ff_out.weight", "layers/down_proj", T),
        Rule("model.transformer.ln_f.weight", "final_norm"),
        Rule("model.transformer.ff_out.weight", "lm_head", T, when="!tie_embeddings"),
    ),
    ignore=(r".*rotary_emb\.inv_freq$",),
)
