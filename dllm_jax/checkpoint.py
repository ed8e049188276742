"""Model checkpoints on disk: one folder per model, written atomically, restored sharding-aware.

Layout of a checkpoint folder (what `save_model` writes and `dllm-jax convert` produces):

    DST/
      dllm_config.json   {"format": "dllm-jax-checkpoint", "version": 1,
                          "param_dtype": "bfloat16", "model": ModelConfig.to_dict()}
      params/            orbax PyTree checkpoint of the params pytree laid out as in
                         `dllm_jax.models` (nested dict, layers stacked on a leading [L] axis)
      config.json, tokenizer.json, ...   extra files copied verbatim (the converter copies the
                         original Hugging Face config and tokenizer files here)
An int8 folder (version 2) also records `"quantization": "int8", "quantized": [paths]`, each
such weight stored as `<path>/q` int8 and `<path>/scale` float32 (`dllm_jax.quant`).

Writes go to a hidden temporary folder next to DST (`.DST.dllm-tmp-<pid>-<id>`) that is renamed
to DST only when everything is on disk; on any error or interrupt the temporary folder is
removed, and a later write removes temporaries left behind by killed processes. A reader
therefore never sees a half-written DST.

Params are saved with orbax's PyTree handler (the on-disk format `ocp.args.StandardSave`
produces, restorable with `ocp.args.StandardRestore`), configured so that saving does not copy
host arrays: no deep copy of numpy leaves, no OCDBT write buffering, 16 MiB tensorstore chunks.
Measured on a 2 GB tree, the default `StandardCheckpointer` held an extra 0.8x of the tree in
memory while saving; this configuration holds about 5%.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dllm_jax import quant
from dllm_jax.config import ConfigError, ModelConfig
from dllm_jax.models import Params, param_shapes

FORMAT = "dllm-jax-checkpoint"
VERSION = 2  # the newest version read (int8 folders); float folders are written as version 1
CONFIG_FILE = "dllm_config.json"
PARAMS_DIR = "params"
SUPPORTED_DTYPES: tuple[str, ...] = ("bfloat16", "float32", "float16")

_TMP_TAG = "dllm-tmp"
_OLD_TAG = "dllm-old"
_CHUNK_BYTES = 16 << 20


class CheckpointError(Exception):
    """A checkpoint folder that cannot be read or written; the message says which file and how to fix it."""


# ----------------------------------------------------------------------------- dtypes
def dtype_name(dtype: Any) -> str:
    """Canonical name ('bfloat16', 'float32', 'float16') of a numpy/jax dtype or dtype name."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        raise CheckpointError(f"unknown dtype {dtype!r}; use one of {', '.join(SUPPORTED_DTYPES)}.") from None
    if name not in SUPPORTED_DTYPES:
        raise CheckpointError(f"dtype {name} is not supported for params; use one of {', '.join(SUPPORTED_DTYPES)}.")
    return name


def numpy_dtype(dtype: Any) -> np.dtype:
    """The numpy dtype for a supported name (bfloat16 is ml_dtypes' bfloat16)."""
    return np.dtype(jnp.dtype(dtype_name(dtype)))


# ----------------------------------------------------------------------------- atomic folders
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _sibling_pattern(dst: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(dst.name)}\.(?:{_TMP_TAG}|{_OLD_TAG})-(\d+)-[0-9a-f]+$")


