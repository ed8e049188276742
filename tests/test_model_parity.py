"""The JAX forward (`dllm_jax.models.apply`) against independent PyTorch references, float32.

References:
  LLaDA  `tests/torch_llada.py` (our own minimal re-implementation of the published
         `modeling_llada.py`, same parameter names as the HF checkpoint).
  Dream  transformers' `Qwen2ForCausalLM` made bidirectional with `Qwen2Config(is_causal=False)`
         (verified in transformers 5.23 for eager and sdpa), logits shifted as Dream's
         `generation_utils` does: `cat([logits[:, :1], logits[:, :-1]], 1)`.
  SDAR   transformers' `Qwen3ForCausalLM` with a block-causal 4D attention mask. In 5.23 a
         4D mask is passed through untouched; the eager kernel *adds* it to the scores, so it
         must be an additive float mask (0 / finfo.min): a bool 4D mask is silently added as
         0/1 there. We use eager with an additive mask.

Weights reach JAX the way users' do: the torch model's state_dict is written as a real HF
folder (`tests/hf_checkpoints.write_hf_checkpoint`: one case per format, safetensors,
sharded safetensors + index, .bin, sharded .bin + index), converted by the CLI
(`python -m checkpoints_convert SRC DST --dtype float32`, in a subprocess once, through its
`main(argv)` otherwise) and read back with `dllm_jax.checkpoint.load_model`. The converted
params must also equal, exactly, a test-local name map of the same state_dict
(`params_from_state_dict`, which is the fallback while the converter is absent).

Every case runs a left-padded batch (rows with 0, 5 and 11 pad tokens) and compares only
the positions whose logits come from real tokens. Parity bound: max abs diff <= 1e-4.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dllm_jax import models as M
from dllm_jax.config import ConfigError, ModelConfig
try:  # tests/ as a package or as pytest's rootdir-inserted path
    from tests.torch_llada import TorchLLaDA, TorchLLaDAConfig, randomize_parameters
except ImportError:
    from torch_llada import TorchLLaDA, TorchLLaDAConfig, randomize_parameters

transformers = pytest.importorskip("transformers")

try:  # the real conversion path (checkpoints_convert + checkpoint.load_model + HF writer)
    from checkpoints_convert.__main__ import main as convert_main
    from dllm_jax.checkpoint import load_model
    try:
        from tests.hf_checkpoints import write_hf_checkpoint
    except ImportError:
        from hf_checkpoints import write_hf_checkpoint
    HAVE_CONVERTER = True
except ImportError:  # pragma: no cover - only before the converter landed
    HAVE_CONVERTER = False

ATOL = 1e-4
T = 24
PADS = (0, 5, 11)
BF16_TOL = 0.05  # max |bf16 - f32| logits, relative to max(1, max |f32 logits|)


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One tiny model: the architecture and its HF-style shape knobs."""

    id: str
    arch: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int  # LLaDA and Dream derive it as hidden // heads; SDAR may differ
    tied: bool
    bias: bool = False  # LLaDA include_qkv_bias (Dream always has q/k/v bias)
    theta: float = 10000.0
    block: int = 4  # SDAR block size
    fmt: str = "safetensors"  # HF folder format the case is written in
    ffn: int = 96
    vocab: int = 128


CASES = [
    Case("llada-mha-untied", "llada", 64, 4, 4, 16, tied=False, theta=500000.0, fmt="sharded"),
    Case("llada-gqa-bias-tied-hd20", "llada", 40, 2, 1, 20, tied=True, bias=True, fmt="bin"),
    Case("dream-gqa-untied-hd12", "dream", 48, 4, 2, 12, tied=False, theta=1000000.0,
         fmt="safetensors"),
    Case("dream-mha-tied-hd20", "dream", 40, 2, 2, 20, tied=True, fmt="sharded_bin"),
    Case("sdar-gqa-untied-hd20", "sdar", 48, 4, 2, 20, tied=False, block=4, fmt="sharded"),
    Case("sdar-mqa-tied-hd36", "sdar", 32, 2, 1, 36, tied=True, block=3, fmt="bin"),
]
CLI_SUBPROCESS_CASE = "llada-mha-untied"  # converted by a real `python -m checkpoints_convert`


@dataclasses.dataclass
class Built:
    """A case instantiated: torch reference, its HF config.json dict, our config and params."""

    case: Case
    torch_model: torch.nn.Module
    hf_config: dict[str, Any]
    cfg: ModelConfig
    params: Any


