"""The files of `dllm-jax batch`: the JSONL input, the answers file (recovered after a kill,
appended batch by batch), its settings sidecar, and the length-bucketed batches.

The contract these implement is written in `dllm_jax/batch_cli.py` (Input, Output, Restart,
Settings, Bucketing).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable

from dllm_jax.config import ConfigError


class BatchFileError(ConfigError):
    """An input, output or settings file that cannot be used; the message says how to fix it."""


# ----------------------------------------------------------------------------- input
def id_key(value: Any) -> str:
    """Ids compare as strings: 1 and "1" are one id."""
    return str(value)


def parse_line(text: str) -> tuple[Any, str | None, list[int] | None]:
    """One input line -> (id, prompt text or None, prompt ids or None); ValueError says why."""
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if "id" not in obj:
        raise ValueError('no "id"')
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ValueError('"id" must be a string or an integer')
    if isinstance(rid, str) and not rid.strip():
        raise ValueError('"id" must not be empty')
    has_text, has_ids = "prompt" in obj, "prompt_ids" in obj
    if has_text == has_ids:
        raise ValueError('give exactly one of "prompt" and "prompt_ids"')
    if has_text:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise ValueError('"prompt" must be a non-empty string')
        return rid, obj["prompt"], None
    ids = obj["prompt_ids"]
    if (not isinstance(ids, list) or not ids
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        raise ValueError('"prompt_ids" must be a non-empty list of integers')
    return rid, None, ids


def read_input(path: str, process_index: int = 0, process_count: int = 1,
               warn: Any = None) -> list[tuple[int, Any, str | None, list[int] | None]]:
    """This host's well-formed lines as (line number, id, text, ids); bad lines reported."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise BatchFileError(f"cannot read --input {path}: {e.strerror}.") from None
    items = []
    seen: dict[str, int] = {}
    with f:
        for n, line in enumerate(f, start=1):
            if (n - 1) % process_count != process_index or not line.strip():
                continue
            try:
                rid, text, ids = parse_line(line)
            except ValueError as e:
                warn(f"{path}:{n}: {e}; line skipped.")
                continue
            key = id_key(rid)
            if key in seen:
                warn(f"{path}:{n}: id {json.dumps(rid)} repeats the id of line {seen[key]} (ids "
                     f"are compared as strings); line skipped.")
                continue
            seen[key] = n
            items.append((n, rid, text, ids))
    return items


# ----------------------------------------------------------------------------- output
def recover_output(path: str, warn: Any = None) -> set[str]:
    """Ids (as `_id_key`) already in the output. A trailing partial line left by a kill is
    truncated away; a complete line that cannot be read is reported and ignored."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        warn(f"{path}: removing a partial last line ({len(data) - end} bytes) left by an "
             f"interrupted run.")
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    done: set[str] = set()
    for n, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            done.add(id_key(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            warn(f"{path}:{n}: not an answer line; ignored.")
    return done


def append_records(fd: int, records: Iterable[dict]) -> None:
    """Append whole lines with one write (looped only if the OS writes short), then fsync."""
    data = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n"
                   for r in records).encode("utf-8")
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def output_path(path: str, process_index: int | str, process_count: int) -> str:
    """The answers file of one process: `{process}` in `path` replaced by its index, else
    `path.<index>-of-<count>` when there are several (`path` itself for one)."""
    if "{process}" in path:
        return path.replace("{process}", str(process_index))
    if process_count > 1:
        return f"{path}.{process_index}-of-{process_count}"
    return path


# ----------------------------------------------------------------------------- batching
def make_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by length (stable), cut into batches: similar lengths decode together."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def bucket_length(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------- settings
SETTINGS_FORMAT = "dllm-jax-batch-settings"


def settings_path(out_path: str) -> str:
    return out_path + ".settings.json"


def _read_settings(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise BatchFileError(f"{path} cannot be read ({e}); remove it to record the settings of "
                         f"this run.") from None
    if not isinstance(record, dict) or record.get("format") != SETTINGS_FORMAT or not isinstance(
            record.get("settings"), dict):
        raise BatchFileError(f"{path} is not a dllm-jax batch settings file; remove it to record "
                         f"the settings of this run.")
    return record["settings"]


def check_settings(out_path: str, settings: dict[str, Any], force: bool, warn: Any) -> bool:
    """Compare the run's settings with those recorded next to the output; record them (the
    first start, or with `force`). Returns True when this call created the sidecar file."""
    from dllm_jax.files import write_json

    side = settings_path(out_path)
    stored = _read_settings(side)
    has_answers = os.path.exists(out_path) and os.path.getsize(out_path) > 0
    if stored is not None and has_answers and stored != settings:
        diff = [k for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
        text = ", ".join(f"{k} (was {json.dumps(stored.get(k))}, now "
                         f"{json.dumps(settings.get(k))})" for k in diff)
        if not force:
            raise BatchFileError(
                f"{out_path} holds answers made with other settings: {text}; resume with the "
                f"recorded settings ({side}), choose another --output, or pass "
                f"--force-new-settings to append answers made with the new ones.")
        warn(f"warning: --force-new-settings: appending answers made with other settings "
             f"({text}) to {out_path}.")
    if stored == settings:
        return False
    if stored is None and has_answers:
        warn(f"{out_path} has answers but no settings record; recording this run's settings in "
             f"{side}.")
    write_json(side, {"format": SETTINGS_FORMAT, "version": 1, "settings": settings},
               flag="--output")
    return stored is None


__all__ = ["BatchFileError", "SETTINGS_FORMAT", "append_records", "bucket_length",
           "check_settings", "id_key", "make_batches", "output_path", "parse_line",
           "read_input", "recover_output", "settings_path"]
