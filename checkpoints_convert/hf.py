"""Reading a Hugging Face model folder as downloaded: config.json, the weight files, tokenizer files.

Weights are read tensor by tensor, and large tensors row block by row block, so that reading
never holds more than one block (`CHUNK_BYTES`) of source data besides the output arrays:

- `*.safetensors`: the header (8-byte little-endian length + JSON) is parsed here and every
  tensor's byte range is checked against the file size before any data is read, so a truncated
  download is reported up front; data is read with plain `readinto` at computed offsets. (The
  `safetensors` library memory-maps whole files, and the touched pages of a mapping count in the
  process's resident memory until it is closed: a whole shard at a time.)
- `pytorch_model*.bin`: `torch.load(weights_only=True, mmap=True)`; torch is optional
  (`pip install dllm-jax[torch]`). Mapped pages of one shard may stay resident while it is read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator, Protocol

import ml_dtypes
import numpy as np

from dllm_jax.checkpoint import CheckpointError
from dllm_jax.config import ConfigError, ModelConfig

CHUNK_BYTES = 16 << 20

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Files copied next to the converted params when present (tokenizer, chat template, configs).
SIDE_FILES: tuple[str, ...] = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)
SIDE_SUFFIXES: tuple[str, ...] = (".model", ".tiktoken")

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


# ----------------------------------------------------------------------------- config
def read_config(src: Path) -> tuple[dict[str, Any], ModelConfig]:
    """The raw `config.json` dict of a HF folder and the ModelConfig detected from it."""
    if not src.exists():
        raise CheckpointError(f"source folder {src} does not exist; check the path.")
    if not src.is_dir():
        raise CheckpointError(f"source {src} is not a folder; pass the Hugging Face model folder.")
    path = src / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{src} has no config.json; pass the folder of a Hugging Face checkpoint as downloaded "
            f"(config.json next to the *.safetensors or pytorch_model*.bin files)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download config.json.") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download config.json.")
    try:
        return hf, ModelConfig.from_hf_config(hf)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def side_files(src: Path) -> dict[str, Path]:
    """Config, tokenizer and chat-template files of `src` to copy next to the converted params."""
    found = {name: src / name for name in SIDE_FILES if (src / name).is_file()}
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix in SIDE_SUFFIXES:
            found[p.name] = p
    return found


# ----------------------------------------------------------------------------- tensors
@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a weight file: its name, file, shape and source dtype (no data)."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: np.dtype


class WeightFile(Protocol):
    """One weight file opened for reading tensor by tensor."""

    path: Path

    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor of the file, by name."""
        ...

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows `[start, stop)` of the tensor's first axis, in the source dtype."""
        ...

    def close(self) -> None:
        ...


def _rows_slice_count(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1


class SafetensorsFile:
    """A `.safetensors` file: header parsed and validated on open, data read by byte range."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._f = open(path, "rb")
        except OSError as e:
            raise CheckpointError(f"cannot open {path} ({e.strerror}); check the file.") from None
        try:
            self._infos, self._offsets = self._parse_header()
        except BaseException:
            self._f.close()
            raise

    def _bad(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path} is not a complete safetensors file ({what}); the download is truncated "
            f"or corrupt: re-download it."
        )

    def _parse_header(self) -> tuple[dict[str, TensorInfo], dict[str, int]]:
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise self._bad(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100 << 20:
            raise self._bad(f"header length {n} does not fit in {size} bytes")
        try:
            header = json.loads(self._f.read(n))
        except ValueError:
            raise self._bad("its JSON header cannot be parsed") from None
        if not isinstance(header, dict):
            raise self._bad("its header is not a JSON object")
        data_start = 8 + n
        infos, offsets = {}, {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype_code, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"malformed header entry for {name}") from None
            dtype = _SAFETENSORS_DTYPES.get(dtype_code)
            if dtype is None:
                raise CheckpointError(
                    f"tensor {name} in {self.path} has dtype {dtype_code}; only floating-point "
                    f"weights ({', '.join(_SAFETENSORS_DTYPES)}) can be converted."
                )
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise self._bad(f"tensor {name} has {end - begin} data bytes for shape {list(shape)}")
            if data_start + end > size:
                raise self._bad(
                    f"tensor {name} ends at byte {data_start + end} but the file has {size} bytes"
                )
            infos[name] = TensorInfo(name, self.path, shape, dtype)
            offsets[name] = data_start + begin
        return infos, offsets

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        info = self._infos[name]
        shape = info.shape if info.shape else (1,)
        row = _rows_slice_count(shape) * info.dtype.itemsize
        out = np.empty((stop - start,) + tuple(shape[1:]), info.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        self._f.seek(self._offsets[name] + start * row)
        got = 0
        while got < len(view):
            k = self._f.readinto(view[got:])
            if not k:
                raise self._bad(f"reading {name} stopped at byte {self._f.tell()}")
            got += k
        return out if info.shape else out.reshape(())

    def close(self) -> None:
        self._f.close()


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "reading PyTorch .bin checkpoints needs torch, which is not installed: "
            "pip install dllm-jax[torch] (or use a checkpoint with *.safetensors files)."
        ) from None
    return torch


class TorchBinFile:
    """A `pytorch_model*.bin` file loaded with `torch.load(weights_only=True, mmap=True)`."""

    def __init__(self, path: Path):
        torch = _torch()
        self.path = path
        self._torch = torch
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise self._bad(e) from None
            try:  # legacy (pre zip) serialization cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e2:
                raise self._bad(e2) from None
        except Exception as e:
            raise self._bad(e) from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(
                f"{path} does not hold a flat state dict of tensors; it is not a Hugging Face "
                f"pytorch_model.bin."
            )
        self._sd: dict[str, Any] = sd
        self._infos = {}
        for name, t in sd.items():
            dtype = {torch.float32: np.dtype("<f4"), torch.float16: np.dtype("<f2"),
                     torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
                     torch.float64: np.dtype("<f8")}.get(t.dtype)
            if dtype is None:
                raise CheckpointError(
                    f"tensor {name} in {path} has dtype {t.dtype}; only floating-point weights "
                    f"can be converted."
                )
            self._infos[name] = TensorInfo(name, path, tuple(t.shape), dtype)

    def _bad(self, e: BaseException) -> CheckpointError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return CheckpointError(
            f"{self.path} cannot be read by torch.load ({first}); the file is truncated or corrupt: "
            f"re-download it."
        )

    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        t = self._sd[name]
        if t.dim() == 0:
            chunk = t.reshape(1)
        else:
            chunk = t[start:stop]
        chunk = chunk.contiguous()
        if chunk.dtype == self._torch.bfloat16:
            arr = chunk.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            arr = chunk.numpy()
        return arr.reshape(()) if t.dim() == 0 else arr

    def close(self) -> None:
        self._sd = {}


# ----------------------------------------------------------------------------- weight discovery
@dataclasses.dataclass(frozen=True)
class WeightSet:
    """The weight files of a HF folder and, for sharded checkpoints, the index's weight map."""

    kind: str  # "safetensors" | "bin"
    files: tuple[Path, ...]
    index: Path | None = None
    weight_map: dict[str, str] | None = None


def _read_index(path: Path) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            wm = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a valid shard index (no weight_map); re-download it.") from None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{path} has an empty weight_map; re-download it.")
    return {str(k): str(v) for k, v in wm.items()}