def _torch_model(case: Case, seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    if case.arch == "llada":
        assert case.hidden // case.heads == case.head_dim
        tc = TorchLLaDAConfig(d_model=case.hidden, n_heads=case.heads, n_kv_heads=case.kv_heads,
                              mlp_hidden_size=case.ffn, vocab_size=case.vocab,
                              rope_theta=case.theta, include_qkv_bias=case.bias,
                              weight_tying=case.tied)
        return TorchLLaDA(tc).randomize(seed).eval(), tc.to_hf_dict()
    common = dict(vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.ffn,
                  num_hidden_layers=2, num_attention_heads=case.heads,
                  num_key_value_heads=case.kv_heads, rms_norm_eps=1e-6,
                  max_position_embeddings=512, tie_word_embeddings=case.tied,
                  rope_parameters={"rope_type": "default", "rope_theta": case.theta},
                  attn_implementation="eager")
    if case.arch == "dream":
        assert case.hidden // case.heads == case.head_dim
        hf_cfg = transformers.Qwen2Config(is_causal=False, **common)
        tm = transformers.Qwen2ForCausalLM(hf_cfg)
        model_type = "Dream"  # as in Dream-v0's config.json
    else:
        hf_cfg = transformers.Qwen3Config(head_dim=case.head_dim, attention_bias=False, **common)
        tm = transformers.Qwen3ForCausalLM(hf_cfg)
        model_type = "sdar"
    randomize_parameters(tm, seed)
    d = hf_cfg.to_dict()
    d["model_type"] = model_type
    d["mask_token_id"] = case.vocab - 1  # a tiny vocabulary has no 151666 / 151669
    if case.arch == "sdar":
        d["block_size"] = case.block
    return tm.eval(), d


def _stack(sd: dict[str, torch.Tensor], used: set[str], fmt: str, n_layers: int,
           transpose: bool) -> np.ndarray:
    out = []
    for i in range(n_layers):
        key = fmt.format(i=i)
        used.add(key)
        a = sd[key].detach().float().numpy()
        out.append(a.T if transpose else a)
    return np.stack(out)


# Our params layout name -> (HF name inside a layer, transpose?), per architecture.
_LLADA_LAYER = {
    "attn_norm": ("attn_norm.weight", False), "mlp_norm": ("ff_norm.weight", False),
    "q_proj": ("q_proj.weight", True), "k_proj": ("k_proj.weight", True),
    "v_proj": ("v_proj.weight", True), "o_proj": ("attn_out.weight", True),
    "gate_proj": ("ff_proj.weight", True), "up_proj": ("up_proj.weight", True),
    "down_proj": ("ff_out.weight", True),
    "q_bias": ("q_proj.bias", False), "k_bias": ("k_proj.bias", False),
    "v_bias": ("v_proj.bias", False),
}
_QWEN_LAYER = {
    "attn_norm": ("input_layernorm.weight", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True), "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True), "o_proj": ("self_attn.o_proj.weight", True),
    "gate_proj": ("mlp.gate_proj.weight", True), "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False), "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False), "k_norm": ("self_attn.k_norm.weight", False),
}


def params_from_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, Any]:
    """Map an HF state_dict to our params layout (test-local stand-in for the converter).

    Fails if a tensor of the state_dict is left unused (a weight our forward would ignore).
    """
    used: set[str] = set()
    llada = cfg.arch == "llada"
    layer_prefix = "model.transformer.blocks.{i}." if llada else "model.layers.{i}."
    table = _LLADA_LAYER if llada else _QWEN_LAYER
    wanted = M.param_shapes(cfg)
    layers = {name: _stack(sd, used, layer_prefix + table[name][0], cfg.num_layers,
                           table[name][1]) for name in wanted["layers"]}

    def top(key: str, transpose: bool = False) -> np.ndarray:
        used.add(key)
        a = sd[key].detach().float().numpy()
        return a.T if transpose else a

    if llada:
        params = {"embed": top("model.transformer.wte.weight"), "layers": layers,
                  "final_norm": top("model.transformer.ln_f.weight")}
        if not cfg.tie_embeddings:
            params["lm_head"] = top("model.transformer.ff_out.weight", True)
    else:
        params = {"embed": top("model.embed_tokens.weight"), "layers": layers,
                  "final_norm": top("model.norm.weight")}
        if cfg.tie_embeddings:
            used.add("lm_head.weight")  # the tied copy
        else:
            params["lm_head"] = top("lm_head.weight", True)
    assert set(sd) == used, f"state_dict tensors not consumed: {sorted(set(sd) - used)}"
    shapes = jax.tree.map(lambda s: s.shape, wanted)
    assert jax.tree.map(lambda a: a.shape, params) == shapes
    return jax.tree.map(jnp.asarray, params)


