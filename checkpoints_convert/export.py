"""`export_hf(model_dir, dst)`: a dllm-jax model folder -> the Hugging Face folder of its family
(LLaDA, Dream, SDAR), the inverse of `convert`.

    dllm-jax export ~/models/llada-8b ~/hf/llada-8b-again --dtype bfloat16

The tensor names and layouts come from the same table the converter reads (`keymap_for` of
the family's params table, `dllm_jax.models.params`): each rule's stacked `[L, ...]` param
(or layer-group param, rows per `Family.rows`) is split into one tensor per layer, named by the
rule's `{i}` pattern, and its transform chain is undone (transposes only: our `[in, out]`
back to PyTorch's `[out, in]`; each transform is its own inverse). Known tensors the converter
skips (a saved LM head duplicating tied embeddings) are not written.

Written: `model.safetensors` (or `model-0000k-of-0000n.safetensors` shards of at most
`max_shard_bytes` plus `model.safetensors.index.json`), a `config.json` that
`ModelConfig.from_hf_config` reads back to the identical ModelConfig (the folder's original
config.json when it still describes the model, `torch_dtype` updated; otherwise one written
from the ModelConfig), and the tokenizer / chat-template / generation-config files of the
folder. Writes go to a hidden temporary folder next to DST, renamed to DST when complete.
Peak memory: the params in the export dtype plus one tensor. DiffusionGemma is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from checkpoints_convert import hf
from checkpoints_convert.keymap import TRANSFORMS, keymap_for
from dllm_jax import progress
from dllm_jax.checkpoint import CheckpointError, atomic_directory, load_config, load_model
from dllm_jax.config import ConfigError, ModelConfig
from dllm_jax.models import FAMILIES
from dllm_jax.quant import dequantize_params

DTYPES: tuple[str, ...] = ("bfloat16", "float32")
MAX_SHARD_BYTES = 5 * 10**9          # Hugging Face's default shard size, "5GB"
SELF_INVERSE: frozenset[str] = frozenset({"transpose", "transpose_inner"})
_ST_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_ARCHITECTURES = {"llada": "LLaDAModelLM", "dream": "DreamModel", "sdar": "SDARForCausalLM"}


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of the export: its Hugging Face name, the param it comes from (path, row of
    a stacked param or None) and the converter's transform chain (undone on export)."""

    name: str
    path: tuple[str, ...]
    row: int | None
    transforms: tuple[str, ...]
    layer: int | None


def hf_tensors(cfg: ModelConfig) -> list[HFTensor]:
    """Every Hugging Face tensor of `cfg`'s family, from its key map, in checkpoint order
    (embedding, layer 0..L-1, then the rest). Raises CheckpointError for a transform the
    exporter cannot undo."""
    keymap = keymap_for(FAMILIES[cfg.arch])
    rows = keymap.layer_rows(cfg)
    out = []
    for rule in keymap.rules:
        if rule.target is None or not rule.applies(cfg):
            continue
        if bad := [t for t in rule.transforms if t not in SELF_INVERSE]:
            raise CheckpointError(f"the {cfg.arch} key map uses transform {bad[0]} for "
                                  f"{rule.hf}, which the exporter cannot undo.")
        path = tuple(rule.target.split("/"))
        if not rule.per_layer:
            out.append(HFTensor(rule.hf, path, None, rule.transforms, None))
            continue
        for r, layer in enumerate(rows[path[0]]):
            out.append(HFTensor(rule.name(layer), path, r, rule.transforms, layer))
    rank = lambda t: (0 if t.path == ("embed",) else 2) if t.layer is None else 1  # noqa: E731
    return sorted(out, key=lambda t: (rank(t), t.layer or 0))


def to_hf_array(params: dict, t: HFTensor) -> np.ndarray:
    """The tensor `t` in PyTorch layout (e.g. `[out, in]` from our `[in, out]`), contiguous."""
    arr: Any = params
    for key in t.path:
        arr = arr[key]
    arr = np.asarray(arr)
    if t.row is not None:
        arr = arr[t.row]
    for name in reversed(t.transforms):
        _, arr = TRANSFORMS[name].apply((slice(None),) * arr.ndim, arr)
    return np.ascontiguousarray(arr)


def to_hf_array_shape(params: dict, t: HFTensor) -> tuple[int, ...]:
    """The PyTorch-layout shape of tensor `t` (no data copied)."""
    arr: Any = params
    for key in t.path:
        arr = arr[key]
    shape = tuple(arr.shape[1:] if t.row is not None else arr.shape)
    for name in reversed(t.transforms):
        shape = tuple(TRANSFORMS[name].shape(shape))
    return shape