def clean_stale_temporaries(dst: str | os.PathLike) -> list[Path]:
    """Remove temporary folders next to `dst` left by writers that no longer run.

    Returns the folders removed. Temporaries of live processes (a concurrent writer) are kept.
    """
    dst = Path(dst).absolute()
    if not dst.parent.is_dir():
        return []
    pattern = _sibling_pattern(dst)
    removed = []
    for entry in dst.parent.iterdir():
        m = pattern.match(entry.name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def is_checkpoint(directory: str | os.PathLike) -> bool:
    """True when `directory` holds a dllm-jax checkpoint (a `dllm_config.json` of our format)."""
    path = Path(directory) / CONFIG_FILE
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(dst: str | os.PathLike, overwrite: bool) -> Path:
    """Validate a destination folder before any work is done; returns it as an absolute path.

    A missing DST or an empty folder is fine. Another existing DST is refused unless
    `overwrite`; even then only an earlier dllm-jax checkpoint is replaced, never an arbitrary
    folder or file.
    """
    dst = Path(os.path.expanduser(os.fspath(dst))).absolute()
    if dst.is_dir() and not dst.is_symlink() and not any(dst.iterdir()):
        return dst
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise CheckpointError(
                f"{dst} already exists; pass --overwrite (overwrite=True) to replace it, or choose "
                f"another destination."
            )
        if not dst.is_dir() or dst.is_symlink():
            raise CheckpointError(f"{dst} exists and is not a folder; remove it or choose another destination.")
        if any(dst.iterdir()) and not is_checkpoint(dst):
            raise CheckpointError(
                f"{dst} exists and is not a dllm-jax checkpoint (no {CONFIG_FILE}); refusing to replace "
                f"it even with --overwrite: choose another destination or remove it yourself."
            )
    return dst


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False,
                     check: Callable[[str | os.PathLike, bool], Path] | None = None
                     ) -> Iterator[Path]:
    """Yield an empty temporary folder next to `dst`; on success it becomes `dst` by rename.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and `dst` is
    left as it was. With `overwrite`, an existing `dst` is replaced if `check(dst, overwrite)`
    allows it (default `check_destination`: a dllm-jax model folder); `check` runs before the
    work and again just before the rename.
    """
    check = check_destination if check is None else check
    dst = check(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dst)
    stamp = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = dst.parent / f".{dst.name}.{_TMP_TAG}-{stamp}"
    old = dst.parent / f".{dst.name}.{_OLD_TAG}-{stamp}"
    tmp.mkdir()
    moved_old = False
    try:
        yield tmp
        check(dst, overwrite)  # DST may have appeared while we worked
        if dst.exists():
            os.replace(dst, old)
            moved_old = True
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_old and not dst.exists():
            os.replace(old, dst)
            moved_old = False
        raise
    finally:
        if moved_old:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- params checks
def _flat(tree: Any) -> dict[str, Any]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def check_params(cfg: ModelConfig, params: Params) -> str:
    """Check that `params` has exactly the layout of `param_shapes(cfg)`; returns the common dtype name."""
    paths = quant.quantized_paths(params)
    want = _flat(quant.abstract_quantized(param_shapes(cfg), paths))
    have = _flat(quant.to_plain(params))
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise CheckpointError(
            f"params do not match the {cfg.arch} layout of the config: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}."
        )
    dtypes = set()
    for name, leaf in have.items():
        shape = tuple(np.shape(leaf))
        if shape != want[name].shape:
            raise CheckpointError(
                f"param {name} has shape {list(shape)} but the config asks for {list(want[name].shape)}."
            )
        if not (paths and quant.check_part_dtype(name, leaf, want[name])):
            dtypes.add(dtype_name(leaf.dtype))
    if len(dtypes) != 1:
        raise CheckpointError(f"params mix dtypes {sorted(dtypes)}; cast them to one dtype before saving.")
    return dtypes.pop()