@functools.lru_cache(maxsize=None)
def build(case_id: str) -> Built:
    case = next(c for c in CASES if c.id == case_id)
    seed = CASES.index(case)
    torch.manual_seed(seed)
    tm, hf = _torch_model(case, seed)
    cfg = ModelConfig.from_hf_config(hf)
    # the config we read back describes the model we built
    assert (cfg.arch, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.tie_embeddings) == (case.arch, case.hidden, case.heads, case.kv_heads,
                                    case.head_dim, case.tied)
    assert cfg.rope_theta == case.theta
    if case.arch == "sdar":
        assert cfg.block_causal and cfg.block_size == case.block
    params = params_from_state_dict(tm.state_dict(), cfg)
    return Built(case, tm, hf, cfg, params)


def hf_state_dict(b: Built) -> dict[str, torch.Tensor]:
    """The tensors a `save_pretrained` folder holds: a tied head is not saved twice."""
    sd = dict(b.torch_model.state_dict())
    if b.cfg.tie_embeddings and b.cfg.arch != "llada":
        sd.pop("lm_head.weight")
    return sd


def converted_params(b: Built, folder: Path) -> Any:
    """Write the torch weights as an HF folder, convert with the CLI, `load_model` the result."""
    src, dst = folder / "hf", folder / "converted"
    write_hf_checkpoint(src, hf_state_dict(b), b.hf_config, fmt=b.case.fmt)
    argv = [str(src), str(dst), "--dtype", "float32", "--quiet"]
    if b.case.id == CLI_SUBPROCESS_CASE:
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        proc = subprocess.run([sys.executable, "-m", "checkpoints_convert", *argv], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    else:
        assert convert_main(argv) == 0
    cfg, params = load_model(dst)
    assert cfg == b.cfg, (cfg, b.cfg)
    return params


# ----------------------------------------------------------------------------- inputs
def batch(vocab: int, seed: int = 123) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded token batch `[len(PADS), T]` and its key mask (False on padding)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab, size=(len(PADS), T)).astype(np.int32)
    valid = np.ones((len(PADS), T), dtype=bool)
    for b, n in enumerate(PADS):
        valid[b, :n] = False
        tokens[b, :n] = 0  # pad id
    return tokens, valid


def our_positions(valid: np.ndarray) -> np.ndarray:
    return np.maximum(np.cumsum(valid, axis=1) - 1, 0)


def compared_positions(cfg: ModelConfig, valid: np.ndarray) -> np.ndarray:
    """Query positions whose logits come from a real token's hidden state."""
    src = np.arange(T)
    if cfg.logits_shift:
        src = np.maximum(src - 1, 0)
    return valid & valid[:, src]


@torch.no_grad()
def reference_logits(b: Built, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The PyTorch model's float32 logits for a left-padded batch, as its authors use it."""
    ids = torch.from_numpy(np.array(tokens, dtype=np.int64))
    mask = torch.from_numpy(np.array(valid, dtype=bool))
    arch = b.case.arch
    if arch == "llada":
        # upstream positions 0..T-1 (RoPE is relative: the pad offset cancels out)
        return b.torch_model(ids, attention_mask=mask).numpy()
    if arch == "dream":
        # Dream's generation_utils: tok_idx = cumsum(mask) - 1, padding filled with 1
        pos = mask.long().cumsum(-1) - 1
        pos = pos.masked_fill(~mask, 1)
        logits = b.torch_model(ids, attention_mask=mask.long(), position_ids=pos).logits
        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1).numpy()
    # SDAR: block-causal over per-row positions, padded keys hidden; additive float mask
    pos = torch.from_numpy(our_positions(valid).astype(np.int64))
    blk = pos // b.case.block
    visible = (blk[:, None, :] <= blk[:, :, None]) & mask[:, None, :]  # [B, q, k]
    add = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    return b.torch_model(ids, attention_mask=add[:, None], position_ids=pos).logits.numpy()


