"""`convert(src, dst)`: a Hugging Face LLaDA / Dream / SDAR / DiffusionGemma (text) folder -> a
dllm-jax checkpoint folder.

Steps: read config.json and detect the architecture; list every tensor of every weight file
(headers only) and validate names and shapes against the architecture's key map; preallocate the
output arrays (stacked `[L, ...]`, target dtype); fill them file by file, tensor by tensor, in
row blocks; write them with `dllm_jax.checkpoint.save_model` (atomic: temporary folder, then
rename) together with our config and the original config / tokenizer files. With
`quantize="int8"` (`--quantize int8`) the matrices are quantised on the host before the write
(`dllm_jax.quant`: int8 per output channel, one layer's float32 copy at a time) and the folder
records `"quantization": "int8"`.
Peak memory is the output size plus one row block plus the libraries (with int8: plus the
int8 matrices).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from checkpoints_convert import hf
from checkpoints_convert.keymap import KeyMap, Placement, dropped_tensors, keymap_for, plan
from dllm_jax import quant
from dllm_jax.models import FAMILIES
from dllm_jax.checkpoint import CheckpointError, check_destination, numpy_dtype, save_model
from dllm_jax.config import ModelConfig
from dllm_jax import progress
from dllm_jax.models import Params, param_shapes

KEYMAPS: dict[str, KeyMap] = {arch: keymap_for(fam) for arch, fam in FAMILIES.items()}
DTYPES: tuple[str, ...] = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What a conversion produced."""

    dst: Path
    config: ModelConfig
    dtype: str
    num_tensors: int
    num_bytes: int
    seconds: float


def _empty_params(cfg: ModelConfig, dtype: np.dtype) -> Params:
    """Uninitialised numpy arrays in the layout of `param_shapes(cfg)` (pages are committed as filled)."""
    import jax

    return jax.tree.map(lambda s: np.empty(s.shape, dtype), param_shapes(cfg))


def _destination(params: Params, p: Placement) -> np.ndarray:
    arr = params
    for key in p.path:
        arr = arr[key]
    return arr[p.layer] if p.layer is not None else arr


def copy_tensor(wf: hf.WeightFile, p: Placement, dst: np.ndarray,
                chunk_bytes: int | None = None) -> None:
    """Copy one source tensor into `dst` block by block through its transform chain (cast on write).

    Blocks are at most `chunk_bytes` (default `hf.CHUNK_BYTES`) of source rows.
    """
    chunk_bytes = chunk_bytes or hf.CHUNK_BYTES
    info = p.info
    ndim = len(info.shape)
    for start, stop in hf.iter_row_blocks(info.shape, info.dtype.itemsize, chunk_bytes):
        block = wf.read_rows(info.name, start, stop)
        index: tuple[slice, ...] = (slice(start, stop),) + (slice(None),) * (ndim - 1) if ndim else ()
        for t in p.transforms:
            index, block = t.apply(index, block)
        if block.dtype != dst.dtype and block.dtype == np.float16:
            block = block.astype(np.float32)  # float16 -> bfloat16 goes through float32
        dst[index] = block


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    log: Callable[[str], Any] | None = None,
    quantize: str | None = None,
) -> ConvertResult:
    """Convert the Hugging Face checkpoint folder `src` into the dllm-jax checkpoint folder `dst`.

    Args:
      src: folder with config.json and model.safetensors / sharded *.safetensors + index /
        pytorch_model*.bin (+ index), as downloaded.
      dst: output folder; refused if it exists unless `overwrite`.
      dtype: params dtype of the output, "bfloat16" or "float32".
      overwrite: replace an existing dllm-jax checkpoint at `dst`.
      log: progress sink (e.g. `print`); None is silent.
      quantize: None, or "int8" to store the matrices as int8 with per-output-channel scales
        (the other params in `dtype`).
    Returns:
      A ConvertResult. Raises CheckpointError (one sentence naming the file and the fix) on
      bad input; nothing is left at `dst` or next to it after an error or interrupt.
    """
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    src_path, dst_path = Path(src).absolute(), Path(dst).absolute()
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype} is not supported; use one of {', '.join(DTYPES)}.")
    quant.check_mode(quantize, "--quantize")
    out_dtype = numpy_dtype(dtype)
    _, cfg = hf.read_config(src_path)
    if quantize is not None:
        quant.check_arch(cfg.arch, "--quantize")
    check_destination(dst_path, overwrite)
    if dst_path == src_path or src_path in dst_path.parents or dst_path in src_path.parents:
        raise CheckpointError(
            f"destination {dst_path} overlaps the source {src_path}; choose a folder outside it."
        )
    weights = hf.find_weights(src_path)
    tensors = hf.list_tensors(weights)
    placements = plan(cfg, KEYMAPS[cfg.arch], tensors)
    say(f"{cfg.arch}: {len(tensors)} tensors in {len(weights.files)} {weights.kind} file(s), "
        f"{cfg.num_layers} layers -> {dtype}")
    for what, n in dropped_tensors(KEYMAPS[cfg.arch], tensors).items():
        say(f"  skipped {n} tensors of {what} (not converted)")

    params = _empty_params(cfg, out_dtype)
    by_file: dict[Path, list[Placement]] = {}
    for p in placements:
        by_file.setdefault(p.info.file, []).append(p)
    source_bytes = sum(int(np.prod(p.info.shape)) * p.info.dtype.itemsize for p in placements)
    with progress.bar(source_bytes, "convert", quiet=log is None, unit="B",
                      unit_scale=True, unit_divisor=1024) as pbar:
        for n, path in enumerate(weights.files, 1):
            todo = by_file.get(path, [])
            wf = hf.open_weight_file(path, weights.kind)
            try:
                for p in todo:
                    copy_tensor(wf, p, _destination(params, p))
                    pbar.update(int(np.prod(p.info.shape)) * p.info.dtype.itemsize)
            finally:
                wf.close()
            if not progress.shows_bar(log is None):
                say(f"  [{n}/{len(weights.files)}] {path.name}: {len(todo)} tensors")

    if quantize is not None:
        params = quant.quantize_params(params)
    save_model(dst_path, cfg, params, overwrite=overwrite, extra_files=hf.side_files(src_path))
    num_bytes = sum(a.nbytes for a in _leaves(params))
    seconds = time.perf_counter() - t0
    what = dtype if quantize is None else f"{quantize} + {dtype}"
    say(f"wrote {dst_path} ({num_bytes / 2**30:.2f} GiB of {what} params) in {seconds:.1f} s")
    return ConvertResult(dst_path, cfg, dtype, len(placements), num_bytes, seconds)


def _leaves(tree: Any) -> list[np.ndarray]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    if quant.is_quantized(tree):
        return [tree.q, tree.scale]
    return [tree]


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `convert` (shared by `dllm-jax convert` and `python -m checkpoints_convert`)."""
    parser.add_argument("src", help="Hugging Face model folder (config.json + weights) as downloaded")
    parser.add_argument("dst", help="output folder for the dllm-jax checkpoint (must not exist)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                        help="params dtype of the output (default: bfloat16)")
    parser.add_argument("--quantize", default=None, metavar="int8",
                        help="int8: store the projection and LM head matrices as int8 with "
                             "one float32 scale per output channel (weight-only; the other "
                             "params in --dtype); default: no quantisation")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is an existing dllm-jax checkpoint")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")


def run(args: argparse.Namespace) -> int:
    """Run a parsed `convert` command line; returns the exit code (errors raise CheckpointError)."""
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite, log=log,
            quantize=args.quantize)
    return 0