# ----------------------------------------------------------------------------- orbax
def _write_params(path: Path, params: Params) -> None:
    """Write the params pytree to `path` (must not exist) with orbax, without copying host arrays."""
    import orbax.checkpoint as ocp  # imported here: only saving and loading need it

    th = ocp.type_handlers
    try:
        numpy_handler = th.NumpyHandler(deepcopy_host_arrays=False)
    except TypeError:  # orbax versions without the option do not copy
        numpy_handler = th.NumpyHandler()
    registry = th.create_type_handler_registry(
        (np.ndarray, numpy_handler), (jax.Array, th.ArrayHandler())
    )
    handler = ocp.PyTreeCheckpointHandler(
        type_handler_registry=registry, use_ocdbt=False, save_concurrent_gb=1
    )
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES), params)
    ckptr = ocp.Checkpointer(handler)
    try:
        with _quiet_absl():
            ckptr.save(path, args=ocp.args.PyTreeSave(params, save_args=save_args))
    finally:
        ckptr.close()


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silence orbax's informational absl warnings (e.g. no OCDBT subdirs to merge) while saving."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _orbax_leftover(args: Any) -> bool:
    """An unraisable exception left by a failed orbax restore: a read coroutine closed after
    the failure, or a callback into the event loop orbax already closed."""
    obj = getattr(args, "object", None)
    code = getattr(obj, "cr_code", None)
    if code is not None and ("orbax" in code.co_filename or "tensorstore" in code.co_filename):
        return True
    return (isinstance(args.exc_value, RuntimeError)
            and "Event loop is closed" in str(args.exc_value))


def _filter_orbax_leftovers() -> Any:
    """Drop `_orbax_leftover` unraisables (printed as "Exception ignored in: <coroutine ...>",
    40-140 lines each, by orbax's reader threads during and after a failed restore) from now
    on; every other one still goes to the previous hook. Returns the previous hook."""
    import sys

    previous = sys.unraisablehook
    if getattr(previous, "_drops_orbax_leftovers", False):
        return previous

    def hook(args: Any) -> None:
        if not _orbax_leftover(args):
            previous(args)

    hook._drops_orbax_leftovers = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    return previous


def _restore_failure(e: BaseException, params_dir: Path) -> str:
    """One clause for a failed restore: the array whose file could not be read (tensorstore
    names its path deep inside a long spec), else the first line of the error without the
    tensorstore / pybind11 details."""
    text = str(e)
    m = re.search(r"'path': '([^']+)'", text)
    if m:
        where = Path(m.group(1).rstrip("/"))
        name = where.name if where.parent == params_dir else str(where)
        return f"the data of param {name} cannot be read (a truncated or damaged file in {where})"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    first = re.split(r"\.?\s*See full TensorStore details", first)[0].rstrip(" .({")
    return first


def _read_params(path: Path, abstract: Params) -> Params:
    import orbax.checkpoint as ocp

    import sys

    ckptr = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    previous = _filter_orbax_leftovers()   # kept after a failure: its leftovers come later
    try:
        with _quiet_absl():
            params = ckptr.restore(path, args=ocp.args.StandardRestore(abstract))
    finally:
        ckptr.close()
    if getattr(sys.unraisablehook, "_drops_orbax_leftovers", False):
        sys.unraisablehook = previous
    return params


# ----------------------------------------------------------------------------- public API
def save_model(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    params: Params,
    *,
    overwrite: bool = False,
    extra_files: Mapping[str, str | os.PathLike] | None = None,
) -> Path:
    """Save a model (config + params) as a checkpoint folder, atomically.

    Args:
      directory: destination folder; must not exist unless `overwrite`.
      cfg: the model's config.
      params: pytree laid out as `param_shapes(cfg)` (numpy or jax arrays, one dtype), e.g.
        `embed [V, D]`, `layers/q_proj [L, D, H*hd]`; matrices may be int8 QuantizedWeights.
      overwrite: replace an existing checkpoint (or empty folder) at `directory`.
      extra_files: `{name in the folder: source path}` copied verbatim (tokenizer files, ...).
    Returns:
      The absolute path of the written folder.
    """
    dtype = check_params(cfg, params)
    meta = {"format": FORMAT, "version": 1, "param_dtype": dtype, **quant.folder_meta(cfg, params),
            "model": cfg.to_dict()}
    with atomic_directory(directory, overwrite) as tmp:
        for name, src in (extra_files or {}).items():
            if name in (CONFIG_FILE, PARAMS_DIR) or Path(name).name != name:
                raise CheckpointError(f"extra file name {name!r} is reserved or not a plain file name.")
            shutil.copyfile(src, tmp / name)
        _write_params(tmp / PARAMS_DIR, quant.to_plain(params))
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
    return Path(directory).absolute()