def max_diff(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return float(np.abs(np.asarray(a)[where] - np.asarray(b)[where]).max())


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case_id", [pytest.param(c.id, id=f"{c.id}-{c.fmt}") for c in CASES])
def test_forward_matches_torch(case_id: str, tmp_path: Path) -> None:
    """HF folder (this case's format) -> CLI conversion -> load_model -> apply == torch."""
    b = build(case_id)
    params = b.params
    if HAVE_CONVERTER:
        params = converted_params(b, tmp_path)
        assert jax.tree.structure(params) == jax.tree.structure(b.params)
        for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(b.params)):
            assert got.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    tokens, valid = batch(b.cfg.vocab_size)
    ref = reference_logits(b, tokens, valid)
    ours = M.apply(params, b.cfg, jnp.asarray(tokens), key_valid=jnp.asarray(valid),
                   attn_impl="xla")
    assert ours.dtype == jnp.float32 and ours.shape == ref.shape
    where = compared_positions(b.cfg, valid)
    assert np.isfinite(np.asarray(ours)).all()
    err = max_diff(ours, ref, where)
    assert err <= ATOL, f"{case_id}: max |jax - torch| = {err:.3g}"
    # the comparison is not vacuous: logits are O(1) and rows differ
    assert float(np.abs(ref[where]).max()) > 1.0
    # explicit positions equal to the defaults give the same logits
    ours2 = M.apply(params, b.cfg, jnp.asarray(tokens), jnp.asarray(our_positions(valid)),
                    jnp.asarray(valid), attn_impl="xla")
    np.testing.assert_array_equal(np.asarray(ours2), np.asarray(ours))


@pytest.mark.parametrize("arch", ["llada", "dream", "sdar"])
def test_reference_attention_pattern(arch: str) -> None:
    """Guard the references themselves: bidirectional (LLaDA, Dream) or block-causal (SDAR)."""
    b = build(next(c.id for c in CASES if c.arch == arch))
    tokens, valid = batch(b.cfg.vocab_size)
    valid[:] = True
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1) % b.cfg.vocab_size
    ref, ref_changed = reference_logits(b, tokens, valid), reference_logits(b, changed, valid)
    first = 1 if b.cfg.logits_shift else 0  # position whose logits read hidden state 0
    moved = np.abs(ref[:, first] - ref_changed[:, first]).max()
    if arch == "sdar":
        assert moved == 0.0  # the first block never sees the last one
    else:
        assert moved > 1e-3  # the first position sees the last one


@pytest.mark.parametrize("arch", ["llada", "dream", "sdar"])
def test_query_block_under_jit_equals_full_logits(arch: str) -> None:
    """`apply` under `jax.jit` with `query_idx` (one block per row) equals rows of full logits."""
    b = build(next(c.id for c in CASES if c.arch == arch))
    tokens, valid = batch(b.cfg.vocab_size, seed=7)
    tokens, valid = jnp.asarray(tokens), jnp.asarray(valid)
    fn = jax.jit(M.apply, static_argnames=("cfg", "attn_impl"))
    full_eager = M.apply(b.params, b.cfg, tokens, key_valid=valid, attn_impl="xla")
    full = fn(b.params, cfg=b.cfg, tokens=tokens, key_valid=valid, attn_impl="xla")
    np.testing.assert_allclose(np.asarray(full), np.asarray(full_eager), rtol=0, atol=1e-5)
    starts = jnp.asarray([16, 11, 13])[:, None]  # a different block in every row
    query_idx = starts + jnp.arange(8)[None, :]
    block = fn(b.params, cfg=b.cfg, tokens=tokens, key_valid=valid, query_idx=query_idx,
               attn_impl="xla")
    assert block.shape == (len(PADS), 8, b.cfg.vocab_size) and block.dtype == jnp.float32
    expect = jnp.take_along_axis(full, query_idx[:, :, None], axis=1)
    np.testing.assert_allclose(np.asarray(block), np.asarray(expect), rtol=0, atol=1e-5)
    # and to the reference on the same rows
    ref = reference_logits(b, np.asarray(tokens), np.asarray(valid))
    ref_rows = np.take_along_axis(ref, np.asarray(query_idx)[:, :, None], axis=1)
    assert np.abs(np.asarray(block) - ref_rows).max() <= ATOL


@pytest.mark.parametrize("arch", ["llada", "dream", "sdar"])
def test_bfloat16_smoke(arch: str) -> None:
    """bf16 params and activations: finite logits, float32 dtype, close to the f32 forward.

    Tolerance: max |bf16 - f32| <= BF16_TOL * max(1, max |f32|), and the same argmax on
    at least 90% of the compared positions.
    """
    b = build(next(c.id for c in CASES if c.arch == arch))
    tokens, valid = batch(b.cfg.vocab_size)
    tokens, valid_j = jnp.asarray(tokens), jnp.asarray(valid)
    f32 = np.asarray(M.apply(b.params, b.cfg, tokens, key_valid=valid_j))
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), b.params)
    bf = M.apply(p16, b.cfg, tokens, key_valid=valid_j)
    assert bf.dtype == jnp.float32
    bf = np.asarray(bf)
    where = compared_positions(b.cfg, valid)
    assert np.isfinite(bf).all()
    err = max_diff(bf, f32, where)
    assert err <= BF16_TOL * max(1.0, float(np.abs(f32[where]).max())), err
    agree = (bf.argmax(-1) == f32.argmax(-1))[where].mean()
    assert agree >= 0.9, agree