# ----------------------------------------------------------------------------- config.json
def _llada_config(cfg: ModelConfig) -> dict[str, Any]:
    d = {
        "architectures": [_ARCHITECTURES["llada"]], "model_type": "llada",
        "d_model": cfg.hidden_size, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads,
        "n_layers": cfg.num_layers, "mlp_hidden_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size, "embedding_size": cfg.vocab_size,
        "max_sequence_length": cfg.max_position, "rope": True, "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps, "alibi": False, "block_type": "llama",
        "block_group_size": 1, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "activation_type": "silu", "attention_layer_norm": False,
        "include_bias": False, "include_qkv_bias": cfg.qkv_bias,
        "weight_tying": cfg.tie_embeddings, "scale_logits": False, "input_emb_norm": False,
        "mask_token_id": cfg.mask_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if ModelConfig.from_hf_config(d).eot_token_id != cfg.eot_token_id:
        d["eot_token_id"] = cfg.eot_token_id
    return d


def _qwen_config(cfg: ModelConfig) -> dict[str, Any]:
    d = {
        "architectures": [_ARCHITECTURES[cfg.arch]],
        "model_type": "Dream" if cfg.arch == "dream" else "sdar",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "num_hidden_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position, "rope_theta": cfg.rope_theta,
        "rope_scaling": None, "rms_norm_eps": cfg.rms_norm_eps, "hidden_act": "silu",
        "use_sliding_window": False, "tie_word_embeddings": cfg.tie_embeddings,
        "mask_token_id": cfg.mask_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }
    if cfg.arch == "sdar":   # Qwen3 has an explicit head_dim; Qwen2 / Dream derive it
        d.update(head_dim=cfg.head_dim, attention_bias=False, block_size=cfg.block_size)
    return d


def _differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    return [f.name for f in dataclasses.fields(ModelConfig)
            if getattr(a, f.name) != getattr(b, f.name)]


def hf_config_for(cfg: ModelConfig, original: dict[str, Any] | None = None,
                  dtype: str = "float32") -> dict[str, Any]:
    """The config.json dict of `cfg`'s Hugging Face family that reads back to `cfg`.

    `original` (the folder's own config.json, kept by the converter) is reused when it still
    reads back to `cfg`, so fields we do not model (auto_map, dropout, ...) survive.
    Raises CheckpointError naming the fields the family's config cannot express."""
    if cfg.arch not in _ARCHITECTURES:
        raise CheckpointError(
            f"exporting {cfg.arch} models to the Hugging Face layout is not supported; only "
            f"{', '.join(_ARCHITECTURES)} models can be exported.")
    if original is not None:
        try:
            if ModelConfig.from_hf_config(original) == cfg:
                keys = [k for k in ("torch_dtype", "dtype") if k in original] or ["torch_dtype"]
                return {**original, **{k: dtype for k in keys}}
        except ConfigError:
            pass
    d = _llada_config(cfg) if cfg.arch == "llada" else _qwen_config(cfg)
    try:
        back = ModelConfig.from_hf_config(d)
    except ConfigError as e:
        raise CheckpointError(f"the {cfg.arch} config cannot be written as a Hugging Face "
                              f"config.json: {e}") from None
    if diff := _differences(back, cfg):
        raise CheckpointError(
            f"the {cfg.arch} Hugging Face config.json cannot express this model's "
            f"{', '.join(diff)} ({', '.join(f'{n}={getattr(cfg, n)!r}' for n in diff)}); "
            f"such a model has no {cfg.arch} checkpoint layout.")
    return {**d, "torch_dtype": dtype}


# ----------------------------------------------------------------------------- safetensors
def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _shards(tensors: list[tuple[HFTensor, tuple[int, ...]]], itemsize: int,
            max_bytes: int) -> list[list[tuple[HFTensor, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (a larger tensor gets a
    shard of its own), as Hugging Face's `save_pretrained` shards."""
    groups: list[list[Any]] = [[]]
    size = 0
    for t, shape in tensors:
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((t, shape))
        size += n
    return groups


def write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str,
                      arrays: Callable[[str], np.ndarray], done: Callable[[int], Any]) -> None:
    """Write one safetensors file: the header (names, shapes `[out, in]`, contiguous offsets)
    first, then each tensor as `arrays(name)` returns it (cast to `dtype`), one at a time."""
    np_dtype = _np_dtype(dtype)
    itemsize = np_dtype.itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in entries:
            arr = np.ascontiguousarray(arrays(name), dtype=np_dtype)
            if tuple(arr.shape) != tuple(shape):
                raise AssertionError(f"{name}: shape {arr.shape}, header says {shape}")
            f.write(arr.reshape(-1).view(np.uint8).data)
            done(arr.nbytes)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- destination
def _is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "dllm_config.json").exists()


def check_hf_destination(dst: str | os.PathLike, overwrite: bool) -> Path:
    """Validate DST before any work: a missing or empty folder is fine; anything else is
    refused unless `overwrite`, and even then only a Hugging Face model folder (config.json)
    is replaced, never another folder or file."""
    dst = Path(os.path.expanduser(os.fspath(dst))).absolute()
    if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
        return dst
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise CheckpointError(f"{dst} already exists; pass --overwrite (overwrite=True) to "
                                  f"replace it, or choose another destination.")
        if not dst.is_dir() or dst.is_symlink() or not _is_hf_folder(dst):
            raise CheckpointError(
                f"{dst} exists and is not a Hugging Face model folder (no config.json); refusing "
                f"to replace it even with --overwrite: choose another destination or remove it "
                f"yourself.")
    return dst


def _read_original(model_dir: Path) -> dict[str, Any] | None:
    try:
        with open(model_dir / "config.json", encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


# ----------------------------------------------------------------------------- export
def export_hf(
    model_dir: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write the dllm-jax model folder `model_dir` as a Hugging Face checkpoint folder `dst`.

    Args:
      model_dir: a folder made by `dllm-jax convert` / `dllm-jax train` (`load_model`).
      dst: output folder; refused if it exists unless `overwrite` (which replaces only an
        earlier Hugging Face folder).
      dtype: tensor dtype, "bfloat16" or "float32"; None keeps the stored param dtype.
      overwrite: replace an existing Hugging Face folder at `dst`.
      log: progress sink (e.g. `print`); None is silent.
      max_shard_bytes: larger exports are split into shards with an index.
    Returns:
      The absolute path of `dst`. Raises CheckpointError (one sentence) on bad input; nothing
      is left at `dst` or next to it after an error or interrupt.
    """
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype} is not supported; use one of {', '.join(DTYPES)}.")
    src = Path(os.path.expanduser(os.fspath(model_dir))).absolute()
    cfg, stored = load_config(src)
    dtype = dtype or stored
    config = hf_config_for(cfg, _read_original(src), dtype)
    dst_path = check_hf_destination(dst, overwrite)
    if dst_path == src or src in dst_path.parents or dst_path in src.parents:
        raise CheckpointError(f"destination {dst_path} overlaps the model folder {src}; choose "
                              f"a folder outside it.")
    tensors = hf_tensors(cfg)
    import jax

    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    _, params = load_model(src, dtype=dtype, shardings=cpu)
    params = dequantize_params(params)      # an int8 folder exports its dequantised weights
    by_name = {t.name: t for t in tensors}
    shapes = [(t, to_hf_array_shape(params, t)) for t in tensors]
    itemsize = _np_dtype(dtype).itemsize
    groups = _shards(shapes, itemsize, max_shard_bytes)
    total = sum(int(np.prod(s, dtype=np.int64)) * itemsize for _, s in shapes)
    say(f"{cfg.arch}: {len(tensors)} tensors, {cfg.num_layers} layers -> {dtype} "
        f"({len(groups)} safetensors file{'s' if len(groups) > 1 else ''})")
    with atomic_directory(dst_path, overwrite, check=check_hf_destination) as tmp, progress.bar(
            total, "export", quiet=log is None, unit="B", unit_scale=True,
            unit_divisor=1024) as pbar:
        weight_map: dict[str, str] = {}
        for k, group in enumerate(groups, 1):
            fname = (hf.SAFETENSORS_SINGLE if len(groups) == 1
                     else f"model-{k:05d}-of-{len(groups):05d}.safetensors")
            write_safetensors(tmp / fname, [(t.name, s) for t, s in group], dtype,
                              lambda name: to_hf_array(params, by_name[name]), pbar.update)
            weight_map.update({t.name: fname for t, _ in group})
        if len(groups) > 1:
            _write_json(tmp / hf.SAFETENSORS_INDEX,
                        {"metadata": {"total_size": total}, "weight_map": weight_map})
        _write_json(tmp / "config.json", config)
        for name, path in hf.side_files(src).items():
            if name != "config.json":
                shutil.copyfile(path, tmp / name)
    say(f"wrote {dst_path} ({total / 2**30:.2f} GiB of {dtype} tensors) in "
        f"{time.perf_counter() - t0:.1f} s")
    return dst_path


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `dllm-jax export MODEL_DIR HF_DIR`."""
    parser.add_argument("model_dir", help="dllm-jax model folder (made by convert or train)")
    parser.add_argument("hf_dir", help="output Hugging Face folder (must not exist)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="tensor dtype of the output (default: the stored params dtype)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace HF_DIR if it is an existing Hugging Face model folder")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")


def run(args: argparse.Namespace) -> int:
    """Run a parsed `export` command line; returns the exit code (errors raise CheckpointError)."""
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    export_hf(args.model_dir, args.hf_dir, dtype=args.dtype, overwrite=args.overwrite, log=log)
    return 0


__all__ = ["HFTensor", "add_arguments", "check_hf_destination", "export_hf", "hf_config_for",
           "hf_tensors", "run", "to_hf_array"]