def _read_meta(directory: Path) -> dict[str, Any]:
    if not directory.exists():
        raise CheckpointError(f"checkpoint folder {directory} does not exist; check the path.")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder; pass the checkpoint folder.")
    path = directory / CONFIG_FILE
    if not path.is_file():
        hint = (" it looks like a Hugging Face checkpoint:" if (directory / "config.json").is_file() else "")
        raise CheckpointError(
            f"{directory} is not a converted dllm-jax checkpoint (no {CONFIG_FILE});{hint} run "
            f"`dllm-jax convert {directory} DST` first and load DST."
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-run `dllm-jax convert`.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"{path} is not a dllm-jax checkpoint config; re-run `dllm-jax convert`.")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta['version']}, newer than this dllm-jax "
            f"reads ({VERSION}); upgrade dllm-jax."
        )
    return meta


def load_config(directory: str | os.PathLike) -> tuple[ModelConfig, str]:
    """The model config and stored param dtype name of a checkpoint folder (no params read)."""
    directory = Path(directory).absolute()
    meta = _read_meta(directory)
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE} holds an invalid model config: {e}") from None
    return cfg, dtype_name(meta.get("param_dtype", "float32"))


def load_quantization(directory: str | os.PathLike) -> tuple[str | None, list[str]]:
    """(None, []) for a float folder, else ("int8", the paths of its quantised weights)."""
    return quant.read_folder_meta(_read_meta(Path(directory).absolute()), Path(directory) / CONFIG_FILE)


def abstract_params(cfg: ModelConfig, dtype: Any, shardings: Any = None, quantized: Any = ()
                    ) -> Params:
    """`param_shapes(cfg, dtype)` with a sharding on every leaf (default: the first device).

    `shardings` is None, one `jax.sharding.Sharding` for every leaf, or a pytree of shardings
    with the params' structure. `quantized`: paths of int8 weights (`quant.abstract_quantized`).
    """
    shapes = param_shapes(cfg, dtype)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        return quant.abstract_quantized(jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings), shapes), quantized)
    quant.refuse_mesh(quantized)
    try:
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )
    except ValueError as e:
        raise CheckpointError(f"shardings do not match the params structure: {e}") from None


def load_model(
    directory: str | os.PathLike, dtype: Any = None, shardings: Any = None
) -> tuple[ModelConfig, Params]:
    """Load a checkpoint folder written by `save_model` / `dllm-jax convert`.

    Args:
      directory: the checkpoint folder.
      dtype: params dtype to restore as (cast on read); None keeps the stored dtype.
      shardings: None (first device), one Sharding for all leaves, or a pytree of shardings.
    Returns:
      (config, params) with params as jax arrays laid out as `param_shapes(config)` (int8
      folders: QuantizedWeights, `dtype` for the float params).
    """
    directory = Path(directory).absolute()
    (cfg, stored), quantized = load_config(directory), load_quantization(directory)[1]
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise CheckpointError(
            f"{directory} has no {PARAMS_DIR}/ folder (an incomplete checkpoint); re-run `dllm-jax convert`."
        )
    abstract = abstract_params(cfg, jnp.dtype(dtype_name(dtype or stored)), shardings, quantized)
    try:
        params = _read_params(params_dir, abstract)
    except Exception as e:  # orbax / tensorstore errors are long; keep ours one sentence
        raise CheckpointError(
            f"could not restore params from {params_dir}: {_restore_failure(e, params_dir)}; the "
            f"checkpoint is damaged or does not match {CONFIG_FILE}: copy it again or re-run "
            f"`dllm-jax convert`."
        ) from None
    return cfg, quant.from_plain(params, quantized)