@pytest.mark.parametrize("arch", ["llada", "sdar"])
def test_long_positions(arch: str) -> None:
    """RoPE far from 0 (positions 4000..4023, explicit position_ids on both sides).

    Bound 5e-4, looser than ATOL: float32 RoPE angles near 4000 rad carry ~2e-4 rounding
    that torch and XLA resolve differently (torch's own float32 inv_freq is 1 ulp from the
    correctly rounded one); a layout or dtype bug in positions shows up as O(1).
    """
    b = build(next(c.id for c in CASES if c.arch == arch))
    tokens, valid = batch(b.cfg.vocab_size)
    pos = np.arange(T)[None].repeat(len(PADS), 0) + 4000
    ids, tpos = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(pos)
    with torch.no_grad():
        if arch == "llada":
            ref = b.torch_model(ids, position_ids=tpos).numpy()
        else:
            blk = tpos // b.case.block
            add = torch.zeros(len(PADS), 1, T, T).masked_fill(
                ~(blk[:, None, :] <= blk[:, :, None])[:, None], torch.finfo(torch.float32).min)
            ref = b.torch_model(ids, attention_mask=add, position_ids=tpos).logits.numpy()
    ours = M.apply(b.params, b.cfg, jnp.asarray(tokens), jnp.asarray(pos), attn_impl="xla")
    assert np.abs(np.asarray(ours) - ref).max() <= 5e-4


@pytest.mark.parametrize("arch,field,value", [
    ("llada", "include_bias", True),           # biases on attn_out / MLP / norms / head
    ("llada", "activation_type", "swiglu"),    # a different MLP than act(ff_proj) * up_proj
    ("sdar", "attention_bias", True),          # Qwen3 puts a bias on o_proj too
    ("dream", "use_sliding_window", True),
])
def test_config_refuses_what_the_forward_cannot_compute(arch: str, field: str, value: Any
                                                        ) -> None:
    hf = dict(build(next(c.id for c in CASES if c.arch == arch)).hf_config)
    hf[field] = value
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_config(hf)


def test_sdar_default_mask_id() -> None:
    hf = dict(build(next(c.id for c in CASES if c.arch == "sdar")).hf_config)
    hf.pop("mask_token_id")
    hf["vocab_size"] = 151936
    assert ModelConfig.from_hf_config(hf).mask_token_id == 151669  # SDAR's <|MASK|>


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs on GPU only")
@pytest.mark.parametrize("arch", ["llada", "dream", "sdar"])
def test_cudnn_attention_matches_xla_bf16(arch: str) -> None:
    """The "auto" path picks cuDNN for bf16 with head_dim 128; it agrees with XLA's bf16
    attention within bf16 noise (0.1 on logits of magnitude ~4) and falls back to XLA for
    head dims cuDNN refuses (the test cases' 12 / 20 / 36)."""
    cfg = ModelConfig.tiny(arch, hidden_size=256, num_heads=2, head_dim=128,
                           num_kv_heads=2 if arch == "llada" else 1, vocab_size=256,
                           mask_token_id=255)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                          M.init_params(cfg, jax.random.PRNGKey(0), std=0.05))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 64), 2, 256)
    valid = jnp.arange(64)[None] >= jnp.asarray([0, 5, 11])[:, None]
    cud = M.apply(params, cfg, tokens, key_valid=valid, attn_impl="cudnn")
    xla = M.apply(params, cfg, tokens, key_valid=valid, attn_impl="xla")
    w = np.asarray(valid)
    assert np.abs(np.asarray(cud) - np.asarray(xla))[w].max() <= 0.1
    b = build(next(c.id for c in CASES if c.arch == arch))
    small = jax.tree.map(lambda a: a.astype(jnp.bfloat16), b.params)
    tok, val = batch(b.cfg.vocab_size)
    out = M.apply(small, b.cfg, jnp.asarray(tok), key_valid=jnp.asarray(val), attn_impl="auto")
    assert np.isfinite(np.asarray(out)).all()
