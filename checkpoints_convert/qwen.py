"""Dream (Qwen2 names) and SDAR (Qwen3 names) key maps.

Dream (`Dream-org/Dream-v0-*-7B`, `modeling_dream.py`): `DreamModel.model = DreamBaseModel` with
`embed_tokens`, `layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
mlp.{gate,up,down}_proj}` and `norm`, plus `lm_head`; q/k/v always carry biases, o_proj none.
SDAR (`JetLM/SDAR-*`, Qwen3-based `modeling_sdar.py`): the same names, q/k/v biases only with
`attention_bias`, and per-head RMSNorm weights `self_attn.q_norm` / `self_attn.k_norm` [head_dim].
With `attention_bias` Qwen3 also gives `o_proj` a bias, which our model lacks: `ModelConfig`
refuses such configs (and an `o_proj.bias` tensor would be reported as unknown).
Known buffers skipped: `rotary_emb.inv_freq` (older exports saved it). With tied embeddings a
saved `lm_head.weight` duplicates `embed_tokens` and is skipped.
"""

from checkpoints_convert.keymap import KeyMap, Rule

_L = "model.layers.{i}."
T = ("transpose",)


def _qwen_rules(qk_norm: bool, bias_when: str | None) -> tuple[Rule, ...]:
    rules = [
        Rule("model.embed_tokens.weight", "embed"),
        Rule(_L + "input_layernorm.weight", "layers/attn_norm"),
        Rule(_L + "self_attn.q_proj.weight", "layers/q_proj", T),
        Rule(_L + "self_attn.k_proj.weight", "layers/k_proj", T),
        Rule(_L + "self_attn.v_proj.weight", "layers/v_proj", T),
        Rule(_L + "self_attn.q_proj.bias", "layers/q_bias", when=bias_when),
        Rule(_L + "self_attn.k_proj.bias", "layers/k_bias", when=bias_when),
        Rule(_L + "self_attn.v_proj.bias", "layers/v_bias", when=bias_when),
        Rule(_L + "self_attn.o_proj.weight", "layers/o_proj", T),
        Rule(_L + "post_attention_layernorm.weight", "layers/mlp_norm"),
        Rule(_L + "mlp.gate_proj.weight", "layers/gate_proj", T),
        Rule(_L + "mlp.up_proj.weight", "layers/up_proj", T),
        Rule(_L + "mlp.down_proj.weight", "layers/down_proj", T),
        Rule("model.norm.weight", "final_norm"),
        Rule("lm_head.weight", "lm_head", T, when="!tie_embeddings"),
        Rule("lm_head.weight", None, when="tie_embeddings"),
    ]
    if qk_norm:
        rules += [
            Rule(_L + "self_attn.q_norm.weight", "layers/q_norm", when="qk_norm"),
            Rule(_L + "self_attn.k_norm.weight", "layers/k_norm", when="qk_norm"),
        ]
    return tuple(rules)


_IGNORE = (r".*rotary_emb\.inv_freq$",)

DREAM = KeyMap(arch="dream", rules=_qwen_rules(qk_norm=False, bias_when="qkv_bias"), ignore=_IGNORE)
SDAR = KeyMap(arch="sdar", rules=_qwen_rules(qk_norm=True, bias_when="qkv_bias"), ignore=_IGNORE)