def find_weights(src: Path) -> WeightSet:
    """Locate the weight files of `src`: safetensors (single / sharded + index) preferred, else .bin."""
    for kind, index_name, single, pattern in (
        ("safetensors", SAFETENSORS_INDEX, SAFETENSORS_SINGLE, "*.safetensors"),
        ("bin", BIN_INDEX, BIN_SINGLE, "pytorch_model*.bin"),
    ):
        index = src / index_name
        if index.is_file():
            wm = _read_index(index)
            files = []
            for fname in sorted(set(wm.values())):
                path = src / fname
                if not path.is_file():
                    raise CheckpointError(
                        f"{index} lists the shard {fname}, which is missing from {src}; download "
                        f"every shard."
                    )
                files.append(path)
            return WeightSet(kind, tuple(files), index, wm)
        if (src / single).is_file():
            return WeightSet(kind, (src / single,))
        files = sorted(p for p in src.glob(pattern) if p.is_file())
        if files:
            return WeightSet(kind, tuple(files))
    raise CheckpointError(
        f"{src} has no weights: expected model.safetensors, sharded *.safetensors with "
        f"{SAFETENSORS_INDEX}, or pytorch_model*.bin; download the weight files too."
    )


def open_weight_file(path: Path, kind: str) -> WeightFile:
    """Open one weight file of the given kind."""
    return SafetensorsFile(path) if kind == "safetensors" else TorchBinFile(path)


def list_tensors(weights: WeightSet) -> dict[str, TensorInfo]:
    """Every tensor of every file (headers only), checked for duplicates and against the index."""
    found: dict[str, TensorInfo] = {}
    for path in weights.files:
        wf = open_weight_file(path, weights.kind)
        try:
            for name, info in wf.tensors().items():
                if name in found:
                    raise CheckpointError(
                        f"tensor {name} appears in both {found[name].file} and {path}; the folder "
                        f"mixes two checkpoints: keep one set of weight files."
                    )
                found[name] = info
        finally:
            wf.close()
    if weights.weight_map:
        for name, fname in weights.weight_map.items():
            info = found.get(name)
            if info is None or info.file.name != fname:
                raise CheckpointError(
                    f"{weights.index} places tensor {name} in {fname}, but "
                    f"{'no file has it' if info is None else f'it is in {info.file.name}'}; "
                    f"the download is incomplete or mixed: re-download the checkpoint."
                )
    return found


def iter_row_blocks(shape: tuple[int, ...], itemsize: int, chunk_bytes: int = CHUNK_BYTES
                    ) -> Iterator[tuple[int, int]]:
    """`(start, stop)` row ranges of a tensor's first axis of at most `chunk_bytes` each."""
    if not shape:
        yield 0, 1
        return
    row = max(1, _rows_slice_count(shape) * itemsize)
    step = max(1, chunk_bytes // row)
    for start in range(0, shape[0], step):
        yield start, min(shape[0], start + step)
