"""Dream (`Dream-org/Dream-v0-*-7B`, `modeling_dream.py`): a Qwen2 decoder denoising
bidirectionally, its logits shifted (`ModelConfig.logits_shift`: the prediction for position i
is read at i - 1).

Hugging Face names: `DreamModel.model = DreamBaseModel` with `embed_tokens`,
`layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
mlp.{gate,up,down}_proj}` and `norm`, plus `lm_head`; q/k/v always carry biases, o_proj none.
Known buffers skipped: `rotary_emb.inv_freq` (older exports saved it). With tied embeddings a
saved `lm_head.weight` duplicates `embed_tokens` and is skipped.
"""

from dllm_jax.models.params import Family, dense_decoder

_L = "model.layers.{i}."

QWEN_NAMES = {
    "embed": "model.embed_tokens.weight",
    "attn_norm": _L + "input_layernorm.weight",
    "q_proj": _L + "self_attn.q_proj.weight", "k_proj": _L + "self_attn.k_proj.weight",
    "v_proj": _L + "self_attn.v_proj.weight",
    "q_bias": _L + "self_attn.q_proj.bias", "k_bias": _L + "self_attn.k_proj.bias",
    "v_bias": _L + "self_attn.v_proj.bias",
    "q_norm": _L + "self_attn.q_norm.weight", "k_norm": _L + "self_attn.k_norm.weight",
    "o_proj": _L + "self_attn.o_proj.weight",
    "mlp_norm": _L + "post_attention_layernorm.weight",
    "gate_proj": _L + "mlp.gate_proj.weight", "up_proj": _L + "mlp.up_proj.weight",
    "down_proj": _L + "mlp.down_proj.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
HF_SKIP = (("lm_head.weight", "tie_embeddings"),)

FAMILY = Family(arch="dream", weights=dense_decoder(QWEN_NAMES), hf_skip=HF_SKIP)
